"""Stage 2 of SkipGPT: recover quality with LoRA while the stage-1 routers stay frozen.

    python train_stage2.py                                   # LoRA on the stage-1 run in out/stage1, ~10 min on a CPU
    python train_stage2.py --dense true                      # the control: the same LoRA on the dense model (out/stage2-dense)
    python train_stage2.py --shortgpt 12                     # the static control: the same LoRA on ShortGPT, 12 blocks removed
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
pretrained/stage1-smollm2-135m when there is no such run. The step is Stage.loss; the loop that runs
it (batches, checkpoints, resume, DDP) is training.py's, shared with stage 1.
"""
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

import baselines
import lora
from checkpoint import (RUN_VERSION, StagingDir, atomic_save_tensors, atomic_write_text, base_reference,
                        file_fingerprint, find_base, load, read_config, rel_to_root, resolve, save_model_dir)
from common import calibration_windows, dense_val_loss, ensure_data, evaluate, load_split, parse_settings, setting
from convert import ensure_default_model
from errors import UserError, cli
from router import Routing, routing_stats
from training import LR_SCHEDULES, TrainSettings, print_comparison, train, val_routing

STAGE1_RUN = "out/stage1"                         # where train_stage1.py writes by default
PRETRAINED_STAGE1 = "pretrained/stage1-smollm2-135m"  # the routers that ship with the project


@dataclass
class Settings(TrainSettings):
    # -- what and where
    out_dir: str = setting("out/stage2", "run directory (LoRA weights, settings, log, figures); out/stage2-dense with --dense")
    init_from: str = setting("auto", f"stage-1 run to start from (auto: {STAGE1_RUN} if it exists, else {PRETRAINED_STAGE1})")
    dense: bool = setting(False, "the control: LoRA on the dense model (routing off) of init_from's base")
    shortgpt: int = setting(0, "the static control: LoRA on init_from's base without ShortGPT's N lowest-Block-"
                               "Influence blocks (measured on the training text, as stage 1's ShortGPT row); 0 = off",
                            must_be=">= 0")
    merge: bool = setting(False, "after training, write out_dir/merged: base + LoRA folded into one model (with the routers)")
    # -- the method
    gate: str = setting("hard", "training gates: hard (deterministic, with stage 1's offset) | sample (Gumbel, the "
                                "authors' code)", choices=("hard", "sample"))
    fast: bool = setting(True, "run each sublayer only on the tokens that execute it (false: the masked reference path)")
    lora_r: int = setting(16, "LoRA rank", must_be=">= 1")
    lora_alpha: float = setting(32.0, "LoRA alpha: the update is scaled by alpha / r")
    lora_dropout: float = setting(0.1, "dropout on the LoRA branch input", must_be="in [0, 1)")
    lora_targets: str = setting("wq,wv,w1", "comma-separated linear layers that get LoRA (Meta names: wq wk wv wo w1 "
                                            "w2 w3)", must_be="non-empty")
    # -- optimization
    learning_rate: float = setting(2e-4, "AdamW learning rate (paper 2e-4)")
    lr_schedule: str = setting("cosine", "cosine (paper, with warmup_frac of linear warmup) | constant",
                               choices=LR_SCHEDULES)
    warmup_frac: float = setting(0.1, "linear learning-rate warmup over this fraction of the steps (cosine schedule)",
                                 must_be="in [0, 1)")
    weight_decay: float = setting(0.0, "AdamW weight decay")

    def warmup_steps(self):
        return int(self.warmup_frac * self.max_iters)

    def control(self):
        """No routers: LoRA on the dense model, or on ShortGPT's statically pruned one."""
        return self.dense or self.shortgpt > 0

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
        return ensure_default_model()
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
        return load(base_dir, device=device), None
    if fmt != "stage1":
        raise UserError(f"--init_from {init_dir} is a converted model without routers; stage 2 starts from a "
                        f"stage-1 run (python train_stage1.py), or pass --dense true for the dense control")
    if not cfg.get("finished", True):
        print(f"note: {init_dir} is an unfinished stage-1 run (step {cfg.get('iter')}, offset not calibrated)")
    return load(init_dir, device=device), cfg


def stage1_reference(init_dir):
    """How a stage-2 run refers to its stage-1 run: path, and a hash of its routers."""
    return {"path": rel_to_root(init_dir), "fingerprint": file_fingerprint(init_dir / "routers.safetensors")}


def make_routing(model, s):
    if model.router_cfg is None:  # the dense control
        return None
    if s.gate == "sample":
        return Routing(mode="sample", fast=s.fast)
    return Routing(mode="hard", offset=model.routing_offset, fast=s.fast)


def save_merged(model, out_dir, stage1_cfg):
    """out_dir/merged: LoRA folded into the base weights, loadable by checkpoint.load.

    Dense control: a converted model directory. Routed: merged/model is that directory, and merged/
    itself is a stage-1 run on it (the same routers and offset), so loading merged/ gives the routed model.
    """
    state = lora.merged_state_dict(model)
    if model.args.tie_embeddings:
        state.pop("output.weight", None)  # the head is the embedding; stored once
    target = Path(out_dir) / "merged"
    source = {"merged_from": rel_to_root(out_dir), "base": base_reference(model)}
    if stage1_cfg is None:
        return save_model_dir(target, state, model.args, model.tokenizer, source, overwrite=True)
    with StagingDir(target, overwrite=True) as tmp:
        save_model_dir(tmp / "model", state, model.args, model.tokenizer, source)
        cfg = dict(stage1_cfg, version=RUN_VERSION, base={"path": rel_to_root(target / "model"),
                                                          "fingerprint": read_config(tmp / "model")["fingerprint"]},
                   router=model.router_cfg.to_dict(), offset=model.routing_offset, finished=True,
                   merged_from={"stage2": rel_to_root(out_dir), "base": base_reference(model)})
        atomic_save_tensors(model.router_state_dict(), tmp / "routers.safetensors")
        atomic_write_text(tmp / "config.json", json.dumps(cfg, indent=2))
    return target


class Stage:
    NAME, FORMAT = "stage 2", "stage2"
    validate_start = True  # step 0 of the curves: where LoRA starts (B = 0 changes nothing)
    passes_per_token = 2  # forward + backward of the activations (the LoRA weight gradients are small)

    def build(self, s, device, resume_cfg):
        """The frozen base with its frozen stage-1 routers (none for the controls), plus LoRA.
        -> (model, param groups, init_dir: the stage-1 run, or for a control its base model directory)"""
        init_from = s.init_from
        if resume_cfg is not None and resume_cfg["stage1"] and init_from == "auto":
            init_from = resume_cfg["stage1"]["path"]  # the stage-1 run it was trained on
        init_dir = stage1_dir(init_from, s.control())
        model, self.stage1_cfg = load_start(init_dir, s.control(), device)
        self.stage1 = None if s.control() else stage1_reference(init_dir)
        self.unpruned = model  # the dense reference (ShortGPT's pruned model shares its weights)
        if s.shortgpt:
            model = self.prune(model, s)
        if resume_cfg is not None:
            if resume_cfg["base"]["fingerprint"] != model.source["fingerprint"]:
                raise UserError(f"--resume: {s.out_dir} holds LoRA weights for base {resume_cfg['base']['path']} "
                                f"(fingerprint {resume_cfg['base']['fingerprint']}), not for {model.source['path']}")
            if (resume_cfg["stage1"] or {}).get("fingerprint") != (self.stage1 or {}).get("fingerprint"):
                raise UserError(f"--resume: {s.out_dir} was trained on the routers of "
                                f"{(resume_cfg['stage1'] or {}).get('path')}, which differ from those in {init_dir}")
            if resume_cfg["lora"] != s.lora_config():
                raise UserError(f"--resume: the LoRA flags given differ from those {s.out_dir} was trained with; "
                                f"resume without them")
            if resume_cfg.get("removed_blocks", []) != getattr(model, "removed_blocks", []):
                raise UserError(f"--resume: {s.out_dir} was trained without blocks {resume_cfg.get('removed_blocks', [])}, "
                                f"but these settings remove {getattr(model, 'removed_blocks', [])}")
        torch.manual_seed(s.seed)  # the same LoRA init on every process
        lora.add_lora(model, s.targets(), s.lora_r, s.lora_alpha, s.lora_dropout)
        groups = [{"params": lora.mark_only_lora_trainable(model), "lr": s.learning_rate,
                   "weight_decay": s.weight_decay}]
        how = (f"{self.label(s)} (control)" if s.control()
               else f"routers frozen, {s.gate} gates, offset {model.routing_offset:+.2f}")
        self.about = f"LoRA r {s.lora_r}, alpha {s.lora_alpha:g} on {','.join(s.targets())}; {how} | CE"
        self.title = "stage 2: " + (f"{self.label(s)} + LoRA (control)" if s.control() else "stage-1 routers + LoRA")
        return model, groups, model.source["path"] if s.control() else rel_to_root(init_dir)

    def prune(self, model, s):
        """The static control's model: ShortGPT's s.shortgpt blocks removed, chosen on training text."""
        if s.shortgpt >= model.args.n_layers:
            raise UserError(f"--shortgpt {s.shortgpt}: the model has {model.args.n_layers} blocks; remove fewer")
        ensure_data(s.data_dir, model.tokenizer)
        self.calib = calibration_windows(load_split(s.data_dir, "train", model.tokenizer))
        pruned, removed, _ = baselines.shortgpt(model, self.calib, s.shortgpt)
        print(f"ShortGPT: blocks {removed} removed (lowest Block Influence on the training text of {s.data_dir})")
        return pruned

    def label(self, s):
        return f"ShortGPT, {s.shortgpt} blocks removed" if s.shortgpt else "dense"

    def loss(self, model, x, y, it, s, ctx, all_reduce):
        """One micro-batch: the routed model's cross-entropy, on the fast path by default; what to log."""
        with ctx:
            _, loss, gates = model(x, y, routing=make_routing(model, s))
        info = {"task": loss.item()}
        if gates is not None:
            info["train_sparsity"] = routing_stats(gates, model.args, model.router_cfg.kv)["param_sparsity"]
        return loss, info

    def run_config(self, model, s):
        return {"stage1": self.stage1, "lora": s.lora_config()} | (
            {"removed_blocks": model.removed_blocks} if s.shortgpt else {})

    def trained(self, model):
        return {"lora.safetensors": lora.lora_state_dict(model)}

    def finish(self, model, s, windows, train_data, ctx, device, out_dir):
        """Compare dense, where LoRA started and where it ended on the validation windows; merge on request."""
        print(f"validating on {len(windows)} fixed validation windows (deterministic gates) ...")
        with lora.disabled(model):  # the references, adapters off (the pruned model's blocks are the unpruned one's)
            dense = dense_val_loss(self.unpruned, windows, ctx, device, s.data_dir)
            if s.shortgpt:
                start = baselines.shortgpt_val(self.unpruned, self.calib, windows, s.shortgpt, ctx, device, s.data_dir)
            elif not s.dense:
                start = evaluate(model, windows, val_routing(model), ctx=ctx, device=device)
        tuned = evaluate(model, windows, val_routing(model), ctx=ctx, device=device)
        rows = [("dense", 0.0, 0.0, 0.0, dense["loss"])]
        if s.dense:
            rows.append(("dense + LoRA (control)", 0.0, 0.0, 0.0, tuned["loss"]))
        elif s.shortgpt:
            share = s.shortgpt / self.unpruned.args.n_layers
            rows += [(self.label(s), share, share, share, start["loss"]),
                     (f"{self.label(s)} + LoRA (control)", share, share, share, tuned["loss"])]
        else:
            rows += [(f"stage 1 routed (offset {model.routing_offset:+.2f})", start["param_sparsity"], start["attn_skip"],
                      start["mlp_skip"], start["loss"]),
                     ("stage 1 + LoRA (stage 2)", tuned["param_sparsity"], tuned["attn_skip"], tuned["mlp_skip"],
                      tuned["loss"])]
        print_comparison(rows, width=38)
        if not s.control():
            print(f"routed ppl / dense ppl: stage 1 {math.exp(start['loss'] - dense['loss']):.2f}, "
                  f"stage 2 {math.exp(tuned['loss'] - dense['loss']):.2f} (the routers are frozen, but LoRA changes "
                  f"what they read: sparsity {start['param_sparsity']:.3f} -> {tuned['param_sparsity']:.3f})")
        summary = {"val_loss_dense": dense["loss"], "val_ppl_dense": dense["ppl"]}
        if s.dense:
            summary |= {"val_loss_dense_lora": tuned["loss"], "val_ppl_dense_lora": tuned["ppl"], "val_sparsity": 0.0}
        elif s.shortgpt:
            summary |= {"val_loss_shortgpt": start["loss"], "val_ppl_shortgpt": start["ppl"],
                        "val_loss_shortgpt_lora": tuned["loss"], "val_ppl_shortgpt_lora": tuned["ppl"],
                        "removed_blocks": model.removed_blocks, "val_sparsity": rows[-1][1]}
        else:
            summary |= {"val_loss_stage1": start["loss"], "val_loss_stage2": tuned["loss"],
                        "val_ppl_stage1": start["ppl"], "val_ppl_stage2": tuned["ppl"],
                        "val_sparsity": tuned["param_sparsity"], "val_sparsity_stage1": start["param_sparsity"],
                        "val_attn_skip": tuned["attn_skip"], "val_mlp_skip": tuned["mlp_skip"],
                        "val_module_sparsity": tuned["module_sparsity"], "offset": model.routing_offset, "gate": s.gate}
        summary["lora_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        summary["final_val"] = {"val_loss": tuned["loss"], **{f"val_{k}": tuned[k] for k in
                                                               ("param_sparsity", "attn_skip", "mlp_skip") if k in tuned}}
        if s.merge:
            print(f"merged checkpoint: {save_merged(model, out_dir, self.stage1_cfg)}")
        return summary


def main(argv=None):
    s, explicit = parse_settings(Settings, __doc__, argv)
    if s.control() and "out_dir" not in explicit:
        s = dataclasses.replace(s, out_dir=f"out/stage2-shortgpt{s.shortgpt}" if s.shortgpt else "out/stage2-dense")
    return train(Stage(), s, explicit)


if __name__ == "__main__":
    cli(main)
