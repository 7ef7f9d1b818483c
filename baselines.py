"""Static layer pruning baselines: ShortGPT block removal and attention drop.

ShortGPT (Men et al. 2024, arXiv 2403.03853) scores each block by its Block Influence
    BI_l = 1 - mean_t cos(x_l[t], x_{l+1}[t])
on calibration text (x_l: the residual stream entering block l) and removes the n blocks with the
lowest BI: the ones that change the stream least. Attention drop (He et al. 2024, "What matters in
transformers? Not all attention is needed", arXiv 2406.15786) removes the attention sublayers
whose input and output are most similar. Both are static: every token loses the same modules.
The pruned models really lack the removed modules, so they also run faster (bench.py).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import cached_reference, evaluate
from model import shallow_copy


@torch.no_grad()
def similarities(model, windows, batch_size=8):
    """Mean cosine similarity per block between (block input, block output) and between
    (attention input, attention output), i.e. x vs h = x + attn(...). -> (block_cos, attn_cos), (L,) each.
    The dense forward runs as it is; hooks read each block's input, attention output and output."""
    L = model.args.n_layers
    block_cos, attn_cos, n = torch.zeros(L), torch.zeros(L), 0
    seen = {}  # (block, "block" | "attention") -> what its forward hook saw in the last batch

    def recorder(l, part):
        def record(module, args, output):
            seen[l, part] = (args[0], output[0]) if part == "block" else output  # block: (input, output)
        return record
    handles = [m.register_forward_hook(recorder(l, part)) for l, layer in enumerate(model.layers)
               for m, part in ((layer, "block"), (layer.attention, "attention"))]
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(windows), batch_size):
            # (no longer than the model's context: a small model calibrates on the windows' beginnings)
            tokens = windows[i:i + batch_size, :-1][:, :model.args.max_seq_len].to(model.tok_embeddings.weight.device)
            model(tokens)
            for l in range(L):
                x, out = (t.float() for t in seen[l, "block"])
                h = x + seen[l, "attention"].float()                                   # (B, T, dim)
                attn_cos[l] += F.cosine_similarity(x, h, dim=-1).sum().cpu()
                block_cos[l] += F.cosine_similarity(x, out, dim=-1).sum().cpu()
            n += tokens.numel()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return block_cos / n, attn_cos / n


def block_influence(model, windows):
    """BI_l = 1 - mean cos(x_l, x_{l+1}). Low BI = the block barely changes the stream."""
    return 1 - similarities(model, windows)[0]


class NoAttention(nn.Module):
    """Stands in for a removed attention sublayer: contributes nothing, costs nothing."""

    def forward(self, x, *args, **kwargs):
        return torch.zeros_like(x)


def drop_attention(model, drop):
    """A copy of the model whose blocks in `drop` have no attention sublayer."""
    pruned = model.without_blocks([])
    layers = []
    for i, layer in enumerate(model.layers):
        if i in set(drop):
            layer = shallow_copy(layer)
            layer.attention = NoAttention()
        layers.append(layer)
    pruned.layers = nn.ModuleList(layers)
    pruned.dropped_attention = sorted(drop)
    return pruned


def shortgpt(model, windows, n_blocks):
    """Remove the n_blocks lowest-BI blocks. -> (pruned model, removed block indices, BI)."""
    bi = block_influence(model, windows)
    drop = bi.argsort()[:n_blocks].tolist()
    return model.without_blocks(drop), sorted(drop), bi


def attention_drop(model, windows, n_modules):
    """Remove the n_modules attention sublayers with the most similar input and output."""
    attn_cos = similarities(model, windows)[1]
    drop = attn_cos.argsort(descending=True)[:n_modules].tolist()
    return drop_attention(model, drop), sorted(drop), attn_cos


def blocks_for_param_sparsity(n_layers, param_sparsity):
    """ShortGPT blocks to remove for the nearest parameter sparsity (ties: fewer blocks)."""
    exact = param_sparsity * n_layers
    lower = math.floor(exact)
    return lower if exact - lower <= 0.5 else lower + 1


def shortgpt_val(model, calib_windows, val_windows, n_blocks, ctx, device, cache_dir=None):
    """ShortGPT with n_blocks removed (Block Influence on calib_windows), scored on val_windows. With a
    cache_dir the result is kept there (common.cached_reference): it is the same for every run on this
    base and data. -> evaluate()'s result."""
    def compute():
        pruned, _, _ = shortgpt(model, calib_windows, n_blocks)
        return evaluate(pruned, val_windows, None, ctx=ctx, device=device)
    if cache_dir is None:
        return compute()
    return cached_reference(cache_dir, f"shortgpt{n_blocks}", model, [calib_windows, val_windows], compute)


def shortgpt_matched(model, calib_windows, val_windows, param_sparsity, ctx, device, cache_dir=None):
    """ShortGPT at the nearest whole number of blocks to param_sparsity (shortgpt_val).
    -> (evaluate()'s result, blocks removed)."""
    n_blocks = blocks_for_param_sparsity(model.args.n_layers, param_sparsity)
    if n_blocks == 0:
        return {"loss": float("nan"), "ppl": float("nan")}, 0
    return shortgpt_val(model, calib_windows, val_windows, n_blocks, ctx, device, cache_dir), n_blocks
