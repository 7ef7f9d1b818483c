"""SkipGPT routing: the routers, the gate, the global sparsity loss and routing statistics.

Before every attention and every MLP sublayer sits a router: a tiny linear map from the residual
stream to two logits, index 0 = execute, index 1 = skip. The gate turns the logits into a 0/1
decision per token. A block then reads (model.py, TransformerBlock.forward):

    h   = x + g_attn * Attention(attention_norm(x))
    out = h + g_mlp  * MLP(ffn_norm(h))

Training uses a hard Gumbel-softmax with a straight-through gradient; inference is deterministic.
One global budget says what share of the block parameters the tokens may skip (sparsity_loss; the
paper counts skipped (token, module) pairs instead: weighting "modules").

References:
- SkipGPT (Zhao et al., ICML 2025), arXiv 2506.04179; authors' code github.com/EIT-NLP/SkipGPT
- Gumbel-softmax: Jang et al. 2017, arXiv 1611.01144; straight-through: Bengio et al. 2013
- Mixture-of-Depths (per-layer budgets): Raposo et al. 2024, arXiv 2404.02258
"""
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class RouterConfig:
    """How the routers are built and applied. Plain data: the flags that fill it are checked with the
    other settings (train_stage1.Settings), and a run's config.json holds only values that passed."""
    kind: str = "linear"        # linear: nn.Linear(dim, 2) as in the paper | mlp: dim -> dim/4 -> 2 (authors' code)
    mlp_input: str = "block"    # what the MLP router reads: block input x (authors' code) | post_attn h (paper's wording)
    normalize: bool = True      # parameter-free RMS norm of the router input (the raw stream has norms ~100-700)
    init: str = "execute"       # execute: bias (+2, -2), ~2% skip at start | paper: Kaiming weight, zero bias
    kv: str = "keep"            # K/V of a token that skips attention: keep (computed, attended to) | evict
    protect_first: int = 2      # the first blocks always execute (block 0's MLP makes the massive activations)
    protect_first_tokens: int = 1  # the first tokens of a sequence always execute (the first is the attention sink)

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

    def prepare(self, x):
        """What the router reads: x, RMS-normalized when configured (parameter-free: only the
        direction of the stream matters)."""
        if self.normalize:
            return F.rms_norm(x.float(), (x.shape[-1],), eps=1e-6).to(x.dtype)
        return x

    def forward(self, x):
        return self.proj(self.prepare(x))


# ----------------------------------------------------------------------------------------------
# The gate

def gumbel_noise(logits):
    """Standard Gumbel noise shaped like logits, G = -log(Exp(1)). One place, so a test can fix it."""
    return -torch.empty_like(logits, dtype=torch.float32).exponential_().log()


def gumbel_gate(logits, tau, estimator="ste"):
    """Hard Gumbel-softmax with a straight-through gradient. logits (..., 2) -> gate (...,) in {0, 1}.

    Forward value: one_hot(argmax(logits + G))[0], exactly 0 or 1 (tau does not change it).
    Backward: the gradient of the soft y[0] = softmax((logits + G) / tau)[0]; tau shapes it.
    estimator (for experiments; the method is "ste"):
      "soft": y itself in both passes: a relaxed gate, trained on outputs scaled by y in (0, 1),
              though inference gates are 0 or 1;
      "none": the hard value with no gradient at all: nothing reaches the routers.
    """
    y = ((logits.float() + gumbel_noise(logits)) / tau).softmax(-1)[..., 0]
    hard = (y >= 0.5).float()
    if estimator == "soft":
        return y
    if estimator == "none":
        return hard
    return hard + (y - y.detach())  # y - y.detach() is exactly 0 in the forward, so the value stays 0/1


def hard_gate(logits, offset=0.0):
    """Deterministic inference gate: execute iff logit0 + offset >= logit1. No gradient."""
    return ((logits[..., 0] - logits[..., 1]).float() + offset >= 0).float()


def hard_gate_pair(logits, offset=0.0):
    """Both routers of a block side by side, logits (B, T, 4) [attention pair, MLP pair] -> gates (2, B, T)."""
    return hard_gate(logits.unflatten(-1, (2, 2)), offset).movedim(-1, 0)


@dataclass(frozen=True)
class Routing:
    """How a forward pass routes: a policy only. The gates it produced come back from the forward
    pass as data: `logits, loss, gates = model(tokens, targets, routing=Routing(...))`.

    mode: "gumbel" (training: sampled, straight-through), "hard" (deterministic inference),
          "sample" (the authors' inference: Gumbel sampling at tau = 1, no gradient),
          "force" (decisions given in `force`, for tests and benchmarks).
    offset: added to (logit0 - logit1) in "hard" mode; > 0 executes more. calibrate_offset() sets it.
    force: (n_layers, 2, B, T_total) 0/1 decisions by absolute position; index 0 = attention, 1 = MLP.
    fast: run only the sublayers that execute (model.py's gather/scatter path) instead of masking
          their outputs. Same result, less work; needs no gradient through the gates, so not "gumbel".
    estimator: how "gumbel" gates pass gradients (gumbel_gate): "ste" (the method), "soft", "none".
    """
    mode: str = "hard"
    tau: float = 1.0
    offset: float = 0.0
    force: torch.Tensor | None = None
    fast: bool = False
    estimator: str = "ste"

    def __post_init__(self):
        if self.mode not in ("gumbel", "hard", "sample", "force"):
            raise ValueError(f"unknown routing mode {self.mode!r}")
        if self.fast and self.mode == "gumbel":
            raise ValueError("the fast path cannot train routers: their gradient needs the skipped outputs")

    def gate(self, logits, layer, module, start_pos=0):
        """Router logits (B, T, 2) of sublayer `module` (0 attention, 1 MLP) in block `layer` -> (B, T)."""
        if self.mode == "gumbel":
            return gumbel_gate(logits, self.tau, self.estimator)
        if self.mode == "hard":
            return hard_gate(logits, self.offset)
        if self.mode == "sample":
            with torch.no_grad():
                return gumbel_gate(logits, 1.0)
        return self.given(layer, start_pos, logits.shape[1])[module].to(logits.device)

    def given(self, layers, start_pos, length):
        """Mode "force": the decisions given for block(s) `layers` (an index, or a list of them) at
        positions start_pos.. start_pos+length-1 -> (2, B, length), or (len(layers), 2, B, length)."""
        return self.force[layers, :, :, start_pos:start_pos + length].to(torch.float32)

    def gate_pair(self, logits, layer, start_pos=0):
        """Both gates of a block from its two routers' logits side by side, (B, T, 4) -> (2, B, T)."""
        if self.mode == "hard":  # one comparison for both: [execute, skip] pairs of attention and MLP
            return hard_gate_pair(logits, self.offset)
        if self.mode == "force":
            return self.given(layer, start_pos, logits.shape[1]).to(logits.device)
        return torch.stack([self.gate(logits[..., :2], layer, 0, start_pos),
                            self.gate(logits[..., 2:], layer, 1, start_pos)])


# ----------------------------------------------------------------------------------------------
# Sparsity: what skipping a module saves, the loss, statistics

def module_params(args, kv="keep"):
    """Block parameters a token does not run when it skips (attention, MLP).

    With kv="keep" a skipped token still computes K and V (later tokens attend to it), so only wq
    and wo are saved; with kv="evict" it computes nothing, and all four projections are saved.
    """
    q_out = args.n_heads * args.head_dim
    kv_out = args.n_kv_heads * args.head_dim
    attn = args.dim * q_out * 2 + (0 if kv == "keep" else 2 * args.dim * kv_out)
    mlp = 3 * args.dim * args.hidden_dim
    return attn, mlp


def block_params(args):
    """All parameters of one block's attention and MLP weights (wq wk wv wo w1 w2 w3; norms excluded)."""
    attn = 2 * args.dim * args.n_heads * args.head_dim + 2 * args.dim * args.n_kv_heads * args.head_dim
    return attn + 3 * args.dim * args.hidden_dim


def skip_rates(gates, valid=None):
    """Fraction of tokens that skip, per layer and module: gates (L, 2, B, T) -> (L, 2). valid (B, T) masks padding."""
    skipped = 1.0 - gates
    if valid is None:
        return skipped.mean(dim=(2, 3))
    valid = valid.to(skipped.dtype)
    return (skipped * valid).sum(dim=(2, 3)) / valid.sum().clamp(min=1)


def layer_sparsity(rates, args, kv="keep", weighting="params"):
    """Per-block sparsity from skip rates (L, 2) -> (L,). Its mean over blocks is the model's sparsity.

    weighting "params": the share of the block's parameters (wq wk wv wo w1 w2 w3) a token does not
              run, the one definition the loss, the calibration, the reports and bench.py all use;
              "modules": the share of its two (token, module) pairs skipped (the paper's count).
    """
    if weighting == "modules":
        return rates.mean(-1)
    attn_w, mlp_w = module_params(args, kv)
    return (rates[:, 0] * attn_w + rates[:, 1] * mlp_w) / block_params(args)


def sparsity_loss(gates, target, alpha, args, kv="keep", weighting="params", budget="global", valid=None,
                  all_reduce=None):
    """alpha * |target - s|: s the share of block parameters (or modules) skipped under the gates.

    budget "global": one s over all blocks (the paper); "per_layer": every block must hit the
           target on its own (Mixture-of-Depths-like), the loss averaged over blocks.
    all_reduce: with several processes (DDP), averages the skip rates over them, so that s is the
           sparsity of the global batch: one budget, not one per process. The gradient still flows
           through this process's own gates.
    Returns (loss, s) with s the global sparsity (a tensor with gradient).
    """
    rates = skip_rates(gates, valid)                                # (L, 2)
    if all_reduce is not None:
        rates = rates + (all_reduce(rates.detach().clone()) - rates.detach())
    per_layer = layer_sparsity(rates, args, kv, weighting)          # (L,)
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
    rates = skip_rates(gates.detach().float(), valid)               # (L, 2)
    return {
        "attn_skip": rates[:, 0].mean().item(),
        "mlp_skip": rates[:, 1].mean().item(),
        "module_sparsity": rates.mean().item(),
        "param_sparsity": layer_sparsity(rates, args, kv, "params").mean().item(),
        "attn_skip_per_layer": rates[:, 0].tolist(),
        "mlp_skip_per_layer": rates[:, 1].tolist(),
    }


@torch.no_grad()
def calibrate_offset(skip_params_fn, target, lo=-30.0, hi=30.0, iters=40, tol=0.002):
    """The logit offset in [lo, hi] at which deterministic routing skips `target` of the block parameters.

    skip_params_fn(offset) -> parameter sparsity on calibration text at that offset; it falls as the
    offset grows (a larger offset executes more). Each call is a pass over the calibration text, so
    the search spends few: it starts at 0, where trained routers already skip about their target,
    steps outwards (doubling) until the crossing is bracketed, then interpolates inside the bracket
    (regula falsi, Illinois variant). It stops at the first offset that skips within tol of the target,
    or after iters calls with the offset that came nearest.
    """
    below, above = None, None  # (offset, excess) that skip too much (offset too low) / too little
    x, step, kept, best = min(max(0.0, lo), hi), 0.5, None, None
    for _ in range(iters):
        excess = skip_params_fn(x) - target
        if best is None or abs(excess) < best[1]:
            best = (x, abs(excess))
        if abs(excess) <= tol:
            return x
        if excess > 0:
            below = (x, excess)
            if kept == "above":  # the same end survived twice: halve its weight (Illinois), or it stalls
                above = (above[0], above[1] / 2)
            kept = "above" if above else None
        else:
            above = (x, excess)
            if kept == "below":
                below = (below[0], below[1] / 2)
            kept = "below" if below else None
        if below is None or above is None:  # not bracketed yet: step outwards
            nxt = min(x + step, hi) if excess > 0 else max(x - step, lo)
            if nxt == x:
                return x  # the target is out of reach within [lo, hi]: the nearest bound
            x, step = nxt, step * 2
        else:
            (xb, fb), (xa, fa) = below, above
            x = xb + (xa - xb) * fb / (fb - fa)
    return best[0]
