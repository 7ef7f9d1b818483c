"""Plumbing shared by the training scripts and the tools: settings, devices, data, the validation protocol.

The validation protocol (used by every tool, so the same model shows the same perplexity
everywhere): VAL_WINDOWS windows of VAL_BLOCK tokens, evenly spaced over the held-out text's
tokens (val.bin), each scored on all its next-token predictions. No random sampling.
"""
import argparse
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import assets
from checkpoint import atomic_write_text
from errors import ArgumentParser, UserError
from router import routing_stats

ROOT = Path(__file__).resolve().parent
VAL_WINDOWS = 40     # fixed validation windows ...
VAL_BLOCK = 256      # ... of this many tokens each
CALIB_WINDOWS = 8    # windows of training text (VAL_BLOCK tokens) that calibrate a routing offset


# ----------------------------------------------------------------------------------------------
# Settings: a dataclass whose fields become command-line flags. A field declares its default, its help
# and the values it allows; check_settings enforces them, the one place settings are validated.

RULES = {  # what a number setting `must_be`, in the words of its error message: --alpha must be >= 0
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    "> 0": lambda v: v > 0,
    "in [0, 1)": lambda v: 0 <= v < 1,
    f"in 1..{CALIB_WINDOWS}": lambda v: 1 <= v <= CALIB_WINDOWS,
    "non-empty": lambda v: any(part.strip() for part in v.split(",")),
}


def setting(default, help, choices=None, must_be=None):
    """A settings field: its default, its --help, and what it allows (one of `choices`, or a RULES key)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "must_be": must_be})


def check_settings(s):
    """The first value its field does not allow -> a one-line UserError naming the flag."""
    for f in dataclasses.fields(s):
        value, choices, must_be = getattr(s, f.name), f.metadata.get("choices"), f.metadata.get("must_be")
        if choices is not None and value not in choices:
            raise UserError(f"--{f.name} must be one of {', '.join(choices)}, got {value!r}")
        if must_be is not None and not RULES[must_be](value):
            raise UserError(f"--{f.name} must be {must_be}, got {value!r}")


def parse_bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def parse_settings(cls, description, argv=None, presets=None):
    """A flag for every field of the settings dataclass cls; parse argv. -> (settings, names of the flags given).

    presets: {name: {field: value}} chosen with --recipe NAME, under the flags given.
    """
    parser = ArgumentParser(description)
    for f in dataclasses.fields(cls):
        kind = {bool: parse_bool, int: int, float: float}.get(type(f.default), str)
        parser.add_argument(f"--{f.name}", type=kind, default=None, metavar="BOOL" if kind is parse_bool else None,
                            help=f"{f.metadata['help']} (default: {f.default})".replace("%", "%%"))  # argparse formats %
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    preset = (presets or {}).get(given.get("recipe", getattr(cls, "recipe", None)), {})
    return cls(**(preset | given)), set(given)


# ----------------------------------------------------------------------------------------------
# Devices and precision

def setup_device(device="auto", dtype="auto"):
    """-> (device, dtype name, autocast context). CUDA gets bf16 autocast; a CPU stays in fp32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available (use --device cpu)")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if dtype == "float32":
        ctx = contextlib.nullcontext()
    else:
        ctx = torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))
    return device, dtype, ctx


# ----------------------------------------------------------------------------------------------
# Data

def load_split(data_dir, split, tokenizer):
    return assets.load_tokens(data_dir, split, tokenizer)


BUNDLED_DATA = ("shakespeare", "general")  # data/<name>/prepare.py that fetch their text themselves


def load_script(path):
    """data/<name>/prepare.py are scripts in folders that are not packages: import them by path."""
    spec = importlib.util.spec_from_file_location(f"prepare_{Path(path).parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ensure_data(data_dir, tokenizer):
    """A bundled dataset is prepared on first use, and again when made with another tokenizer or by
    another version of its prepare script (its VERSION, recorded in meta.json)."""
    data_dir = Path(data_dir)
    bundled = ROOT / "data" / data_dir.name
    if data_dir.name in BUNDLED_DATA and data_dir.resolve() == bundled.resolve():
        script = load_script(bundled / "prepare.py")
        try:
            meta = json.loads((data_dir / "meta.json").read_text())
            current = (all((data_dir / f).exists() for f in ("train.bin", "val.bin"))
                       and meta["tokenizer_fingerprint"] == tokenizer.fingerprint
                       and meta.get("version") == getattr(script, "VERSION", None))
        except (OSError, ValueError, KeyError):
            current = False  # missing or damaged: prepare again
        if not current:
            script.prepare(tokenizer, data_dir)
    return data_dir


def calibration_windows(train_data, n=CALIB_WINDOWS, block=VAL_BLOCK):
    """Fixed windows of training text for the offset calibration (never validation text)."""
    return val_windows(train_data, n=n, block=block)


def val_windows(val_data, n=VAL_WINDOWS, block=VAL_BLOCK):
    """The fixed validation windows: n windows of block + 1 tokens, evenly spaced. (n, block + 1)."""
    if len(val_data) < block + 1:
        raise UserError(f"validation data has {len(val_data)} tokens, fewer than one window of {block + 1}")
    starts = np.linspace(0, len(val_data) - block - 1, n).astype(np.int64)
    return torch.stack([torch.from_numpy(val_data[s:s + block + 1].astype(np.int64)) for s in starts])


@torch.no_grad()
def evaluate(model, windows, routing_factory=None, batch_size=8, ctx=contextlib.nullcontext(), device="cpu",
             progress=None):
    """Mean next-token loss over the windows, and routing statistics when routing.

    routing_factory: None for the dense model, else a callable returning a fresh Routing.
    -> {"loss", "ppl", and with routing the router.routing_stats fields}
    """
    was_training = model.training
    model.eval()
    total, count, gates = 0.0, 0, []
    batches = range(0, len(windows), batch_size)
    for i in (progress(batches) if progress else batches):
        w = windows[i:i + batch_size].to(device)
        routing = routing_factory() if routing_factory else None
        with ctx:
            logits, _, gates_w = model(w[:, :-1], routing=routing)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), w[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += w[:, 1:].numel()
        if gates_w is not None:
            gates.append(gates_w.float().cpu())
    model.train(was_training)
    out = {"loss": total / count, "ppl": math.exp(total / count)}
    if gates:
        out.update(routing_stats(torch.cat(gates, dim=2), model.args, model.router_cfg.kv))
    return out


def cached_reference(cache_dir, name, model, tensors, compute):
    """compute() once per (name, base model, tensors' values), kept in cache_dir/reference_cache.json:
    for the references every run on the same base and data shares (the dense model's and ShortGPT's
    validation loss). A model without a fingerprint (built in memory) is never cached."""
    fingerprint = model.source.get("fingerprint")
    if fingerprint is None:
        return compute()
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.cpu().numpy().tobytes())
    key = f"{name}-{fingerprint}-{digest.hexdigest()[:12]}"
    cache = Path(cache_dir) / "reference_cache.json"
    try:
        table = json.loads(cache.read_text()) if cache.exists() else {}
    except (OSError, ValueError):
        table = {}  # a damaged cache only costs the recomputation
    if key not in table:
        table[key] = compute()
        try:
            atomic_write_text(cache, json.dumps(table, indent=1))
        except OSError:
            pass  # a read-only data directory only costs the recomputation
    return table[key]


def dense_val_loss(model, windows, ctx, device, cache_dir):
    """The dense model's validation loss (cached beside the data: it is the same for every run)."""
    return cached_reference(cache_dir, "dense", model, [windows],
                            lambda: evaluate(model, windows, None, ctx=ctx, device=device))


def sync(device):
    """Wait for the device's queued work (CUDA runs asynchronously), so a timer measures it."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
