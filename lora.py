"""LoRA: low-rank adapters on chosen linear layers of a frozen model (SkipGPT's stage 2).

A frozen weight W (out, in) gets a trainable low-rank update, and the layer computes

    y = x W^T + (alpha / r) * B A dropout(x)        A (r, in): Kaiming-uniform, B (out, r): zeros

so a fresh adapter changes nothing (B = 0) and only r * (in + out) numbers train per layer.
LoRALinear subclasses nn.Linear, so the base weight keeps its name (layers.0.attention.wq.weight):
base checkpoints load unchanged, and the adapter adds lora_A / lora_B beside it. merge() folds
the update into W for inference (W += scale * B A) and unmerge() takes it out again; both are
explicit calls, never a side effect of .train() / .eval() (the loralib pitfall).

SkipGPT puts LoRA (r 16, alpha 32, dropout 0.1) on q_proj, v_proj and gate_proj: wq, wv, w1 here.

References:
- LoRA: Hu et al. 2021, arXiv 2106.09685
- loralib, github.com/microsoft/LoRA (the nn.Linear subclass, mark_only_lora_as_trainable)
- minLoRA, github.com/cccntu/minLoRA (a small, readable implementation)
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import UserError

DEFAULT_TARGETS = ("wq", "wv", "w1")


class LoRALinear(nn.Linear):
    def __init__(self, in_features, out_features, r=16, alpha=32, dropout=0.0, bias=False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if r <= 0:
            raise UserError(f"LoRA rank must be >= 1, got {r}")
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))    # (r, in)
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=dtype))   # (out, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora()

    def reset_lora(self):
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear inits its weight (loralib)
        nn.init.zeros_(self.lora_B)                             # B = 0: a fresh adapter changes nothing

    @classmethod
    def from_linear(cls, linear: nn.Linear, r, alpha, dropout):
        """Wrap an existing layer: its weight (and bias) are shared by reference, not copied."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, r, alpha, dropout, bias=linear.bias is not None,
                    device="meta", dtype=w.dtype).to_empty(device=w.device)  # no weight initialized in vain
        layer.weight, layer.bias = w, linear.bias
        layer.reset_lora()
        return layer.train(linear.training)  # a new module starts in training mode (dropout on)

    def delta(self):
        """The low-rank update scale * B A, shaped like the weight (out, in)."""
        return self.scale * (self.lora_B @ self.lora_A)

    def forward(self, x):
        y = super().forward(x)  # x W^T (+ bias)
        if self.merged:  # the update already lives in the weight
            return y
        return y + self.scale * F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight += self.delta().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if getattr(self, "fused_view", False):
            raise UserError("this layer's weight is part of an inference-fused matrix (fast.accelerate); "
                            "load the model again to unmerge its LoRA")
        if self.merged:
            self.weight -= self.delta().to(self.weight.dtype)
            self.merged = False

    def extra_repr(self):
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}, merged={self.merged}"


def add_lora(model, targets=DEFAULT_TARGETS, r=16, alpha=32, dropout=0.1):
    """Replace every nn.Linear whose attribute name is in targets by a LoRALinear. -> replaced names."""
    if r <= 0:
        raise UserError(f"LoRA rank must be >= 1, got {r} (the paper uses --lora_r 16)")
    if not 0 <= dropout < 1:
        raise UserError(f"LoRA dropout must be in [0, 1), got {dropout}")
    linear_names, replaced, hit = set(), [], set()
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            linear_names.add(name)
            if name in targets:
                full = f"{parent_name}.{name}" if parent_name else name
                if isinstance(child, LoRALinear):
                    raise UserError(f"{full} already has a LoRA adapter")
                setattr(parent, name, LoRALinear.from_linear(child, r, alpha, dropout))
                if getattr(parent, "fused", None) is not None:  # inference-fused matmuls would skip the adapter
                    parent.fused = None
                replaced.append(full)
                hit.add(name)
    missing = [t for t in targets if t not in hit]
    if missing:
        raise UserError(f"LoRA target {', '.join(map(repr, missing))} matches no linear layer in the model; "
                        f"choose from {', '.join(sorted(linear_names))}")
    return replaced


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def mark_only_lora_trainable(model):
    """Freeze everything except lora_A / lora_B. -> the trainable parameters."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("lora_A", "lora_B")))
    return [p for p in model.parameters() if p.requires_grad]


def lora_state_dict(model):
    """Only the adapter tensors: what a stage-2 run saves."""
    return {k: v for k, v in model.state_dict().items() if k.endswith(("lora_A", "lora_B"))}


@contextlib.contextmanager
def disabled(model):
    """Run the model without its adapters (the base model), e.g. as the teacher of joint training."""
    layers = [m for m in lora_layers(model) if not m.merged]
    scales = [m.scale for m in layers]
    for m in layers:
        m.scale = 0.0
    try:
        yield model
    finally:
        for m, scale in zip(layers, scales):
            m.scale = scale


def merge_lora(model):
    for m in lora_layers(model):
        m.merge()
    return model


def merged_state_dict(model):
    """The base model's state dict (no adapter or router tensors) with every update folded in.

    Leaves the model untouched (merge + unmerge in place would not restore W bit for bit).
    """
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith(("lora_A", "lora_B")) and "_router." not in k}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear) and not m.merged:
            with torch.no_grad():
                sd[f"{name}.weight"] = m.weight + m.delta().to(m.weight.dtype)
    return sd
