"""On-disk formats: a converted model, a stage-1 run, a stage-2 run; one loader for all three.

A converted model is a directory:
    config.json         {"format": "model", "model_args": {...}, "fingerprint": "...", "source": ...}
    model.safetensors   weights under Meta names (tok_embeddings.weight, layers.0.attention.wq.weight, ...)
    tokenizer.tiktoken, tokenizer.json   the tokenizer (tokenizer.py)
A run (stage 1 or 2) is a directory holding only what it trained, plus a reference to what it
was trained on: {"path": relative to the project root, "fingerprint": ...}. The fingerprint is a
hash of the base weights, so a run moved to another clone still loads, and a run made on another
base model is refused by name.
    config.json         {"format": "stage1" | "stage2", "base": {...}, "router": {...}, "settings": {...}}
    routers.safetensors (stage 1) / lora.safetensors (stage 2), resume state in ckpt.pt
Everything is written to a temporary name first and renamed into place, so an interrupted write
never leaves a half-written checkpoint.
"""
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from errors import UserError

ROOT = Path(__file__).resolve().parent


def file_fingerprint(path, chunk=1 << 24):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def rel_to_root(path):
    """A path as the project will find it again: relative to the project root when inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def resolve(path_str):
    p = Path(path_str)
    return p if p.is_absolute() else ROOT / p


def read_config(path):
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if not cfg_file.exists():
        raise UserError(f"{path} is not a checkpoint directory of this project (no config.json); "
                        f"convert a model with convert.py or train one with train_stage1.py")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_file} is not valid JSON ({e})")


# ----------------------------------------------------------------------------------------------
# Atomic writes

def _temp_beside(path):
    """A temporary file next to `path` (same file system, so os.replace is atomic), mode 0644."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a checkpoint is an ordinary file
    return fd, tmp


def atomic_write_text(path, text):
    path = Path(path)
    fd, tmp = _temp_beside(path)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def atomic_save_tensors(tensors, path, metadata=None):
    path = Path(path)
    fd, tmp = _temp_beside(path)
    os.close(fd)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def atomic_torch_save(obj, path):
    path = Path(path)
    fd, tmp = _temp_beside(path)
    os.close(fd)
    torch.save(obj, tmp)
    os.replace(tmp, path)


class StagingDir:
    """Write a whole directory under a temporary name; it appears at `final` only if all went well."""

    def __init__(self, final, overwrite=False):
        self.final = Path(final)
        if self.final.exists() and not overwrite:
            raise UserError(f"{self.final} already exists; choose another output directory or pass --overwrite")
        self.final.parent.mkdir(parents=True, exist_ok=True)

    def __enter__(self):
        self.path = Path(tempfile.mkdtemp(dir=self.final.parent, prefix=f".{self.final.name}.tmp"))
        self.path.chmod(0o755)  # mkdtemp makes it private; a model directory is an ordinary one
        return self.path

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return False
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.path, self.final)
        return False


# ----------------------------------------------------------------------------------------------
# Converted models

def save_model_dir(out_dir, state_dict, args, tokenizer, source, overwrite=False):
    """Write a converted model directory atomically. Returns its path."""
    from dataclasses import asdict
    with StagingDir(out_dir, overwrite=overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp / "model.safetensors")
        if tokenizer is not None:
            tokenizer.save(tmp)
        cfg = {"format": "model", "model_args": asdict(args), "fingerprint": file_fingerprint(tmp / "model.safetensors"),
               "tokenizer_fingerprint": tokenizer.fingerprint if tokenizer is not None else None,
               "source": source}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    return Path(out_dir)


def base_reference(model):
    """How a run refers to the base model it was trained on."""
    return {"path": model.source["path"], "fingerprint": model.source["fingerprint"]}


def _load_base(path, device):
    from model import ModelArgs, Transformer
    cfg = read_config(path)
    if cfg.get("format") != "model":
        raise UserError(f"{path} is a {cfg.get('format')} run, not a converted model")
    args = ModelArgs.from_dict(cfg["model_args"])
    with torch.device("meta"):
        model = Transformer(args)
    weights = load_file(Path(path) / "model.safetensors", device=str(device))
    weights = {k: v.float() for k, v in weights.items()}
    if args.tie_embeddings:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    result = model.load_state_dict(weights, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(f"{path}: weights do not match the config (missing {result.missing_keys[:3]}, "
                        f"unexpected {result.unexpected_keys[:3]})")
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.source = {"path": rel_to_root(path), "fingerprint": cfg["fingerprint"]}
    tok_files = Path(path) / "tokenizer.json"
    if tok_files.exists():
        from tokenizer import Tokenizer
        model.tokenizer = Tokenizer.load(path)
    return model.to(device)


def find_base(ref, run_path):
    """The base model a run refers to: its recorded path, checked by fingerprint."""
    base = resolve(ref["path"])
    if not (base / "config.json").exists():
        raise UserError(f"{run_path} was trained on {ref['path']}, which is not there; "
                        f"convert that model first (see README), or pass --base")
    found = read_config(base).get("fingerprint")
    if found != ref["fingerprint"]:
        raise UserError(f"{run_path} was trained on a model with fingerprint {ref['fingerprint']}, "
                        f"but {base} has fingerprint {found}: routers from another base model")
    return base


def load_model(path, device="cpu"):
    """Transformer.from_checkpoint: converted model, stage-1 run or stage-2 run, in eval mode."""
    return _load_model(Path(path), device).eval()


def _load_model(path, device):
    path = Path(path)
    cfg = read_config(path)
    fmt = cfg.get("format")
    if fmt == "model":
        return _load_base(path, device)
    if fmt == "stage1":
        model = _load_base(find_base(cfg["base"], path), device)
        attach_routers(model, path, cfg)
        if cfg.get("lora"):  # a joint run: LoRA trained together with the routers
            from lora import attach_lora_run
            attach_lora_run(model, path, cfg)
        return model
    if fmt == "stage2":
        stage1 = resolve(cfg["stage1"]["path"]) if cfg.get("stage1") else None
        if stage1 is not None and not stage1.exists():
            raise UserError(f"{path} was trained on the stage-1 run {cfg['stage1']['path']}, which is not there")
        model = _load_model(stage1 if stage1 is not None else find_base(cfg["base"], path), device)
        from lora import attach_lora_run
        attach_lora_run(model, path, cfg)
        return model
    raise UserError(f"{path}/config.json has unknown format {fmt!r}")


def attach_routers(model, run_path, cfg=None):
    """Add the routers of a stage-1 run to a loaded base model (checking it is the right base)."""
    from router import RouterConfig
    cfg = cfg or read_config(run_path)
    if cfg["base"]["fingerprint"] != model.source.get("fingerprint"):
        raise UserError(f"{run_path} holds routers for base model {cfg['base']['path']} "
                        f"(fingerprint {cfg['base']['fingerprint']}), not for {model.source.get('path')}")
    model.add_routers(RouterConfig(**cfg["router"]))
    weights = load_file(Path(run_path) / "routers.safetensors", device=str(model.tok_embeddings.weight.device))
    result = model.load_state_dict(weights, strict=False)
    if result.unexpected_keys or any("_router." in k for k in result.missing_keys):
        raise UserError(f"{run_path}/routers.safetensors does not match its config")
    model.source["routers"] = {"path": rel_to_root(run_path), "offset": cfg.get("offset", 0.0)}
    model.routing_offset = cfg.get("offset", 0.0)
    return model
