"""Stage 1 of SkipGPT: tune the routers of a frozen model to skip a target share of its work.

    python train_stage1.py                                   # SmolLM2-135M on general English, 25% of block params, ~10 min on a CPU
    python train_stage1.py --data_dir data/shakespeare --out_dir out/stage1-plays   # on the plays (the in-domain case)
    python train_stage1.py --target_sparsity 0.4 --out_dir out/stage1-t0.40
    python train_stage1.py --recipe paper --out_dir out/stage1-paper   # the paper's literal recipe (collapses in a short run)
    python train_stage1.py --resume true                     # continue an interrupted run
    torchrun --standalone --nproc_per_node=2 train_stage1.py # several GPUs (or CPU processes) with DDP

Every base weight is frozen; only the ~70k router parameters train. Loss per step:
    task + alpha * |target_now - s|
where task is the KL divergence from the dense model's predictions (distill, default) or plain
cross-entropy (the paper), s the share of block parameters (or modules) skipped under Gumbel gates
over the whole batch (all processes), and target_now ramps from 0 to the target over the first
sparsity_warmup of the steps. The gates are hard straight-through Gumbel-softmax samples, tau
annealed linearly from tau_start to tau_end. Training runs the masked path: a skipped sublayer is
still computed (times 0) because the gate's gradient needs its output. After training, a logit
offset is calibrated on training text so that deterministic routing skips exactly the target;
validation always uses deterministic gates. The step is `loss` below; the loop that runs it
(batches, checkpoints, resume, DDP) is training.py's, shared with stage 2.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import lora
import plots
from baselines import shortgpt_matched
from checkpoint import load
from common import CALIB_WINDOWS, calibration_windows, dense_val_loss, evaluate, parse_settings, setting
from convert import ensure_default_model
from errors import UserError, cli
from router import RouterConfig, Routing, calibrate_offset, sparsity_loss
from training import TrainSettings, print_comparison, train, val_routing

DEFAULT_MODEL = "checkpoints/smollm2-135m"  # converted on first use (convert.py --default)

# The paper's recipe, as its text states it (--recipe paper): raw residual input, Kaiming weight + zero
# bias, module-count sparsity, alpha 8, constant lr 2e-3, CE loss, no warm-up, no protected blocks or
# tokens, the MLP router reading the post-attention state, no calibration, and validation under sampled
# gates beside the deterministic one. Where the authors' code differs, README's deviations table says so.
RECIPES = {
    "skipgpt": {},
    "paper": dict(router_norm=False, router_init="paper", weighting="modules", alpha=8.0, learning_rate=2e-3,
                  lr_schedule="constant", warmup_iters=0, weight_decay=0.01, distill=False, sparsity_warmup=0.0,
                  protect_first=0, protect_first_tokens=0, mlp_input="post_attn", calibrate=False, val_sampled=True),
}


@dataclass
class Settings(TrainSettings):
    # -- what and where
    out_dir: str = setting("out/stage1", "run directory (router weights, settings, log, figures)")
    init_from: str = setting(DEFAULT_MODEL, "converted base model directory")
    recipe: str = setting("skipgpt", "skipgpt: defaults that work in a short CPU run | paper: the paper's literal recipe",
                          choices=tuple(RECIPES))
    # -- the method
    target_sparsity: float = setting(0.25, "share of block parameters (or modules, see weighting) to skip",
                                     must_be="in [0, 1)")
    alpha: float = setting(8.0, "weight of the sparsity loss alpha * |target - s| (paper 8, authors' code 20)",
                           must_be=">= 0")
    weighting: str = setting("params", "sparsity counts skipped block parameters (params) or (token, module) pairs "
                                       "(modules)", choices=("params", "modules"))
    budget: str = setting("global", "one budget over all blocks (global) or every block on its own (per_layer)",
                          choices=("global", "per_layer"))
    sparsity_warmup: float = setting(0.3, "ramp the target up from 0 over this fraction of the steps (0 = off)",
                                     must_be="in [0, 1)")
    distill: bool = setting(True, "task loss = KL(dense model || routed model) instead of cross-entropy")
    tau_start: float = setting(5.0, "Gumbel temperature at the first step", must_be="> 0")
    tau_end: float = setting(1.0, "Gumbel temperature at the last step", must_be="> 0")
    router_kind: str = setting("linear", "linear (dim -> 2) | mlp (dim -> dim/4 -> 2, the authors' code)",
                               choices=("linear", "mlp"))
    mlp_input: str = setting("block", "MLP router reads the block input (block, the authors' code) or the "
                                      "post-attention state (post_attn, the paper's text)", choices=("block", "post_attn"))
    router_norm: bool = setting(True, "RMS-normalize the router input (the raw stream has norms ~100-700)")
    router_init: str = setting("execute", "execute: bias (+2, -2) so ~2% skip at start | paper: zero bias",
                               choices=("execute", "paper"))
    kv: str = setting("keep", "K/V of a token that skips attention: keep (still attended to) | evict",
                      choices=("keep", "evict"))
    protect_first: int = setting(2, "the first N blocks always execute")
    protect_first_tokens: int = setting(1, "the first N tokens of a sequence always execute (the first is the "
                                           "attention sink every later token reads)")
    calibrate: bool = setting(True, "after training, calibrate a logit offset so deterministic routing hits the target")
    calib_windows: int = setting(CALIB_WINDOWS, "windows of 256 training tokens the offset calibration measures (fewer: "
                                                "quicker, a less exact offset; experiments.py ablations --quick)",
                                 must_be=f"in 1..{CALIB_WINDOWS}")
    val_sampled: bool = setting(False, "also validate under Gumbel-sampled gates (how the authors' code evaluates)")
    gate_estimator: str = setting("ste", "gradient of the hard Gumbel gates: ste (straight-through, the method) | "
                                         "soft (relaxed gates in training) | none (no gradient: what breaks without STE)",
                                  choices=("ste", "soft", "none"))
    joint_lora_r: int = setting(0, "one-stage training: also train LoRA of this rank (wq, wv, w1) with the routers "
                                   "(the paper's 'joint' ablation); 0 = off, the two-stage method", must_be=">= 0")
    joint_lora_lr: float = setting(2e-4, "learning rate of the jointly trained LoRA (stage 2's)")
    # -- optimization (and the shared ones: training.TrainSettings)
    warmup_iters: int = setting(0, "linear learning-rate warmup steps (cosine schedule)")

    def warmup_steps(self):
        return self.warmup_iters

    def router_config(self):
        return RouterConfig(kind=self.router_kind, mlp_input=self.mlp_input, normalize=self.router_norm,
                            init=self.router_init, kv=self.kv, protect_first=self.protect_first,
                            protect_first_tokens=self.protect_first_tokens)

    def lora_config(self):  # the joint ablation's adapters
        return {"targets": list(lora.DEFAULT_TARGETS), "r": self.joint_lora_r, "alpha": 2.0 * self.joint_lora_r,
                "dropout": 0.1}


# ----------------------------------------------------------------------------------------------
# The step: Gumbel gates -> KL(dense || routed) + alpha * |target - s|

def tau_at(it, s):
    """Gumbel temperature at step it: linear from tau_start (first step) to tau_end (last step)."""
    return s.tau_start + (s.tau_end - s.tau_start) * min(1.0, it / max(1, s.max_iters - 1))


def target_at(it, s):
    """Sparsity target at step it: ramped linearly from 0 over the first sparsity_warmup of the steps."""
    warm = s.sparsity_warmup * s.max_iters
    return s.target_sparsity * min(1.0, (it + 1) / warm) if warm >= 1 else s.target_sparsity


def distill_loss(logits, teacher_logits):
    """KL(teacher || student) per token, summed over the vocabulary, averaged over tokens."""
    return F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(teacher_logits.float(), -1),
                    log_target=True, reduction="none").sum(-1).mean()


def loss(model, x, y, it, s, ctx, all_reduce=None):
    """One micro-batch: the task loss under Gumbel gates plus the sparsity loss. -> (loss, what to log).
    all_reduce (several processes): s becomes the sparsity of all their batches together."""
    tau, target = tau_at(it, s), target_at(it, s)
    with ctx:
        logits, ce, gates = model(x, y, routing=Routing(mode="gumbel", tau=tau, estimator=s.gate_estimator))
        if s.distill:
            with torch.no_grad(), lora.disabled(model):
                teacher, _, _ = model(x)  # the dense model: routing off (and, in joint training, LoRA off)
            task = distill_loss(logits, teacher)
        else:
            task = ce
        sp_loss, sp = sparsity_loss(gates, target, s.alpha, model.args, s.kv, s.weighting, s.budget,
                                    all_reduce=all_reduce)
    return task + sp_loss, {"task": task.item(), "ce": ce.item(), "sparsity": sp.item(), "target": target, "tau": tau}


# ----------------------------------------------------------------------------------------------
# The stage: what trains, what is saved, the final report (training.py runs the loop)

def calibrate(model, windows, target, weighting, ctx, device):
    """Offset so deterministic routing skips `target` (params or modules) on the calibration text."""
    def measure(offset):
        st = evaluate(model, windows, lambda: Routing(mode="hard", offset=offset, fast=True), ctx=ctx, device=device)
        return st["param_sparsity"] if weighting == "params" else st["module_sparsity"]
    return calibrate_offset(measure, target, lo=-8.0, hi=8.0, iters=12)


class Stage:
    NAME, FORMAT = "stage 1", "stage1"
    validate_start = False
    loss = staticmethod(loss)  # the step above

    def build(self, s, device, resume_cfg):
        """The frozen base with fresh routers (and, for the joint ablation, LoRA).
        -> (model, param groups, init_dir: the base model directory)"""
        init_dir = ensure_default_model() if s.init_from == DEFAULT_MODEL else s.init_from
        model = load(init_dir, device=device)
        if model.router_cfg is not None:
            raise UserError(f"--init_from {init_dir} already has routers; stage 1 starts from a converted base model")
        if resume_cfg is not None and resume_cfg["base"]["fingerprint"] != model.source["fingerprint"]:
            raise UserError(f"--resume: {s.out_dir} holds routers for base {resume_cfg['base']['path']} "
                            f"(fingerprint {resume_cfg['base']['fingerprint']}), not for {init_dir}")
        for p in model.parameters():
            p.requires_grad_(False)  # frozen: no weight gradients are ever computed for the base
        torch.manual_seed(s.seed)  # the same router init on every DDP process: a run is reproducible from its seed
        model.add_routers(s.router_config())
        if resume_cfg is not None and resume_cfg["router"] != model.router_cfg.to_dict():
            raise UserError(f"--resume: the router flags given differ from those {s.out_dir} was trained with; "
                            f"resume without them")
        groups = [{"params": [p for n, p in model.named_parameters() if "_router." in n],
                   "lr": s.learning_rate, "weight_decay": s.weight_decay}]
        if s.joint_lora_r:  # the one-stage ablation: adapters train from the first step, beside the routers
            lc = s.lora_config()
            lora.add_lora(model, tuple(lc["targets"]), lc["r"], lc["alpha"], lc["dropout"])
            groups.append({"params": [p for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))],
                           "lr": s.joint_lora_lr, "weight_decay": 0.0, "lr_scale": s.joint_lora_lr / s.learning_rate})
        self.about = (f"{'routers + LoRA, joint' if s.joint_lora_r else 'routers'}, base frozen | target "
                      f"{s.target_sparsity} ({s.weighting}), alpha {s.alpha}, {'KL to dense' if s.distill else 'CE'}"
                      + (" | recipe paper: raw router input, zero-bias init, module-count sparsity, CE, no warm-up, "
                         "no protected blocks (expect a collapse in a short run: see README)" if s.recipe == "paper" else ""))
        self.title = f"stage 1, target {s.target_sparsity} ({s.weighting})"
        self.passes_per_token = 3 if s.distill else 2  # forward + backward ~ 2 forwards; the teacher's forward 1 more
        return model, groups, init_dir

    def run_config(self, model, s):
        cfg = {"router": model.router_cfg.to_dict(), "offset": model.routing_offset}
        return cfg | ({"lora": s.lora_config()} if s.joint_lora_r else {})

    def trained(self, model):
        files = {"routers.safetensors": model.router_state_dict()}
        if any(n.endswith("lora_A") for n, _ in model.named_parameters()):
            files["lora.safetensors"] = lora.lora_state_dict(model)
        return files

    def finish(self, model, s, windows, train_data, ctx, device, out_dir):
        """Calibrate the offset, then compare dense, routed and ShortGPT on the validation windows."""
        calib = calibration_windows(train_data)
        if s.calibrate:
            print("calibrating the routing offset on training text ...")
            model.routing_offset = calibrate(model, calib[:s.calib_windows], s.target_sparsity, s.weighting, ctx, device)
        offset = model.routing_offset
        print(f"validating on {len(windows)} fixed validation windows (deterministic gates) ...")
        routed = evaluate(model, windows, val_routing(model), ctx=ctx, device=device)
        with lora.disabled(model):  # the references are the base model (a joint run's LoRA off)
            dense = dense_val_loss(model, windows, ctx, device, s.data_dir)
            short, n_blocks = shortgpt_matched(model, calib, windows, routed["param_sparsity"], ctx, device, s.data_dir)
        sampled = None
        if s.val_sampled:  # the authors' evaluation: Gumbel sampling at tau 1, fixed seed for a reproducible figure
            torch.manual_seed(s.seed)
            sampled = evaluate(model, windows, lambda: Routing(mode="sample"), ctx=ctx, device=device)
        short_sparsity = n_blocks / model.args.n_layers

        rows = [("dense", 0.0, 0.0, 0.0, dense["loss"]),
                (f"SkipGPT routed (offset {offset:+.2f})", routed["param_sparsity"], routed["attn_skip"],
                 routed["mlp_skip"], routed["loss"])]
        if sampled is not None:
            rows.append(("SkipGPT, sampled gates (authors')", sampled["param_sparsity"], sampled["attn_skip"],
                         sampled["mlp_skip"], sampled["loss"]))
        rows.append((f"ShortGPT, {n_blocks} blocks removed", short_sparsity, short_sparsity, short_sparsity, short["loss"]))
        print_comparison(rows, width=34)
        print(f"target sparsity {s.target_sparsity} ({s.weighting}); module sparsity {routed['module_sparsity']:.3f}; "
              f"routed ppl / dense ppl = {math.exp(routed['loss'] - dense['loss']):.2f}")
        plots.skip_heatmap(routed, out_dir / "skip_rates.png",
                           f"skip rate per block (val, deterministic): param sparsity {routed['param_sparsity']:.3f}")
        summary = {"target_sparsity": s.target_sparsity, "weighting": s.weighting, "recipe": s.recipe,
                   "val_sparsity": routed["param_sparsity"] if s.weighting == "params" else routed["module_sparsity"],
                   "val_attn_skip": routed["attn_skip"], "val_mlp_skip": routed["mlp_skip"],
                   "val_module_sparsity": routed["module_sparsity"], "val_param_sparsity": routed["param_sparsity"],
                   "val_loss_dense": dense["loss"], "val_loss_routed": routed["loss"], "val_loss_shortgpt": short["loss"],
                   "val_ppl_dense": dense["ppl"], "val_ppl_routed": routed["ppl"], "val_ppl_shortgpt": short["ppl"],
                   "shortgpt_blocks": n_blocks, "shortgpt_param_sparsity": short_sparsity, "offset": offset}
        if sampled is not None:
            summary |= {"val_loss_sampled": sampled["loss"], "val_ppl_sampled": sampled["ppl"],
                        "val_param_sparsity_sampled": sampled["param_sparsity"],
                        "val_module_sparsity_sampled": sampled["module_sparsity"]}
        summary["final_val"] = {"val_loss": routed["loss"], "val_param_sparsity": routed["param_sparsity"],
                                "val_attn_skip": routed["attn_skip"], "val_mlp_skip": routed["mlp_skip"], "offset": offset}
        summary["figures"] = ["skip_rates.png"]
        return summary


def main(argv=None):
    s, explicit = parse_settings(Settings, __doc__, argv, RECIPES)
    return train(Stage(), s, explicit)


if __name__ == "__main__":
    cli(main)
