"""The one training loop both stages share: the step, accumulation, clipping, logging, validation,
checkpoints, resume, DDP and Ctrl-C.

A stage (train_stage1.py, train_stage2.py) brings only what makes it that stage:

    NAME, FORMAT        its name in messages ("stage 1") and in config.json ("stage1")
    validate_start      whether step 0 of the curves validates the starting point
    build(s, device, resume_cfg) -> (model, param groups, init_dir)
                        the frozen base with what trains attached, and the directory it came from;
                        build also sets the stage's about (for the first line printed), title (of
                        curves.png) and passes_per_token (forward-pass equivalents per token, for
                        the FLOP count)
    loss(model, x, y, it, s, ctx, all_reduce) -> (loss, {name: number to log})
    run_config(model, s) -> what config.json records of the trained part
    trained(model)      -> {file name: tensors}: what a checkpoint saves, and a resume loads back
    finish(model, s, windows, train_data, ctx, device, out_dir) -> summary dict: the final report;
                        its "final_val" is the last point of the curves, its "figures" the files it drew

A run directory holds config.json (what the run is: its settings, format and version), the trained
tensors, ckpt.pt (the optimizer state and the step: how to resume), log.jsonl, curves.png and
summary.json. Resuming restores the run's own settings before anything is built (a flag given again
on the command line wins), then the trained tensors and the optimizer as they were after the last
whole step. Every step seeds its batches, Gumbel noise and dropout from (seed, step, process), so a
resumed run draws what one that never stopped would have. Ctrl-C saves that state and exits with 130.
"""
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import plots
from checkpoint import (RUN_VERSION, atomic_save_tensors, atomic_torch_save, atomic_write_text, base_reference,
                        check_run_version, load_trained, read_config, read_resume_state)
from common import VAL_WINDOWS, check_settings, ensure_data, evaluate, load_split, setting, setup_device, sync, val_windows
from errors import UserError
from router import Routing, block_params

LR_SCHEDULES = ("constant", "cosine")  # lr_at


@dataclass
class TrainSettings:
    """What every training run has; a stage's Settings add their own fields and may change defaults."""
    # -- what and where
    out_dir: str = setting("out/run", "run directory (trained weights, settings, log, figures)")
    data_dir: str = setting("data/general", "directory with train.bin / val.bin / meta.json (data/shakespeare: the plays)")
    resume: bool = setting(False, "continue the run in out_dir from its last checkpoint")
    overwrite: bool = setting(False, "replace an existing run in out_dir")
    # -- optimization
    max_iters: int = setting(100, "optimizer steps", must_be=">= 1")
    batch_size: int = setting(4, "sequences per micro-batch", must_be=">= 1")
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step (per process)", must_be=">= 1")
    block_size: int = setting(128, "tokens per training sequence", must_be=">= 1")
    learning_rate: float = setting(2e-3, "AdamW learning rate")
    lr_schedule: str = setting("constant", "constant | cosine (with a linear warmup)", choices=LR_SCHEDULES)
    weight_decay: float = setting(0.01, "AdamW weight decay")
    grad_clip: float = setting(1.0, "clip the gradient norm of what trains (0 = off)")
    # -- evaluation and logging
    eval_interval: int = setting(50, "validate every N steps (and at the end)", must_be=">= 1")
    eval_iters: int = setting(12, "validation windows used by periodic validation (the final one uses all val_windows)",
                              must_be=">= 1")
    val_windows: int = setting(VAL_WINDOWS, "held-out windows of the final validation, evenly spaced over the held-out "
                                            "text (fewer: quicker and noisier; experiments.py ablations --quick)",
                               must_be=">= 1")
    log_interval: int = setting(1, "log a training step every N steps", must_be=">= 1")
    # -- system
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = setting("auto", "auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16")
    seed: int = setting(1337, "random seed (batches, initialization, Gumbel noise, dropout)")
    threads: int = setting(0, "CPU threads for torch (0 = torch's default)")

    def __post_init__(self):
        check_settings(self)  # every field's declared choices and range, for every stage

    def warmup_steps(self):
        return 0


def train(stage, s, explicit):
    """Run a stage: set up, train, checkpoint, and hand over to stage.finish for the report."""
    rank, world, local = setup_ddp()
    master = rank == 0
    out_dir = Path(s.out_dir)
    resume_cfg = None
    if s.resume:  # the run's own settings first: everything below is built from them
        if not (out_dir / "ckpt.pt").exists():
            raise UserError(f"--resume: no run to resume in {out_dir} (no ckpt.pt)")
        resume_cfg = read_config(out_dir)
        check_run_version(out_dir, resume_cfg)
        if resume_cfg.get("format") != stage.FORMAT:
            raise UserError(f"--resume: {out_dir} holds a {resume_cfg.get('format')} run, not a {stage.FORMAT} run")
        s = restore_settings(s, resume_cfg["settings"], explicit)
    if s.threads:
        torch.set_num_threads(s.threads)
    one_gpu_each = world > 1 and s.device == "auto" and torch.cuda.is_available()
    device, dtype, ctx = setup_device(f"cuda:{local}" if one_gpu_each else s.device, s.dtype)
    if master and resume_cfg is None:
        prepare_out_dir(out_dir, s.overwrite, stage.NAME.replace(" ", "-"))
    if world > 1:
        torch.distributed.barrier()

    # -- model: what the stage trains, attached to its frozen base
    model, groups, init_dir = stage.build(s, device, resume_cfg)
    trainable = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "lr_scale"} for g in groups])
    lr_scales = [g.get("lr_scale", 1.0) for g in groups]
    gen = torch.Generator()  # batches; seeded with the noise at every step (step_seed)
    start_iter = 0
    log = JsonlLog(out_dir / "log.jsonl", enabled=master)
    if resume_cfg is not None:
        for name in stage.trained(model):
            load_trained(model, out_dir / name)
        state = read_resume_state(out_dir / "ckpt.pt")
        optimizer.load_state_dict(state["optimizer"])
        start_iter = state["iter"]
        # the log as it was at that step: a crash or Ctrl-C may have left lines of later steps
        log.keep(lambda r: r["iter"] < start_iter or (r["kind"] == "val" and r["iter"] <= start_iter and not r.get("final")))

    # -- data (a bundled dataset is prepared by one process, the others wait for it)
    if master:
        ensure_data(s.data_dir, model.tokenizer)
    if world > 1:
        torch.distributed.barrier()
    train_data = load_split(s.data_dir, "train", model.tokenizer)
    windows = val_windows(load_split(s.data_dir, "val", model.tokenizer), n=s.val_windows)
    tokens_per_step = s.batch_size * s.block_size * s.gradient_accumulation_steps * world

    def validate(step, n_windows):
        st = evaluate(model, windows[:n_windows], val_routing(model), ctx=ctx, device=device)
        log.write(kind="val", iter=step, val_loss=st["loss"],
                  **{f"val_{k}": st[k] for k in ("param_sparsity", "attn_skip", "mlp_skip", "module_sparsity") if k in st})
        return st

    if master:
        print(f"{stage.NAME}: {init_dir} -> {out_dir} | {sum(p.numel() for p in trainable):,} parameters trainable "
              f"({stage.about}) | {s.max_iters} steps x {tokens_per_step} tokens | {device} {dtype}"
              f"{f' x{world}' if world > 1 else ''}")
        if stage.validate_start and resume_cfg is None:
            print("validating the starting point ...")
            validate(0, s.eval_iters)
    all_reduce = (lambda t: all_reduce_mean(t, world)) if world > 1 else None

    # -- the loop
    model.train()
    t0, val_time = time.time(), 0.0
    done = start_iter  # the last whole step
    bar = tqdm(range(start_iter, s.max_iters), initial=start_iter, total=s.max_iters, desc=stage.NAME,
               disable=not master, dynamic_ncols=True)
    sigint_before = hear_sigint()
    try:
        for it in bar:
            # every step draws from its own seed: a resumed run (on any number of processes) draws
            # the same batches, Gumbel noise and dropout as one that never stopped
            seed = step_seed(s.seed, it, rank)
            torch.manual_seed(seed)
            gen.manual_seed(seed)
            lr = lr_at(it, s.max_iters, s.learning_rate, s.lr_schedule, s.warmup_steps())
            for group, scale in zip(optimizer.param_groups, lr_scales):
                group["lr"] = lr * scale
            stats = []
            for _ in range(s.gradient_accumulation_steps):
                x, y = get_batch(train_data, s.batch_size, s.block_size, gen, device)
                loss, info = stage.loss(model, x, y, it, s, ctx, all_reduce)
                if loss.requires_grad:  # (stage 1 with --gate_estimator none: nothing trainable is in the graph)
                    (loss / s.gradient_accumulation_steps).backward()
                stats.append(info | {"loss": loss.item()})
            if world > 1:
                average_gradients(trainable, world)
            if s.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, s.grad_clip)
            with interrupts_deferred():  # a step is applied whole or not at all
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                done = it + 1
            last = {k: sum(d[k] for d in stats) / len(stats) for k in stats[0]}
            bar.set_postfix({k: f"{v:.3f}" for k, v in last.items()} | {"lr": f"{lr:.1e}"})
            if it % s.log_interval == 0:
                log.write(kind="train", iter=it, lr=lr, time=time.time() - t0, **last)
            if master and done % s.eval_interval == 0 and done < s.max_iters:
                t_val = time.time()
                st = validate(done, s.eval_iters)
                bar.write(f"step {done}: val loss {st['loss']:.3f}" + (
                    f", param sparsity {st['param_sparsity']:.3f} (attn {st['attn_skip']:.3f}, mlp {st['mlp_skip']:.3f})"
                    if "param_sparsity" in st else ""))
                save_run(out_dir, stage, model, s, done, optimizer)
                val_time += time.time() - t_val
    except KeyboardInterrupt:
        if master:  # an unfinished step is redone on resume: save the state after the last whole step
            optimizer.zero_grad(set_to_none=True)
            save_run(out_dir, stage, model, s, done, optimizer)
            print(f"\ninterrupted after step {done}; saved. Continue with: python {sys.argv[0]} --out_dir {out_dir} "
                  f"--resume true", file=sys.stderr)
        sys.exit(130)
    finally:
        if sigint_before is not None:
            signal.signal(signal.SIGINT, sigint_before)
    bar.close()
    train_time = time.time() - t0 - val_time  # training alone: tokens/s without the periodic validation
    if world > 1:  # every process leaves the loop before any tears its group down
        torch.distributed.barrier()
    if not master:
        torch.distributed.destroy_process_group()
        return None
    save_run(out_dir, stage, model, s, done, optimizer)

    # -- the stage's report, then the finished run (config.json says "finished" last)
    model.eval()
    summary = stage.finish(model, s, windows, train_data, ctx, device, out_dir)
    log.write(kind="val", iter=s.max_iters, final=True, **summary.pop("final_val"))
    plots.training_curves(log.read(), out_dir / "curves.png", stage.title)
    print(f"figures: {', '.join(str(out_dir / f) for f in ['curves.png'] + summary.pop('figures', []))}")
    tok_s = tokens_per_step * (s.max_iters - start_iter) / max(train_time, 1e-9)
    summary |= {"train_seconds": round(train_time, 1), "train_tokens_per_s": round(tok_s, 1), "out_dir": str(out_dir)}
    summary |= speed_report(model.args, s.block_size, train_time, tok_s, stage.passes_per_token, device, dtype)
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    save_run(out_dir, stage, model, s, done, optimizer, final=True)
    if world > 1:
        torch.distributed.destroy_process_group()
    print(json.dumps(summary))
    return summary


# ----------------------------------------------------------------------------------------------
# What the loop calls: runs on disk, batches, schedules, the report, Ctrl-C

def restore_settings(s, saved, explicit):
    """The run's saved settings, except those given again on the command line."""
    known = {f.name for f in dataclasses.fields(s)}
    return dataclasses.replace(s, **{k: v for k, v in saved.items()
                                     if k in known and k not in explicit and k not in ("resume", "overwrite")})


def prepare_out_dir(out_dir, overwrite, what):
    """A new run's directory. Never destroy an earlier run silently: replace it on request, or refuse."""
    if (out_dir / "config.json").exists() or (out_dir / "ckpt.pt").exists():
        if not overwrite:
            raise UserError(f"{out_dir} already holds a {what} run; pass --resume true to continue it, "
                            f"--overwrite true to replace it, or --out_dir to start a new one")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


class JsonlLog:
    """log.jsonl: one JSON record per line, written by the master process only."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled = Path(path), enabled

    def write(self, **record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def keep(self, wanted):
        """Rewrite the log with only the records for which wanted(record) is true."""
        if self.enabled and self.path.exists():
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.read() if wanted(r)))
            os.replace(tmp, self.path)

    def read(self):
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def save_run(out_dir, stage, model, s, step, optimizer, final=False):
    """config.json + the trained tensors (what the run is) and ckpt.pt (how to resume it), atomically."""
    for name, tensors in stage.trained(model).items():
        atomic_save_tensors(tensors, out_dir / name)
    atomic_torch_save({"iter": step, "optimizer": optimizer.state_dict()}, out_dir / "ckpt.pt")
    cfg = {"format": stage.FORMAT, "version": RUN_VERSION, "base": base_reference(model), **stage.run_config(model, s),
           "iter": step, "finished": final, "settings": dataclasses.asdict(s)}
    atomic_write_text(out_dir / "config.json", json.dumps(cfg, indent=2))


def get_batch(data, batch_size, block_size, generator, device):
    """Random windows of block_size + 1 tokens -> inputs x and next-token targets y, (B, T)."""
    if len(data) <= block_size + 1:
        raise UserError(f"the data has {len(data)} tokens, fewer than --block_size {block_size} + 1")
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)
    chunk = torch.stack([torch.from_numpy(data[i:i + block_size + 1].astype(np.int64)) for i in ix.tolist()])
    return chunk[:, :-1].to(device), chunk[:, 1:].to(device)


def step_seed(seed, it, rank):
    """The random seed of step `it` on process `rank`: distinct for every (step, process)."""
    return seed + 7919 * it + 104729 * rank


def lr_at(it, max_iters, lr, schedule, warmup_iters, min_lr_frac=0.1):
    """constant: lr. cosine: linear warmup over warmup_iters, then a cosine decay to min_lr_frac * lr."""
    if schedule == "constant":
        return lr
    if it < warmup_iters:
        return lr * (it + 1) / warmup_iters
    progress = (it - warmup_iters) / max(1, max_iters - warmup_iters)
    return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def print_comparison(rows, width):
    """The final report's table: rows of (model, param sparsity, attn skip, mlp skip, val loss)."""
    print(f"\n{'model':<{width}} {'param sparsity':>14} {'attn skip':>9} {'mlp skip':>9} {'val loss':>9} {'val ppl':>9}")
    for name, ps, a, m, loss in rows:
        print(f"{name:<{width}} {ps:>14.3f} {a:>9.3f} {m:>9.3f} {loss:>9.3f} {math.exp(loss):>9.1f}")


def val_routing(model):
    """Validation always routes deterministically, at the model's offset (none for a dense model)."""
    if model.router_cfg is None:
        return None
    return lambda: Routing(mode="hard", offset=model.routing_offset, fast=True)  # the fast path: same result, less work


def hear_sigint():
    """A run started in the background (nohup, `&`) inherits an ignored SIGINT: listen anyway, so that
    `kill -INT` stops it with a checkpoint as Ctrl-C does. -> the handler it replaced, or None."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        return None
    return signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def interrupts_deferred():
    """Ctrl-C inside the block takes effect at its end: the weights, the optimizer state and the step
    count a checkpoint records then always belong together."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


# ----------------------------------------------------------------------------------------------
# Several processes (torchrun sets RANK / WORLD_SIZE)

def setup_ddp():
    """Join the process group when torchrun started this process. -> (rank, world_size, local_rank)."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return rank, world, local


def all_reduce_mean(x, world):
    if world > 1:
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.SUM)
        x /= world
    return x


def average_gradients(params, world):
    """DDP by hand: what trains is small (routers, LoRA), so average its gradients over the processes
    directly, no wrapper. With the sparsity averaged too (stage.loss's all_reduce), the result is the
    gradient of the loss on the union of the processes' batches."""
    for p in params:
        if p.grad is not None:  # (None on every process alike: a protected block's routers)
            all_reduce_mean(p.grad, world)


# ----------------------------------------------------------------------------------------------
# Speed: the model math a step does, against what the machine gives a plain matmul right now

def speed_report(args, seq_len, train_time, tok_s, passes_per_token, device, dtype):
    """Print the training speed as model math per second, beside a plain matmul's; -> its summary fields."""
    achieved = tok_s * model_flops_per_token(args, seq_len) * passes_per_token  # (forward-pass equivalents)
    yardstick = matmul_flops_per_s(device, dtype)  # the same process, now: the machine's speed of the moment
    print(f"training: {train_time:.0f} s, {tok_s:.0f} tokens/s, ~{achieved / 1e9:.1f} GFLOP/s of model math "
          f"= {achieved / yardstick:.0%} of a 1024x1024 matmul's {yardstick / 1e9:.0f} GFLOP/s here")
    return {"train_model_gflops": round(achieved / 1e9, 2), "matmul_gflops": round(yardstick / 1e9, 1),
            "train_flops_share": round(achieved / yardstick, 3)}


def model_flops_per_token(args, seq_len):
    """Forward FLOPs per token of the dense model: 2 per weight (matmuls) + attention scores."""
    weights = block_params(args) * args.n_layers + args.dim * args.vocab_size
    attn = 2 * 2 * args.n_layers * args.n_heads * args.head_dim * seq_len / 2  # QK^T and AV, causal average
    return 2 * weights + attn


def matmul_flops_per_s(device, dtype_name, n=1024, repeats=5):
    """FLOP/s of one large square matmul here, now (median of a few), in the run's dtype: the yardstick
    for a training run's model FLOP/s on a shared machine."""
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
