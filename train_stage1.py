"""Stage 1 of SkipGPT: tune the routers of a frozen model to skip a target share of its work.

    python train_stage1.py                                   # SmolLM2-135M on Shakespeare, 25% of block params, ~10 min on a CPU
    python train_stage1.py --target_sparsity 0.4 --out_dir out/stage1-t0.40
    python train_stage1.py --recipe paper --out_dir out/stage1-paper   # the paper's literal recipe (collapses in a short run)
    python train_stage1.py --resume true                     # continue an interrupted run
    torchrun --standalone --nproc_per_node=2 train_stage1.py # several GPUs (or CPU processes) with DDP

Every base weight is frozen; only the ~70k router parameters train. Loss per step:
    task + alpha * |target_now - s|
where task is the KL divergence from the dense model's predictions (distill, default) or plain
cross-entropy (the paper), s the share of block parameters (or modules) skipped under Gumbel gates,
and target_now ramps from 0 to the target over the first sparsity_warmup of the steps. The gates
are hard straight-through Gumbel-softmax samples, tau annealed linearly from tau_start to tau_end.
Training runs the masked path: a skipped sublayer is still computed (times 0) because the gate's
gradient needs its output. After training, a logit offset is calibrated on training text so that
deterministic routing skips exactly the target; validation always uses deterministic gates.
"""
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import assets
import lora
from checkpoint import atomic_save_tensors, atomic_torch_save, atomic_write_text, base_reference
from common import (JsonlLog, VAL_WINDOWS, all_reduce_mean, dense_val_loss, evaluate, get_batch, linear, load_split, lr_at,
                    model_flops_per_token, parse_settings, prepare_out_dir, rng_state, set_rng_state, setting,
                    setup_ddp, setup_device, val_windows)
from errors import UserError, cli
from model import Transformer
from router import RouterConfig, Routing, calibrate_offset, module_params, sparsity_loss


@dataclass
class Settings:
    # -- what and where
    out_dir: str = setting("out/stage1", "run directory (router weights, settings, log, figures)")
    init_from: str = setting(str(assets.DEFAULT_MODEL_DIR.relative_to(assets.ROOT)), "converted base model directory")
    data_dir: str = setting("data/shakespeare", "directory with train.bin / val.bin / meta.json")
    recipe: str = setting("skipgpt", "skipgpt: defaults that work in a short CPU run | paper: the paper's literal recipe")
    resume: bool = setting(False, "continue the run in out_dir from its last checkpoint")
    overwrite: bool = setting(False, "replace an existing run in out_dir")
    # -- the method
    target_sparsity: float = setting(0.25, "share of block parameters (or modules, see weighting) to skip")
    alpha: float = setting(8.0, "weight of the sparsity loss alpha * |target - s| (paper 8, authors' code 20)")
    weighting: str = setting("params", "sparsity counts skipped block parameters (params) or (token, module) pairs (modules)")
    budget: str = setting("global", "one budget over all blocks (global) or every block on its own (per_layer)")
    sparsity_warmup: float = setting(0.3, "ramp the target up from 0 over this fraction of the steps (0 = off)")
    distill: bool = setting(True, "task loss = KL(dense model || routed model) instead of cross-entropy")
    tau_start: float = setting(5.0, "Gumbel temperature at the first step")
    tau_end: float = setting(1.0, "Gumbel temperature at the last step")
    router_kind: str = setting("linear", "linear (dim -> 2) | mlp (dim -> dim/4 -> 2, the authors' code)")
    mlp_input: str = setting("block", "MLP router reads the block input (block) or the post-attention state (post_attn)")
    router_norm: bool = setting(True, "RMS-normalize the router input (the raw stream has norms ~100-700)")
    router_init: str = setting("execute", "execute: bias (+2, -2) so ~2% skip at start | paper: zero bias")
    kv: str = setting("keep", "K/V of a token that skips attention: keep (still attended to) | evict")
    protect_first: int = setting(2, "the first N blocks always execute")
    calibrate: bool = setting(True, "after training, calibrate a logit offset so deterministic routing hits the target")
    gate_estimator: str = setting("ste", "gradient of the hard Gumbel gates: ste (straight-through, the method) | "
                                         "soft (relaxed gates in training) | none (no gradient: what breaks without STE)")
    joint_lora_r: int = setting(0, "one-stage training: also train LoRA of this rank (wq, wv, w1) with the routers "
                                   "(the paper's 'joint' ablation); 0 = off, the two-stage method")
    joint_lora_lr: float = setting(2e-4, "learning rate of the jointly trained LoRA (stage 2's)")
    # -- optimization
    max_iters: int = setting(100, "optimizer steps")
    batch_size: int = setting(4, "sequences per micro-batch")
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step (per process)")
    block_size: int = setting(128, "tokens per training sequence")
    learning_rate: float = setting(2e-3, "AdamW learning rate (paper 2e-3)")
    lr_schedule: str = setting("constant", "constant (paper) | cosine (with warmup_iters of linear warmup)")
    warmup_iters: int = setting(0, "linear learning-rate warmup steps (cosine schedule)")
    weight_decay: float = setting(0.01, "AdamW weight decay")
    grad_clip: float = setting(1.0, "clip the router gradient norm (0 = off)")
    # -- evaluation and logging
    eval_interval: int = setting(50, "validate every N steps (and at the end)")
    eval_iters: int = setting(12, f"validation windows used by periodic validation (the final one uses all {VAL_WINDOWS})")
    log_interval: int = setting(1, "log a training step every N steps")
    # -- system
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = setting("auto", "auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16")
    seed: int = setting(1337, "random seed (batches and Gumbel noise)")
    threads: int = setting(0, "CPU threads for torch (0 = torch's default)")

    def __post_init__(self):
        if not 0 <= self.target_sparsity < 1:
            raise UserError(f"--target_sparsity must be in [0, 1), got {self.target_sparsity}")
        if self.alpha < 0:
            raise UserError(f"--alpha must be >= 0, got {self.alpha}")
        for name, allowed in [("weighting", ("params", "modules")), ("budget", ("global", "per_layer")),
                              ("router_kind", ("linear", "mlp")), ("mlp_input", ("block", "post_attn")),
                              ("router_init", ("execute", "paper")), ("kv", ("keep", "evict")),
                              ("gate_estimator", ("ste", "soft", "none")),
                              ("lr_schedule", ("constant", "cosine"))]:
            if getattr(self, name) not in allowed:
                raise UserError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("max_iters", "batch_size", "gradient_accumulation_steps", "block_size", "eval_interval",
                     "eval_iters", "log_interval"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.sparsity_warmup < 1:
            raise UserError(f"--sparsity_warmup must be in [0, 1), got {self.sparsity_warmup}")
        if self.joint_lora_r < 0:
            raise UserError(f"--joint_lora_r must be >= 0 (0 = off), got {self.joint_lora_r}")
        if self.tau_start <= 0 or self.tau_end <= 0:
            raise UserError("--tau_start and --tau_end must be > 0")

    def router_config(self):
        return RouterConfig(kind=self.router_kind, mlp_input=self.mlp_input, normalize=self.router_norm,
                            init=self.router_init, kv=self.kv, protect_first=self.protect_first)


# The paper's recipe, exactly: raw residual input, Kaiming weight + zero bias, module-count
# sparsity, alpha 8, constant lr 2e-3, CE loss, no warm-up, no protected blocks, no calibration.
RECIPES = {
    "skipgpt": {},
    "paper": dict(router_norm=False, router_init="paper", weighting="modules", alpha=8.0, learning_rate=2e-3,
                  lr_schedule="constant", distill=False, sparsity_warmup=0.0, protect_first=0, calibrate=False),
}


def train_step_loss(model, x, y, s, it, weights, ctx):
    """One micro-batch: the loss, and what to log."""
    tau = linear(it, s.max_iters, s.tau_start, s.tau_end)
    warm = s.sparsity_warmup * s.max_iters
    target = s.target_sparsity * min(1.0, (it + 1) / warm) if warm >= 1 else s.target_sparsity
    with ctx:
        routing = Routing(mode="gumbel", tau=tau, estimator=s.gate_estimator)
        logits, ce = model(x, y, routing=routing)
        if s.distill:
            with torch.no_grad(), lora.disabled(model):
                teacher, _ = model(x)  # the dense model: routing off (and, in joint training, LoRA off)
            task = F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(teacher.float(), -1),
                            log_target=True, reduction="none").sum(-1).mean()
        else:
            task = ce
        sp_loss, sp = sparsity_loss(routing.gate_tensor(), target, s.alpha, s.weighting, s.budget, weights)
    return task + sp_loss, {"task": task.item(), "ce": ce.item(), "sparsity": sp.item(), "target": target, "tau": tau}


def calibration_windows(train_data, n=8, block=256):
    """Fixed windows of training text for the offset calibration (never validation text)."""
    return val_windows(train_data, n=n, block=block)


def calibrate(model, windows, target, weighting, ctx, device):
    """Offset so deterministic routing skips `target` (params or modules) on the calibration text."""
    def measure(offset):
        st = evaluate(model, windows, lambda: Routing(mode="hard", offset=offset), ctx=ctx, device=device)
        return st["param_sparsity"] if weighting == "params" else st["module_sparsity"]
    return calibrate_offset(measure, target, lo=-8.0, hi=8.0, iters=12)


def joint_lora_config(s):
    return {"targets": list(lora.DEFAULT_TARGETS), "r": s.joint_lora_r, "alpha": 2.0 * s.joint_lora_r, "dropout": 0.1}


def save_run(out_dir, model, s, it, optimizer, rngs, offset, final=False):
    """config.json + routers.safetensors (what the run is) and ckpt.pt (how to resume it), atomically.

    rngs: (torch RNG state, batch generator state) as they were when step `it` began, so a resumed
    run draws the same batches and Gumbel noise as an uninterrupted one.
    """
    cfg = {"format": "stage1", "base": base_reference(model), "router": model.router_cfg.to_dict(),
           "offset": offset, "iter": it, "finished": final, "settings": dataclasses.asdict(s)}
    if s.joint_lora_r:
        cfg["lora"] = joint_lora_config(s)
        atomic_save_tensors(lora.lora_state_dict(model), out_dir / "lora.safetensors")
    atomic_save_tensors(model.router_state_dict(), out_dir / "routers.safetensors")
    atomic_torch_save({"iter": it, "optimizer": optimizer.state_dict(), "rng": rngs[0],
                       "batch_rng": rngs[1]}, out_dir / "ckpt.pt")
    atomic_write_text(out_dir / "config.json", json.dumps(cfg, indent=2))


def main(argv=None):
    s, explicit = parse_settings(Settings, __doc__, argv, RECIPES)
    rank, world, local = setup_ddp()
    master = rank == 0
    if s.threads:
        torch.set_num_threads(s.threads)
    device, dtype, ctx = setup_device(s.device if world == 1 or s.device != "auto" or not torch.cuda.is_available()
                                      else f"cuda:{local}", s.dtype)
    out_dir = Path(s.out_dir)
    if master:
        prepare_out_dir(out_dir, s.resume, s.overwrite, "stage-1")
    if world > 1:
        torch.distributed.barrier()

    # -- model: the frozen base, with fresh routers (or the run's, on resume)
    init_dir = assets.ensure_default_model() if Path(s.init_from).resolve() == assets.DEFAULT_MODEL_DIR else Path(s.init_from)
    model = Transformer.from_checkpoint(init_dir, device=device)
    if model.source.get("routers") is not None or model.router_cfg is not None:
        raise UserError(f"--init_from {init_dir} already has routers; stage 1 starts from a converted base model")
    for p in model.parameters():
        p.requires_grad_(False)  # frozen: no weight gradients are ever computed for the base
    torch.manual_seed(s.seed)  # the same router init on every DDP process: a run is reproducible from its seed
    model.add_routers(s.router_config())
    torch.manual_seed(s.seed + rank)  # but each process draws its own Gumbel noise
    router_params = [p for n, p in model.named_parameters() if "_router." in n]
    groups = [{"params": router_params, "lr": s.learning_rate, "weight_decay": s.weight_decay}]
    if s.joint_lora_r:  # the one-stage ablation: adapters train from the first step, beside the routers
        lc = joint_lora_config(s)
        lora.add_lora(model, tuple(lc["targets"]), lc["r"], lc["alpha"], lc["dropout"])
        groups.append({"params": [p for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))],
                       "lr": s.joint_lora_lr, "weight_decay": 0.0, "lora": True})
    trainable = [p for g in groups for p in g["params"]]
    weights = module_params(model.args, s.kv)
    optimizer = torch.optim.AdamW(groups)
    start_iter = 0
    gen = torch.Generator().manual_seed(s.seed + rank)
    if s.resume:
        cfg = json.loads((out_dir / "config.json").read_text())
        if cfg["base"]["fingerprint"] != model.source["fingerprint"]:
            raise UserError(f"--resume: {out_dir} holds routers for base {cfg['base']['path']} "
                            f"(fingerprint {cfg['base']['fingerprint']}), not for {init_dir}")
        if bool(cfg.get("lora")) != bool(s.joint_lora_r):
            raise UserError(f"--resume: {out_dir} was trained with --joint_lora_r {cfg.get('lora', {}).get('r', 0)}; "
                            f"pass the same value")
        if cfg["router"] != model.router_cfg.to_dict():
            raise UserError(f"--resume: the router settings differ from those {out_dir} was trained with")
        from safetensors.torch import load_file
        model.load_state_dict(load_file(out_dir / "routers.safetensors", device=str(device)), strict=False)
        if s.joint_lora_r:
            model.load_state_dict(load_file(out_dir / "lora.safetensors", device=str(device)), strict=False)
        state = torch.load(out_dir / "ckpt.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        gen.set_state(state["batch_rng"])
        start_iter = state["iter"]
        s = dataclasses.replace(s, **{k: v for k, v in cfg["settings"].items()
                                      if k not in explicit and k not in ("resume", "overwrite")})

    # -- data
    data_dir = Path(s.data_dir)
    if data_dir.resolve() == assets.SHAKESPEARE_DIR.resolve():
        assets.ensure_shakespeare(init_dir)
    train_data = load_split(data_dir, "train", model.tokenizer)
    val_data = load_split(data_dir, "val", model.tokenizer)
    windows = val_windows(val_data)
    log = JsonlLog(out_dir / "log.jsonl", enabled=master)

    n_tok = s.batch_size * s.block_size * s.gradient_accumulation_steps * world
    if master:
        print(f"stage 1: {init_dir} -> {out_dir} | {sum(p.numel() for p in trainable):,} parameters "
              f"trainable ({'routers + LoRA, joint' if s.joint_lora_r else 'routers'}), base frozen | target {s.target_sparsity} ({s.weighting}), alpha {s.alpha}, "
              f"{'KL to dense' if s.distill else 'CE'} | {s.max_iters} steps x {n_tok} tokens | {device} {dtype}"
              f"{f' x{world}' if world > 1 else ''}")
        if s.recipe == "paper":
            print("recipe paper: raw router input, zero-bias init, module-count sparsity, CE, no warm-up, "
                  "no protected blocks (expect a collapse in a short run: see README)")

    def validate(it, n_windows):
        st = evaluate(model, windows[:n_windows], lambda: Routing(mode="hard"), ctx=ctx, device=device)
        log.write(kind="val", iter=it, val_loss=st["loss"], val_param_sparsity=st["param_sparsity"],
                  val_attn_skip=st["attn_skip"], val_mlp_skip=st["mlp_skip"], val_module_sparsity=st["module_sparsity"])
        return st

    # -- training loop
    model.train()
    t0, it, last = time.time(), start_iter, {}
    done, step_rngs = start_iter, (rng_state(), gen.get_state())  # what a resume must restore
    bar = tqdm(range(start_iter, s.max_iters), initial=start_iter, total=s.max_iters, desc="stage 1",
               disable=not master, dynamic_ncols=True)
    try:
        for it in bar:
            lr = lr_at(it, s.max_iters, s.learning_rate, s.lr_schedule, s.warmup_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr * (s.joint_lora_lr / s.learning_rate if group.get("lora") else 1.0)
            stats = []
            for _ in range(s.gradient_accumulation_steps):
                x, y = get_batch(train_data, s.batch_size, s.block_size, gen, device)
                loss, info = train_step_loss(model, x, y, s, it, weights, ctx)
                if loss.requires_grad:  # with --gate_estimator none nothing trainable is in the graph
                    (loss / s.gradient_accumulation_steps).backward()
                stats.append(info | {"loss": loss.item()})
            if world > 1:  # routers are tiny: average their gradients by hand (no DDP wrapper needed)
                for p in trainable:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    all_reduce_mean(p.grad, world)
            if s.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, s.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done, step_rngs = it + 1, (rng_state(), gen.get_state())
            last = {k: sum(d[k] for d in stats) / len(stats) for k in stats[0]}
            bar.set_postfix(loss=f"{last['loss']:.3f}", task=f"{last['task']:.3f}", ce=f"{last['ce']:.2f}",
                            sp=f"{last['sparsity']:.3f}", tau=f"{last['tau']:.2f}")
            if it % s.log_interval == 0:
                log.write(kind="train", iter=it, lr=lr, time=time.time() - t0, **last)
            if master and ((it + 1) % s.eval_interval == 0 and it + 1 < s.max_iters):
                st = validate(it + 1, s.eval_iters)
                bar.write(f"step {it + 1}: val loss {st['loss']:.3f} (ppl {st['ppl']:.1f}), "
                          f"param sparsity {st['param_sparsity']:.3f} (attn {st['attn_skip']:.3f}, mlp {st['mlp_skip']:.3f})")
                save_run(out_dir, model, s, done, optimizer, step_rngs, 0.0)
        it = s.max_iters
    except KeyboardInterrupt:
        if master:  # an unfinished step is redone on resume: save the state after the last whole step
            optimizer.zero_grad(set_to_none=True)
            save_run(out_dir, model, s, done, optimizer, step_rngs, 0.0)
            print(f"\ninterrupted after step {done}; saved. Continue with: python train_stage1.py --out_dir {out_dir} --resume true",
                  file=sys.stderr)
        sys.exit(130)
    bar.close()
    train_time = time.time() - t0
    if master:
        save_run(out_dir, model, s, done, optimizer, step_rngs, 0.0)
    if not master:
        torch.distributed.destroy_process_group()
        return

    # -- calibrate, validate, compare with ShortGPT, report
    offset = 0.0
    if s.calibrate:
        print("calibrating the routing offset on training text ...")
        offset = calibrate(model, calibration_windows(train_data), s.target_sparsity, s.weighting, ctx, device)
    model.routing_offset = offset
    save_run(out_dir, model, s, s.max_iters, optimizer, (rng_state(), gen.get_state()), offset, final=True)
    summary = final_report(model, s, windows, offset, ctx, device, init_dir, out_dir, train_time,
                           n_tok * (s.max_iters - start_iter))
    if world > 1:
        torch.distributed.destroy_process_group()
    print(json.dumps(summary))


def final_report(model, s, windows, offset, ctx, device, init_dir, out_dir, train_time, tokens_trained):
    from baselines import blocks_for_param_sparsity, shortgpt
    import plots
    print(f"validating on {len(windows)} fixed windows of the held-out plays (deterministic gates) ...")
    with lora.disabled(model):  # the references are the base model (a joint run's LoRA off)
        dense = dense_val_loss(model, windows, ctx, device, Path(s.data_dir))
    routed = evaluate(model, windows, lambda: Routing(mode="hard", offset=offset), ctx=ctx, device=device)
    n_blocks = blocks_for_param_sparsity(model.args.n_layers, routed["param_sparsity"])
    short = {"loss": float("nan"), "ppl": float("nan")}
    if n_blocks > 0:
        with lora.disabled(model):
            pruned, removed, _ = shortgpt(model, calibration_windows(load_split(s.data_dir, "train", model.tokenizer)), n_blocks)
            short = evaluate(pruned, windows, None, ctx=ctx, device=device)
    short_sparsity = n_blocks / model.args.n_layers
    flops = model_flops_per_token(model.args, s.block_size)
    tok_s = tokens_trained / max(train_time, 1e-9)
    # forward + backward of activations only (no weight grads) ~ 2x forward; the teacher adds 1x
    achieved = tok_s * flops * (3 if s.distill else 2)

    rows = [("dense", 0.0, 0.0, 0.0, dense["loss"]),
            (f"SkipGPT routed (offset {offset:+.2f})", routed["param_sparsity"], routed["attn_skip"], routed["mlp_skip"], routed["loss"]),
            (f"ShortGPT, {n_blocks} blocks removed", short_sparsity, short_sparsity, short_sparsity, short["loss"])]
    print(f"\n{'model':<34} {'param sparsity':>14} {'attn skip':>9} {'mlp skip':>9} {'val loss':>9} {'val ppl':>9}")
    for name, ps, a, m, loss in rows:
        print(f"{name:<34} {ps:>14.3f} {a:>9.3f} {m:>9.3f} {loss:>9.3f} {math.exp(loss):>9.1f}")
    print(f"target sparsity {s.target_sparsity} ({s.weighting}); module sparsity {routed['module_sparsity']:.3f}; "
          f"routed ppl / dense ppl = {math.exp(routed['loss'] - dense['loss']):.2f}")
    print(f"training: {train_time:.0f} s, {tok_s:.0f} tokens/s, ~{achieved / 1e9:.1f} GFLOP/s of model math")

    log = JsonlLog(out_dir / "log.jsonl")
    log.write(kind="val", iter=s.max_iters, val_loss=routed["loss"], val_param_sparsity=routed["param_sparsity"],
              val_attn_skip=routed["attn_skip"], val_mlp_skip=routed["mlp_skip"], offset=offset, final=True)
    plots.training_curves(log.read(), out_dir / "curves.png", f"stage 1, target {s.target_sparsity} ({s.weighting})")
    plots.skip_heatmap(routed, out_dir / "skip_rates.png",
                       f"skip rate per block (val, deterministic): param sparsity {routed['param_sparsity']:.3f}")
    print(f"figures: {out_dir / 'curves.png'}, {out_dir / 'skip_rates.png'}")
    summary = {"target_sparsity": s.target_sparsity, "weighting": s.weighting, "recipe": s.recipe,
               "val_sparsity": routed["param_sparsity"] if s.weighting == "params" else routed["module_sparsity"],
               "val_attn_skip": routed["attn_skip"], "val_mlp_skip": routed["mlp_skip"],
               "val_module_sparsity": routed["module_sparsity"], "val_param_sparsity": routed["param_sparsity"],
               "val_loss_dense": dense["loss"], "val_loss_routed": routed["loss"], "val_loss_shortgpt": short["loss"],
               "val_ppl_dense": dense["ppl"], "val_ppl_routed": routed["ppl"], "val_ppl_shortgpt": short["ppl"],
               "shortgpt_blocks": n_blocks, "shortgpt_param_sparsity": short_sparsity, "offset": offset,
               "train_seconds": round(train_time, 1), "train_tokens_per_s": round(tok_s, 1), "out_dir": str(out_dir)}
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    cli(main)
