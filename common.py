"""Plumbing shared by the training loop and the tools: settings, devices, DDP, data, validation, runs.

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
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import assets
from checkpoint import atomic_write_text
from errors import ArgumentParser, UserError
from router import block_params, routing_stats

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
# Devices, precision, DDP

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


def setup_ddp():
    """torchrun sets RANK/WORLD_SIZE: join the process group. -> (rank, world_size, local_rank)."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return rank, world, local


def all_reduce_mean(x, world):
    if world > 1:
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.SUM)
        x /= world
    return x


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


def get_batch(data, batch_size, block_size, generator, device):
    """Random windows of block_size + 1 tokens -> inputs x and next-token targets y, (B, T)."""
    if len(data) <= block_size + 1:
        raise UserError(f"the data has {len(data)} tokens, fewer than --block_size {block_size} + 1")
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)
    chunk = torch.stack([torch.from_numpy(data[i:i + block_size + 1].astype(np.int64)) for i in ix.tolist()])
    return chunk[:, :-1].to(device), chunk[:, 1:].to(device)


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


# ----------------------------------------------------------------------------------------------
# Schedules

def lr_at(it, max_iters, lr, schedule, warmup_iters, min_lr_frac=0.1):
    if schedule == "constant":
        return lr
    if it < warmup_iters:
        return lr * (it + 1) / warmup_iters
    progress = (it - warmup_iters) / max(1, max_iters - warmup_iters)
    return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# ----------------------------------------------------------------------------------------------
# Runs: a directory with config.json, the trained tensors, resume state and a JSONL log

class JsonlLog:
    def __init__(self, path, enabled=True):
        self.path, self.enabled = Path(path), enabled

    def write(self, **record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def keep(self, wanted):
        """Rewrite the log with only the records for which wanted(record) is true."""
        if self.enabled and self.path.exists():
            kept = [r for r in self.read() if wanted(r)]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)

    def read(self):
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def prepare_out_dir(out_dir, resume, overwrite, what):
    """Never destroy an earlier run silently: resume it, overwrite it on request, or refuse."""
    out_dir = Path(out_dir)
    exists = (out_dir / "config.json").exists() or (out_dir / "ckpt.pt").exists()
    if resume:
        if not (out_dir / "ckpt.pt").exists():
            raise UserError(f"--resume: no run to resume in {out_dir} (no ckpt.pt)")
        return out_dir
    if exists and not overwrite:
        raise UserError(f"{out_dir} already holds a {what} run; pass --resume true to continue it, "
                        f"--overwrite true to replace it, or --out_dir to start a new one")
    if exists:
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def sync(device):
    """Wait for the device's queued work (CUDA runs asynchronously), so a timer measures it."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def matmul_flops_per_s(device, dtype_name, n=1024, repeats=5):
    """FLOP/s of one large square matmul here, now (median of a few), in the run's dtype: what the
    hardware gives plain dense math at this moment, the yardstick for a training run's model FLOP/s on
    a shared machine."""
    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype_name))
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype_name))
    times = []
    for _ in range(repeats + 1):  # the first one warms up
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / sorted(times[1:])[repeats // 2]


def model_flops_per_token(args, seq_len):
    """Forward FLOPs per token of the dense model: 2 per weight (matmuls) + attention scores."""
    weights = block_params(args) * args.n_layers + args.dim * args.vocab_size
    attn = 2 * 2 * args.n_layers * args.n_heads * args.head_dim * seq_len / 2  # QK^T and AV, causal average
    return 2 * weights + attn

