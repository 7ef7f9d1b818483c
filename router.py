"""SkipGPT routing: the routers, the gate, the global sparsity loss and routing statistics.

Before every attention and every MLP sublayer sits a router: a tiny linear map from the residual
stream to two logits, index 0 = execute, index 1 = skip. The gate turns the logits into a 0/1
decision per token. A block then reads (model.py, Block.forward):

    h   = x + g_attn * Attention(attention_norm(x))
    out = h + g_mlp  * MLP(ffn_norm(h))

Training uses a hard Gumbel-softmax with a straight-through gradient; inference is deterministic.
One global budget says what fraction of (token, module) pairs may be skipped (sparsity_loss).

References:
- SkipGPT (Zhao et al., ICML 2025), arXiv 2506.04179; authors' code github.com/EIT-NLP/SkipGPT
- Gumbel-softmax: Jang et al. 2017, arXiv 1611.01144; straight-through: Bengio et al. 2013
- Mixture-of-Depths (per-layer budgets): Raposo et al. 2024, arXiv 2404.02258
"""
from dataclasses import dataclass, field, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class RouterConfig:
    kind: str = "linear"        # linear: nn.Linear(dim, 2) as in the paper | mlp: dim -> dim/4 -> 2 (authors' code)
    mlp_input: str = "block"    # what the MLP router reads: block input x (authors' code) | post_attn h (paper's wording)
    normalize: bool = True      # parameter-free RMS norm of the router input (the raw stream has norms ~100-700)
    init: str = "execute"       # execute: bias (+2, -2), ~2% skip at start | paper: Kaiming weight, zero bias
    kv: str = "keep"            # K/V of a token that skips attention: keep (computed, attended to) | evict
    protect_first: int = 2      # the first blocks always execute (block 0's MLP makes the massive activations)

    def __post_init__(self):
        for name, allowed in [("kind", ("linear", "mlp")), ("mlp_input", ("block", "post_attn")),
                              ("init", ("execute", "paper")), ("kv", ("keep", "evict"))]:
            if getattr(self, name) not in allowed:
                raise ValueError(f"router {name} must be one of {allowed}, got {getattr(self, name)!r}")

    def to_dict(self):
        return asdict(self)


class Router(nn.Module):
    """Residual stream (B, T, dim) -> logits (B, T, 2): [execute, skip]."""

    def __init__(self, dim, cfg: RouterConfig):
        super().__init__()
        self.normalize = cfg.normalize
        if cfg.kind == "linear":
            self.proj = nn.Linear(dim, 2)
            last = self.proj
        else:
            self.proj = nn.Sequential(nn.Linear(dim, dim // 4), nn.ReLU(), nn.Linear(dim // 4, 2))
            last = self.proj[2]
        for m in self.modules():
            if isinstance(m, nn.Linear):
                # the authors' init: Kaiming-uniform for a linear (gain 1) map, zero bias
                nn.init.kaiming_uniform_(m.weight, nonlinearity="linear")
                nn.init.zeros_(m.bias)
        if cfg.init == "execute":
            # Start almost dense: with a normalized input the logit gap from the weight is ~N(0, 1/3)
            # per unit, so a +4 bias gap lets ~2% of tokens skip; the routers then learn where to skip.
            with torch.no_grad():
                last.bias.copy_(torch.tensor([2.0, -2.0]))

    def forward(self, x):
        if self.normalize:  # parameter-free: only the direction of the stream matters
            x = F.rms_norm(x.float(), (x.shape[-1],), eps=1e-6).to(x.dtype)
        return self.proj(x)


# ----------------------------------------------------------------------------------------------
# The gate

def gumbel_gate(logits, tau, estimator="ste"):
    """Hard Gumbel-softmax with a straight-through gradient. logits (..., 2) -> gate (...,) in {0, 1}.

    Forward value: one_hot(argmax(logits + G))[0], exactly 0 or 1 (tau does not change it).
    Backward: the gradient of the soft y[0] = softmax((logits + G) / tau)[0]; tau shapes it.
    estimator (for experiments; the method is "ste"):
      "soft": y itself in both passes: a relaxed gate, trained on outputs scaled by y in (0, 1),
              though inference gates are 0 or 1;
      "none": the hard value with no gradient at all: nothing reaches the routers.
    """
    gumbels = -torch.empty_like(logits, dtype=torch.float32).exponential_().log()
    y = ((logits.float() + gumbels) / tau).softmax(-1)[..., 0]
    hard = (y >= 0.5).float()
    if estimator == "soft":
        return y
    if estimator == "none":
        return hard
    return hard + (y - y.detach())  # y - y.detach() is exactly 0 in the forward, so the value stays 0/1


def hard_gate(logits, offset=0.0):
    """Deterministic inference gate: execute iff logit0 + offset >= logit1. No gradient."""
    return ((logits[..., 0] - logits[..., 1]).float() + offset >= 0).float()


@dataclass
class Routing:
    """How a forward pass routes, and where it reports what it did.

    mode: "gumbel" (training: sampled, straight-through), "hard" (deterministic inference),
          "sample" (the authors' inference: Gumbel sampling at tau = 1, no gradient),
          "force" (decisions given in `force`, for tests and benchmarks).
    offset: added to (logit0 - logit1) in "hard" mode; > 0 executes more. calibrate_offset() sets it.
    force: (n_layers, 2, B, T_total) 0/1 decisions by absolute position; index 0 = attention, 1 = MLP.
    fast: run only the sublayers that execute (model.py's gather/scatter path) instead of masking
          their outputs. Same result, less work; needs no gradient through the gates, so not "gumbel".
    estimator: how "gumbel" gates pass gradients (gumbel_gate): "ste" (the method), "soft", "none".
    gates: filled by the forward pass, one (g_attn, g_mlp) pair of (B, T) tensors per layer.
    """
    mode: str = "hard"
    tau: float = 1.0
    offset: float = 0.0
    force: torch.Tensor | None = None
    fast: bool = False
    estimator: str = "ste"
    gates: list = field(default_factory=list)

    def __post_init__(self):
        if self.fast and self.mode == "gumbel":
            raise ValueError("the fast path cannot train routers: their gradient needs the skipped outputs")

    def gate(self, logits, layer, module, start_pos=0):
        if self.mode == "gumbel":
            return gumbel_gate(logits, self.tau, self.estimator)
        if self.mode == "hard":
            return hard_gate(logits, self.offset)
        if self.mode == "sample":
            with torch.no_grad():
                return gumbel_gate(logits, 1.0)
        if self.mode == "force":
            return self.force[layer, module][:, start_pos:start_pos + logits.shape[1]].to(logits.device, torch.float32)
        raise ValueError(f"unknown routing mode {self.mode!r}")

    def gate_tensor(self):
        """(n_layers, 2, B, T) stack of the gates of the last forward (keeps gradients)."""
        return torch.stack([torch.stack(pair) for pair in self.gates])


# ----------------------------------------------------------------------------------------------
# Sparsity: what skipping a module saves, the loss, statistics

def module_params(args, kv="keep"):
    """Block parameters skipped when a token skips (attention, MLP): the weights that really don't run.

    With kv="keep" a skipped token still computes K and V, so only wq and wo are saved.
    """
    q_out = args.n_heads * args.head_dim
    kv_out = args.n_kv_heads * args.head_dim
    attn = args.dim * q_out * 2 + (0 if kv == "keep" else 2 * args.dim * kv_out)
    mlp = 3 * args.dim * args.hidden_dim
    return attn, mlp


def block_params(args):
    """All parameters of one block's attention and MLP weights (norms excluded)."""
    attn = 2 * args.dim * args.n_heads * args.head_dim + 2 * args.dim * args.n_kv_heads * args.head_dim
    return attn + 3 * args.dim * args.hidden_dim


def sparsity(gates, weights, valid=None):
    """Fraction skipped, per layer and module: gates (L, 2, B, T) -> (L, 2); valid (B, T) masks padding."""
    skipped = 1.0 - gates
    if valid is None:
        return skipped.mean(dim=(2, 3))
    valid = valid.to(skipped.dtype)
    return (skipped * valid).sum(dim=(2, 3)) / valid.sum().clamp(min=1)


def sparsity_loss(gates, target, alpha, weighting="params", budget="global", module_weights=(1.0, 1.0),
                  valid=None):
    """alpha * |target - s|: s the (weighted) fraction of (token, module) pairs skipped.

    weighting "modules": every (token, module) pair counts 1 (the paper);
              "params": a pair counts the parameters it skips (module_weights), so s is the
              fraction of block parameters not run per token.
    budget "global": one s over all blocks (the paper); "per_layer": every block must hit the
           target on its own (Mixture-of-Depths-like), the loss averaged over blocks.
    Returns (loss, s) with s the global weighted sparsity (a tensor with gradient).
    """
    per_module = sparsity(gates, None, valid)                       # (L, 2)
    w = torch.tensor(module_weights if weighting == "params" else (1.0, 1.0),
                     device=per_module.device, dtype=per_module.dtype)
    per_layer = (per_module * w).sum(-1) / w.sum()                  # (L,)
    s = per_layer.mean()
    if budget == "global":
        loss = alpha * (target - s).abs()
    elif budget == "per_layer":
        loss = alpha * (target - per_layer).abs().mean()
    else:
        raise ValueError(f"unknown budget {budget!r}")
    return loss, s


@torch.no_grad()
def routing_stats(gates, args, kv="keep", valid=None):
    """Routing statistics as plain data (floats and lists), from gates (L, 2, B, T).

    param_sparsity = 1 - executed block parameters per token / all block parameters, counting the
    K/V projections as executed when kv == "keep" (they run for every token).
    """
    gates = gates.detach().float()
    per_module = sparsity(gates, None, valid)                       # (L, 2) skip rates
    attn_w, mlp_w = module_params(args, kv)
    skipped_params = (per_module[:, 0] * attn_w + per_module[:, 1] * mlp_w).sum()
    return {
        "attn_skip": per_module[:, 0].mean().item(),
        "mlp_skip": per_module[:, 1].mean().item(),
        "module_sparsity": per_module.mean().item(),
        "param_sparsity": (skipped_params / (block_params(args) * args.n_layers)).item(),
        "attn_skip_per_layer": per_module[:, 0].tolist(),
        "mlp_skip_per_layer": per_module[:, 1].tolist(),
    }


@torch.no_grad()
def calibrate_offset(skip_params_fn, target, lo=-30.0, hi=30.0, iters=40):
    """The logit offset at which deterministic routing skips `target` of the block parameters.

    skip_params_fn(offset) -> parameter sparsity on calibration text at that offset; it falls as
    the offset grows (a larger offset executes more), so bisection finds the crossing.
    """
    for _ in range(iters):
        mid = (lo + hi) / 2
        if skip_params_fn(mid) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
