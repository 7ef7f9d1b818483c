"""On-disk formats: a converted model, a stage-1 run, a stage-2 run; one loader for all three.

A converted model is a directory:
    config.json         {"format": "model", "model_args": {...}, "fingerprint": "...", "source": ...}
    model.safetensors   weights under Meta names (tok_embeddings.weight, layers.0.attention.wq.weight, ...)
    tokenizer.tiktoken, tokenizer.json   the tokenizer (tokenizer.py)
A run (stage 1 or 2) is a directory holding only what it trained, plus a reference to what it
was trained on: {"path": relative to the project root, "fingerprint": ...}. The fingerprint is a
hash of the base weights, so a run moved to another clone still loads, and a run made on another
base model is refused by name.
    config.json         {"format": "stage1" | "stage2", "version": 2, "base": {...}, "router": {...}, ...}
    routers.safetensors (stage 1) / lora.safetensors (stage 2), resume state in ckpt.pt
Everything is written to a temporary name first and renamed into place, so an interrupted write
never leaves a half-written checkpoint. Every file a load reads that turns out unreadable (truncated,
not the right kind) stops with one line naming the file and what to do.

Run format versions (config.json "version"; a run without one is version 1):
    1  sparsity counted over the skippable parameters only (a 0.25 target skipped ~0.234 of a block)
    2  sparsity = skipped block parameters / all block parameters (wq wk wv wo w1 w2 w3), everywhere
A run of an older version is refused with the command that trains it again.
"""
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from errors import UserError
from lora import add_lora
from model import ModelArgs, Transformer
from router import RouterConfig
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent
RUN_VERSION = 2  # see the docstring; written into every run's config.json


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
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_file} is not valid JSON ({e}); it is damaged: restore it, or convert / train "
                        f"{path} again")
    if not isinstance(cfg, dict) or "format" not in cfg:
        raise UserError(f"{cfg_file} is not a config of this project (no \"format\"); convert / train {path} again")
    return cfg


def check_run_version(path, cfg):
    """Refuse a stage-1 / stage-2 run saved in an older format, saying how to redo it."""
    version = cfg.get("version", 1)
    if cfg.get("format") in ("stage1", "stage2") and version != RUN_VERSION:
        script = "train_stage1.py" if cfg["format"] == "stage1" else "train_stage2.py"
        raise UserError(f"{path} is a run of format version {version}, this code reads version {RUN_VERSION} "
                        f"(sparsity counted over all block parameters); train it again: python {script} "
                        f"--out_dir {path} --overwrite true")


def read_tensors(path, device="cpu"):
    """A safetensors file, or one line saying that it is missing or damaged."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} is missing; restore it, or convert / train {path.parent} again")
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is damaged ({str(e).splitlines()[0][:80]}); convert / train {path.parent} again")


def read_resume_state(path):
    """ckpt.pt of a run (optimizer state, step), or one line saying it is damaged."""
    try:
        return torch.load(path, weights_only=False)
    except FileNotFoundError:
        raise UserError(f"{path} is missing; the run cannot be resumed: start it again with --overwrite true")
    except Exception as e:  # a truncated or foreign file: pickle, zip and torch all raise their own errors
        raise UserError(f"{path} is damaged ({type(e).__name__}); the run cannot be resumed: start it again "
                        f"with --overwrite true")


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
    with StagingDir(out_dir, overwrite=overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp / "model.safetensors")
        if tokenizer is not None:
            tokenizer.save(tmp)
        cfg = {"format": "model", "version": RUN_VERSION, "model_args": asdict(args), "fingerprint": file_fingerprint(tmp / "model.safetensors"),
               "tokenizer_fingerprint": tokenizer.fingerprint if tokenizer is not None else None,
               "source": source}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    return Path(out_dir)


def base_reference(model):
    """How a run refers to the base model it was trained on."""
    return {"path": model.source["path"], "fingerprint": model.source["fingerprint"]}


def _load_base(path, device):
    cfg = read_config(path)
    if cfg.get("format") != "model":
        raise UserError(f"{path} is a {cfg.get('format')} run, not a converted model")
    args = ModelArgs.from_dict(cfg["model_args"])
    with torch.device("meta"):
        model = Transformer(args)
    weights = {k: v.float() for k, v in read_tensors(Path(path) / "model.safetensors", device).items()}
    if args.tie_embeddings:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    try:
        result = model.load_state_dict(weights, strict=False, assign=True)
    except RuntimeError as e:  # a tensor of the wrong shape
        raise UserError(f"{path}/model.safetensors does not match its config.json ({str(e).splitlines()[-1].strip()[:120]})")
    if result.missing_keys or result.unexpected_keys:
        raise UserError(f"{path}: weights do not match the config (missing {result.missing_keys[:3]}, "
                        f"unexpected {result.unexpected_keys[:3]})")
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.source = {"path": rel_to_root(path), "fingerprint": cfg["fingerprint"]}
    if (Path(path) / "tokenizer.json").exists():
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


def load(path, device="cpu"):
    """The one loader: a converted model, a stage-1 run or a stage-2 run, ready to use (eval mode),
    with its routers and LoRA attached and its tokenizer in model.tokenizer."""
    return _load(Path(path), device).eval()


def _load(path, device):
    cfg = read_config(path)
    check_run_version(path, cfg)
    fmt = cfg.get("format")
    if fmt == "model":
        return _load_base(path, device)
    if fmt == "stage1":
        model = _load_base(find_base(cfg["base"], path), device)
        attach_routers(model, path, cfg)
        if cfg.get("lora"):  # a joint run: LoRA trained together with the routers
            attach_lora(model, path, cfg)
        return model
    if fmt == "stage2":
        stage1 = resolve(cfg["stage1"]["path"]) if cfg.get("stage1") else None
        if stage1 is not None and not stage1.exists():
            raise UserError(f"{path} was trained on the stage-1 run {cfg['stage1']['path']}, which is not there")
        model = _load(stage1 if stage1 is not None else find_base(cfg["base"], path), device)
        if cfg.get("removed_blocks"):  # the static control: LoRA on ShortGPT's pruned model
            model = model.without_blocks(cfg["removed_blocks"])
        attach_lora(model, path, cfg)
        return model
    raise UserError(f"{path}/config.json has unknown format {fmt!r}")


def attach_routers(model, run_path, cfg=None):
    """Add the routers of a stage-1 run to a loaded base model (checking it is the right base)."""
    cfg = cfg or read_config(run_path)
    if cfg["base"]["fingerprint"] != model.source.get("fingerprint"):
        raise UserError(f"{run_path} holds routers for base model {cfg['base']['path']} "
                        f"(fingerprint {cfg['base']['fingerprint']}), not for {model.source.get('path')}")
    model.add_routers(RouterConfig(**cfg["router"]))
    load_trained(model, Path(run_path) / "routers.safetensors")
    model.source["routers"] = {"path": rel_to_root(run_path), "offset": cfg.get("offset", 0.0)}
    model.routing_offset = cfg.get("offset", 0.0)
    return model


def attach_lora(model, run_path, cfg):
    """Add the adapters of a run (stage 2, or a joint stage 1) to its loaded model."""
    if cfg["base"]["fingerprint"] != model.source.get("fingerprint"):
        raise UserError(f"{run_path} holds LoRA weights for base model {cfg['base']['path']} (fingerprint "
                        f"{cfg['base']['fingerprint']}), not for {model.source.get('path')} "
                        f"(fingerprint {model.source.get('fingerprint')})")
    stage1 = cfg.get("stage1")
    if stage1 and stage1.get("fingerprint"):
        found = file_fingerprint(resolve(stage1["path"]) / "routers.safetensors")
        if found != stage1["fingerprint"]:
            raise UserError(f"{run_path} was trained with the routers of {stage1['path']} (fingerprint "
                            f"{stage1['fingerprint']}), but that run now holds other routers ({found}); "
                            f"restore that stage-1 run or train stage 2 again")
    lc = cfg["lora"]
    add_lora(model, tuple(lc["targets"]), lc["r"], lc["alpha"], lc["dropout"])
    load_trained(model, Path(run_path) / "lora.safetensors")
    model.source["lora"] = {"path": rel_to_root(run_path)}
    return model.eval()  # loaded for use: LoRA dropout off (model.train() turns it back on)


TRAINED_FILES = {  # what a run trains, by file: whether a state-dict key belongs to it
    "routers.safetensors": lambda key: "_router." in key,
    "lora.safetensors": lambda key: key.endswith(("lora_A", "lora_B")),
}


def load_trained(model, path):
    """Load a run's trained tensors (routers.safetensors or lora.safetensors) into model, checking
    that the file holds every one of them and nothing else."""
    ours = TRAINED_FILES[Path(path).name]
    weights = read_tensors(path, model.tok_embeddings.weight.device)
    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shapes differ
        raise UserError(f"{path} does not match its config.json ({str(e).splitlines()[-1].strip()[:120]})")
    if result.unexpected_keys or any(ours(k) for k in result.missing_keys):
        raise UserError(f"{path} does not match its config.json")
