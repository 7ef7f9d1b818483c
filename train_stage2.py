"""Stage 2 of SkipGPT: recover quality with LoRA while the stage-1 routers stay frozen.

    python train_stage2.py                                   # LoRA on the stage-1 run in out/stage1, ~10 min on a CPU
    python train_stage2.py --dense true                      # the control: the same LoRA on the dense model (out/stage2-dense)
    python train_stage2.py --init_from out/stage1-t0.40 --out_dir out/stage2-t0.40
    python train_stage2.py --merge true                      # also write out_dir/merged: LoRA folded into the weights
    python train_stage2.py --resume true                     # continue an interrupted run
    torchrun --standalone --nproc_per_node=2 train_stage2.py # several GPUs (or CPU processes) with DDP

The base weights and the routers are frozen; only LoRA adapters train (r 16, alpha 32, dropout 0.1
on wq, wv, w1: the paper's q_proj, v_proj, gate_proj; ~1.9M parameters on SmolLM2-135M). Loss per
step: plain next-token cross-entropy of the routed model, no sparsity term (the routers no longer
learn, so nothing could move the sparsity on purpose). The gates are deterministic, as at inference:
execute iff logit0 - logit1 + offset >= 0 with the offset stage 1 calibrated (--gate sample keeps
Gumbel sampling, as the authors' code does). Validation always uses deterministic gates.
With frozen routers nothing needs the skipped outputs, so training runs the fast path (only the
executing tokens go through each sublayer); --fast false runs the masked reference path instead.
Without an --init_from, stage 2 starts from out/stage1, or from the released routers in
pretrained/stage1-smollm2-135m when there is no such run.
"""
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import assets
from checkpoint import (StagingDir, atomic_save_tensors, atomic_torch_save, atomic_write_text, base_reference,
                        file_fingerprint, find_base, read_config, rel_to_root, resolve, save_model_dir)
from common import (JsonlLog, VAL_WINDOWS, all_reduce_mean, dense_val_loss, evaluate, get_batch, load_split, lr_at,
                    model_flops_per_token, parse_settings, prepare_out_dir, rng_state, set_rng_state, setting,
                    setup_ddp, setup_device, val_windows)
from errors import UserError, cli
from lora import add_lora, lora_state_dict, mark_only_lora_trainable, merged_state_dict
from model import Transformer
from router import Routing, routing_stats

STAGE1_RUN = "out/stage1"                         # where train_stage1.py writes by default
PRETRAINED_STAGE1 = "pretrained/stage1-smollm2-135m"  # the routers that ship with the project


@dataclass
class Settings:
    # -- what and where
    out_dir: str = setting("out/stage2", "run directory (LoRA weights, settings, log, figures); out/stage2-dense with --dense")
    init_from: str = setting("auto", f"stage-1 run to start from (auto: {STAGE1_RUN} if it exists, else {PRETRAINED_STAGE1})")
    data_dir: str = setting("data/shakespeare", "directory with train.bin / val.bin / meta.json")
    dense: bool = setting(False, "the control: LoRA on the dense model (routing off) of init_from's base")
    resume: bool = setting(False, "continue the run in out_dir from its last checkpoint")
    overwrite: bool = setting(False, "replace an existing run in out_dir")
    merge: bool = setting(False, "after training, write out_dir/merged: base + LoRA folded into one model (with the routers)")
    # -- the method
    gate: str = setting("hard", "training gates: hard (deterministic, with stage 1's offset) | sample (Gumbel, the authors' code)")
    fast: bool = setting(True, "run each sublayer only on the tokens that execute it (false: the masked reference path)")
    lora_r: int = setting(16, "LoRA rank")
    lora_alpha: float = setting(32.0, "LoRA alpha: the update is scaled by alpha / r")
    lora_dropout: float = setting(0.1, "dropout on the LoRA branch input")
    lora_targets: str = setting("wq,wv,w1", "comma-separated linear layers that get LoRA (Meta names: wq wk wv wo w1 w2 w3)")
    # -- optimization
    max_iters: int = setting(100, "optimizer steps")
    batch_size: int = setting(4, "sequences per micro-batch")
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step (per process)")
    block_size: int = setting(128, "tokens per training sequence")
    learning_rate: float = setting(2e-4, "AdamW learning rate (paper 2e-4)")
    lr_schedule: str = setting("cosine", "cosine (paper, with warmup_frac of linear warmup) | constant")
    warmup_frac: float = setting(0.1, "linear learning-rate warmup over this fraction of the steps (cosine schedule)")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    grad_clip: float = setting(1.0, "clip the LoRA gradient norm (0 = off)")
    # -- evaluation and logging
    eval_interval: int = setting(50, "validate every N steps (and at the end)")
    eval_iters: int = setting(12, f"validation windows used by periodic validation (the final one uses all {VAL_WINDOWS})")
    log_interval: int = setting(1, "log a training step every N steps")
    # -- system
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = setting("auto", "auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16")
    seed: int = setting(1337, "random seed (batches, LoRA init and dropout)")
    threads: int = setting(0, "CPU threads for torch (0 = torch's default)")

    def __post_init__(self):
        for name, allowed in [("gate", ("hard", "sample")), ("lr_schedule", ("constant", "cosine"))]:
            if getattr(self, name) not in allowed:
                raise UserError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("max_iters", "batch_size", "gradient_accumulation_steps", "block_size", "eval_interval",
                     "eval_iters", "log_interval", "lora_r"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.warmup_frac < 1:
            raise UserError(f"--warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if not self.targets():
            raise UserError("--lora_targets is empty; name layers such as wq,wv,w1")

    def targets(self):
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    def lora_config(self):
        return {"r": self.lora_r, "alpha": self.lora_alpha, "dropout": self.lora_dropout, "targets": list(self.targets())}


def stage1_dir(init_from, dense):
    """The run to start from: --init_from, else out/stage1, else the routers that ship with the project."""
    if init_from != "auto":
        return resolve(init_from)
    for candidate in (STAGE1_RUN, PRETRAINED_STAGE1):
        if (resolve(candidate) / "config.json").exists():
            if candidate == PRETRAINED_STAGE1:
                print(f"note: no stage-1 run in {STAGE1_RUN} (train one with python train_stage1.py); "
                      f"using the released routers in {PRETRAINED_STAGE1}")
            return resolve(candidate)
    if dense:  # the control needs no routers: the default base model will do
        return assets.ensure_default_model()
    raise UserError(f"no stage-1 run to start from: neither {STAGE1_RUN} nor {PRETRAINED_STAGE1} exists; "
                    f"train one with python train_stage1.py, or pass --init_from RUN_DIR")


def load_start(init_dir, dense, device="cpu"):
    """-> (model, stage-1 config or None): the stage-1 run (routers on), or for the control its base."""
    cfg = read_config(init_dir)
    fmt = cfg.get("format")
    if fmt == "stage2":
        raise UserError(f"--init_from {init_dir} is a stage-2 run; start from a stage-1 run (to continue it, pass "
                        f"--out_dir {init_dir} --resume true)")
    if dense:
        base_dir = init_dir if fmt == "model" else find_base(cfg["base"], init_dir)
        return Transformer.from_checkpoint(base_dir, device=device), None
    if fmt != "stage1":
        raise UserError(f"--init_from {init_dir} is a converted model without routers; stage 2 starts from a "
                        f"stage-1 run (python train_stage1.py), or pass --dense true for the dense control")
    if not cfg.get("finished", True):
        print(f"note: {init_dir} is an unfinished stage-1 run (step {cfg.get('iter')}, offset not calibrated)")
    return Transformer.from_checkpoint(init_dir, device=device), cfg


def stage1_reference(init_dir):
    """How a stage-2 run refers to its stage-1 run: path, and a hash of its routers."""
    return {"path": rel_to_root(init_dir), "fingerprint": file_fingerprint(init_dir / "routers.safetensors")}


def make_routing(model, s):
    if model.router_cfg is None:  # the dense control
        return None
    if s.gate == "sample":
        return Routing(mode="sample", fast=s.fast)
    return Routing(mode="hard", offset=model.routing_offset, fast=s.fast)


def forward_loss(model, x, y, routing, ctx):
    """The one place stage 2 runs the model.

    With frozen routers no gradient needs a skipped sublayer's output, so by default (routing.fast)
    each sublayer runs only on the tokens that execute it: the same loss as the masked path, less work.
    """
    with ctx:
        _, loss = model(x, y, routing=routing)
    return loss


def train_step_loss(model, x, y, s, ctx):
    """One micro-batch: the loss, and what to log."""
    routing = make_routing(model, s)
    loss = forward_loss(model, x, y, routing, ctx)
    info = {"task": loss.item()}
    if routing is not None:
        info["train_sparsity"] = routing_stats(routing.gate_tensor(), model.args, model.router_cfg.kv)["param_sparsity"]
    return loss, info


def save_run(out_dir, model, s, it, optimizer, rngs, stage1, final=False):
    """config.json + lora.safetensors (what the run is) and ckpt.pt (how to resume it), atomically.

    rngs: (torch RNG state, batch generator state) as they were when step `it` began, so a resumed
    run draws the same batches and LoRA dropout masks as an uninterrupted one.
    """
    cfg = {"format": "stage2", "base": base_reference(model), "stage1": stage1, "lora": s.lora_config(),
           "iter": it, "finished": final, "settings": dataclasses.asdict(s)}
    atomic_save_tensors(lora_state_dict(model), out_dir / "lora.safetensors")
    atomic_torch_save({"iter": it, "optimizer": optimizer.state_dict(), "rng": rngs[0],
                       "batch_rng": rngs[1]}, out_dir / "ckpt.pt")
    atomic_write_text(out_dir / "config.json", json.dumps(cfg, indent=2))


def save_merged(model, out_dir, stage1_cfg):
    """out_dir/merged: LoRA folded into the base weights, loadable by Transformer.from_checkpoint.

    Dense control: a converted model directory. Routed: merged/model is that directory, and merged/
    itself is a stage-1 run on it (the same routers and offset), so loading merged/ gives the routed model.
    """
    state = merged_state_dict(model)
    if model.args.tie_embeddings:
        state.pop("output.weight", None)  # the head is the embedding; stored once
    target = Path(out_dir) / "merged"
    source = {"merged_from": rel_to_root(out_dir), "base": base_reference(model)}
    if stage1_cfg is None:
        return save_model_dir(target, state, model.args, model.tokenizer, source, overwrite=True)
    with StagingDir(target, overwrite=True) as tmp:
        save_model_dir(tmp / "model", state, model.args, model.tokenizer, source)
        cfg = dict(stage1_cfg, base={"path": rel_to_root(target / "model"),
                                     "fingerprint": read_config(tmp / "model")["fingerprint"]},
                   router=model.router_cfg.to_dict(), offset=model.routing_offset, finished=True,
                   merged_from={"stage2": rel_to_root(out_dir), "base": base_reference(model)})
        atomic_save_tensors(model.router_state_dict(), tmp / "routers.safetensors")
        atomic_write_text(tmp / "config.json", json.dumps(cfg, indent=2))
    return target


def main(argv=None):
    s, explicit = parse_settings(Settings, __doc__, argv)
    if s.dense and "out_dir" not in explicit:
        s = dataclasses.replace(s, out_dir="out/stage2-dense")
    rank, world, local = setup_ddp()
    master = rank == 0
    if s.threads:
        torch.set_num_threads(s.threads)
    device, dtype, ctx = setup_device(s.device if world == 1 or s.device != "auto" or not torch.cuda.is_available()
                                      else f"cuda:{local}", s.dtype)
    out_dir = Path(s.out_dir)
    if master:
        prepare_out_dir(out_dir, s.resume, s.overwrite, "stage-2")
    if world > 1:
        torch.distributed.barrier()
    run_cfg = None
    if s.resume:  # the run's own settings, unless given again on the command line
        run_cfg = read_config(out_dir)
        s = dataclasses.replace(s, **{k: v for k, v in run_cfg["settings"].items()
                                      if k not in explicit and k not in ("resume", "overwrite")})
        if run_cfg["stage1"] and "init_from" not in explicit:  # the stage-1 run it was trained on
            s = dataclasses.replace(s, init_from=run_cfg["stage1"]["path"])

    # -- model: the frozen base with its frozen stage-1 routers (none for the control)
    init_dir = stage1_dir(s.init_from, s.dense)
    model, stage1_cfg = load_start(init_dir, s.dense, device)
    stage1 = None if s.dense else stage1_reference(init_dir)
    if run_cfg is not None:
        if run_cfg["base"]["fingerprint"] != model.source["fingerprint"]:
            raise UserError(f"--resume: {out_dir} holds LoRA weights for base {run_cfg['base']['path']} "
                            f"(fingerprint {run_cfg['base']['fingerprint']}), not for {model.source['path']}")
        if (run_cfg["stage1"] or {}).get("fingerprint") != (stage1 or {}).get("fingerprint"):
            raise UserError(f"--resume: {out_dir} was trained on the routers of {(run_cfg['stage1'] or {}).get('path')}, "
                            f"which differ from those in {init_dir}")
        if run_cfg["lora"] != s.lora_config():
            raise UserError(f"--resume: the LoRA settings differ from those {out_dir} was trained with")

    # -- data
    base_dir = resolve(model.source["path"])
    data_dir = Path(s.data_dir)
    if data_dir.resolve() == assets.SHAKESPEARE_DIR.resolve():
        assets.ensure_shakespeare(base_dir)
    train_data = load_split(data_dir, "train", model.tokenizer)
    val_data = load_split(data_dir, "val", model.tokenizer)
    windows = val_windows(val_data)
    log = JsonlLog(out_dir / "log.jsonl", enabled=master)

    # -- the references, before any adapter: dense, and routed as stage 1 left it
    def routed_val(n_windows):  # deterministic gates, whatever the training gates
        routing = (lambda: Routing(mode="hard", offset=model.routing_offset)) if model.router_cfg is not None else None
        return evaluate(model, windows[:n_windows], routing, ctx=ctx, device=device)

    def log_val(it, st):
        log.write(kind="val", iter=it, val_loss=st["loss"],
                  **{f"val_{k}": st[k] for k in ("param_sparsity", "attn_skip", "mlp_skip", "module_sparsity") if k in st})
        return st

    ref = {}
    if master:
        print("validating the starting point (dense" + ("" if s.dense else ", stage-1 routed") + ") ...")
        ref["dense"] = dense_val_loss(model, windows, ctx, device, data_dir)
        ref["dense_sub"] = dense_val_loss(model, windows[:s.eval_iters], ctx, device, data_dir)
        if not s.dense:
            ref["stage1"], ref["stage1_sub"] = routed_val(VAL_WINDOWS), routed_val(s.eval_iters)
        if not s.resume:  # step 0 of the curves: where LoRA starts (B = 0 changes nothing)
            log_val(0, ref["dense_sub" if s.dense else "stage1_sub"])

    # -- adapters: everything else frozen
    torch.manual_seed(s.seed)  # the same LoRA init on every process
    add_lora(model, s.targets(), s.lora_r, s.lora_alpha, s.lora_dropout)
    lora_params = mark_only_lora_trainable(model)
    optimizer = torch.optim.AdamW(lora_params, lr=s.learning_rate, weight_decay=s.weight_decay)
    start_iter = 0
    gen = torch.Generator().manual_seed(s.seed + rank)
    torch.manual_seed(s.seed + rank)
    if s.resume:
        from safetensors.torch import load_file
        model.load_state_dict(load_file(out_dir / "lora.safetensors", device=str(device)), strict=False)
        state = torch.load(out_dir / "ckpt.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        gen.set_state(state["batch_rng"])
        start_iter = state["iter"]

    n_tok = s.batch_size * s.block_size * s.gradient_accumulation_steps * world
    warmup_iters = int(s.warmup_frac * s.max_iters)
    if master:
        start = model.source["path"] if s.dense else rel_to_root(init_dir)
        how = "dense model (control)" if s.dense else f"routers frozen, {s.gate} gates, offset {model.routing_offset:+.2f}"
        print(f"stage 2: {start} -> {out_dir} | {sum(p.numel() for p in lora_params):,} LoRA parameters trainable "
              f"(r {s.lora_r}, alpha {s.lora_alpha:g} on {','.join(s.targets())}), {how} | CE | {s.max_iters} steps "
              f"x {n_tok} tokens | {device} {dtype}{f' x{world}' if world > 1 else ''}")

    # -- training loop
    model.train()
    t0, it, last, val_time = time.time(), start_iter, {}, 0.0
    step_rngs = (rng_state(), gen.get_state())
    bar = tqdm(range(start_iter, s.max_iters), initial=start_iter, total=s.max_iters, desc="stage 2",
               disable=not master, dynamic_ncols=True)
    try:
        for it in bar:
            step_rngs = (rng_state(), gen.get_state())  # what a resume from this step must restore
            lr = lr_at(it, s.max_iters, s.learning_rate, s.lr_schedule, warmup_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            stats = []
            for _ in range(s.gradient_accumulation_steps):
                x, y = get_batch(train_data, s.batch_size, s.block_size, gen, device)
                loss, info = train_step_loss(model, x, y, s, ctx)
                (loss / s.gradient_accumulation_steps).backward()
                stats.append(info | {"loss": loss.item()})
            if world > 1:  # ~2M LoRA numbers: average their gradients by hand (no DDP wrapper needed)
                for p in lora_params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    all_reduce_mean(p.grad, world)
            if s.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(lora_params, s.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            last = {k: sum(d[k] for d in stats) / len(stats) for k in stats[0]}
            bar.set_postfix(loss=f"{last['loss']:.3f}", **({"sp": f"{last['train_sparsity']:.3f}"}
                                                          if "train_sparsity" in last else {}), lr=f"{lr:.1e}")
            if it % s.log_interval == 0:
                log.write(kind="train", iter=it, lr=lr, time=time.time() - t0, **last)
            if master and ((it + 1) % s.eval_interval == 0 and it + 1 < s.max_iters):
                t_val = time.time()
                st = log_val(it + 1, routed_val(s.eval_iters))
                msg = f"step {it + 1}: val loss {st['loss']:.3f} (ppl {st['ppl']:.1f}) | dense {ref['dense_sub']['loss']:.3f}"
                if not s.dense:
                    msg += (f", stage 1 {ref['stage1_sub']['loss']:.3f} | param sparsity {st['param_sparsity']:.3f} "
                            f"(stage 1 {ref['stage1_sub']['param_sparsity']:.3f})")
                bar.write(msg)
                save_run(out_dir, model, s, it + 1, optimizer, (rng_state(), gen.get_state()), stage1)
                val_time += time.time() - t_val
        it = s.max_iters
    except KeyboardInterrupt:
        if master:  # the interrupted step is redone on resume: save the state from before it
            optimizer.zero_grad(set_to_none=True)
            save_run(out_dir, model, s, it, optimizer, step_rngs, stage1)
            print(f"\ninterrupted at step {it}; saved. Continue with: python train_stage2.py --out_dir {out_dir} --resume true",
                  file=sys.stderr)
        sys.exit(130)
    bar.close()
    train_time = time.time() - t0 - val_time  # training alone: tokens/s without the periodic validation
    if not master:
        torch.distributed.destroy_process_group()
        return

    # -- save, validate, report
    save_run(out_dir, model, s, s.max_iters, optimizer, (rng_state(), gen.get_state()), stage1, final=True)
    summary = final_report(model, s, windows, ref, ctx, device, out_dir, train_time,
                           n_tok * (s.max_iters - start_iter), routed_val)
    if s.merge:
        print(f"merged checkpoint: {save_merged(model, out_dir, stage1_cfg)}")
    if world > 1:
        torch.distributed.destroy_process_group()
    print(json.dumps(summary))


def final_report(model, s, windows, ref, ctx, device, out_dir, train_time, tokens_trained, routed_val):
    import plots
    print(f"validating on {len(windows)} fixed windows of the held-out plays (deterministic gates) ...")
    tuned = routed_val(len(windows))
    dense = ref["dense"]
    flops = model_flops_per_token(model.args, s.block_size)
    tok_s = tokens_trained / max(train_time, 1e-9)
    # forward + backward of activations, plus the small LoRA weight gradients ~ 2x forward
    achieved = tok_s * flops * 2

    if s.dense:
        rows = [("dense", 0.0, 0.0, 0.0, dense["loss"]), ("dense + LoRA (control)", 0.0, 0.0, 0.0, tuned["loss"])]
    else:
        st1 = ref["stage1"]
        rows = [("dense", 0.0, 0.0, 0.0, dense["loss"]),
                (f"stage 1 routed (offset {model.routing_offset:+.2f})", st1["param_sparsity"], st1["attn_skip"],
                 st1["mlp_skip"], st1["loss"]),
                ("stage 1 + LoRA (stage 2)", tuned["param_sparsity"], tuned["attn_skip"], tuned["mlp_skip"], tuned["loss"])]
    print(f"\n{'model':<34} {'param sparsity':>14} {'attn skip':>9} {'mlp skip':>9} {'val loss':>9} {'val ppl':>9}")
    for name, ps, a, m, loss in rows:
        print(f"{name:<34} {ps:>14.3f} {a:>9.3f} {m:>9.3f} {loss:>9.3f} {math.exp(loss):>9.1f}")
    if not s.dense:
        print(f"routed ppl / dense ppl: stage 1 {math.exp(ref['stage1']['loss'] - dense['loss']):.2f}, "
              f"stage 2 {math.exp(tuned['loss'] - dense['loss']):.2f} (the routers are frozen, but LoRA changes "
              f"what they read: sparsity {ref['stage1']['param_sparsity']:.3f} -> {tuned['param_sparsity']:.3f})")
    print(f"training: {train_time:.0f} s, {tok_s:.0f} tokens/s, ~{achieved / 1e9:.1f} GFLOP/s of model math")

    log = JsonlLog(out_dir / "log.jsonl")
    log.write(kind="val", iter=s.max_iters, val_loss=tuned["loss"], final=True,
              **{f"val_{k}": tuned[k] for k in ("param_sparsity", "attn_skip", "mlp_skip") if k in tuned})
    plots.training_curves(log.read(), out_dir / "curves.png",
                          "stage 2: " + ("dense + LoRA (control)" if s.dense else "stage-1 routers + LoRA"))
    print(f"figure: {out_dir / 'curves.png'}")
    summary = {"val_loss_dense": dense["loss"], "val_ppl_dense": dense["ppl"]}
    if s.dense:
        summary |= {"val_loss_dense_lora": tuned["loss"], "val_ppl_dense_lora": tuned["ppl"], "val_sparsity": 0.0}
    else:
        summary |= {"val_loss_stage1": ref["stage1"]["loss"], "val_loss_stage2": tuned["loss"],
                    "val_ppl_stage1": ref["stage1"]["ppl"], "val_ppl_stage2": tuned["ppl"],
                    "val_sparsity": tuned["param_sparsity"], "val_sparsity_stage1": ref["stage1"]["param_sparsity"],
                    "val_attn_skip": tuned["attn_skip"], "val_mlp_skip": tuned["mlp_skip"],
                    "val_module_sparsity": tuned["module_sparsity"], "offset": model.routing_offset, "gate": s.gate}
    summary |= {"lora_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "train_seconds": round(train_time, 1), "train_tokens_per_s": round(tok_s, 1), "out_dir": str(out_dir)}
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    cli(main)
