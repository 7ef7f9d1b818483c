"""A LLaMA-style decoder with a SkipGPT router before every attention and every MLP sublayer.

Read top to bottom: the model's shape (ModelArgs), RMSNorm, rotary embeddings, the KV cache,
grouped-query attention, the SwiGLU MLP, the routed block, and the whole Transformer with its
generate(). With routing off (routing=None) every block is Llama's:

    h   = x + Attention(attention_norm(x))
    out = h + MLP(ffn_norm(h))

With routing on, a router before each sublayer gives every token a 0/1 gate (router.py):

    h   = x + g_attn * Attention(attention_norm(x))
    out = h + g_mlp  * MLP(ffn_norm(h))

TransformerBlock.forward computes exactly that, masked: the skipped sublayer still runs and its
output is multiplied by 0. Stage 1 trains that way (the gate's straight-through gradient needs the
skipped output). With Routing(fast=True) the same block really skips the work: it gathers the
tokens that execute a sublayer, runs the sublayer on them alone and adds the result back into their
rows, which gives the same output. fast.py makes that faster (fused matmuls, compiled decoding);
this file is the reference it is tested against, and reads no files (checkpoint.load does).
Names follow Meta's llama code.

References:
- LLaMA: Touvron et al. 2023, arXiv 2302.13971; Meta's llama3 model.py (names, GQA, RoPE scaling)
- RoPE: Su et al. 2021, arXiv 2104.09864 (rotate-half layout, as Hugging Face stores q/k)
- SkipGPT: Zhao et al., ICML 2025, arXiv 2506.04179
"""
import copy
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import UserError
from router import Router, RouterConfig, Routing


@dataclass
class ModelArgs:
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3              # grouped-query attention: n_heads / n_kv_heads queries share a K/V head
    head_dim: int = 64               # not always dim / n_heads
    hidden_dim: int = 1536           # SwiGLU width (HF intermediate_size)
    vocab_size: int = 49152
    norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    rope_scaling: dict | None = None  # Llama 3.1/3.2 "llama3" scaling: factor, low/high_freq_factor, original_max_position_embeddings
    max_seq_len: int = 8192
    tie_embeddings: bool = True      # output head shares tok_embeddings' weight

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalize in fp32 (bf16 sums of squares lose precision), scale, then back to x's dtype
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


# ----------------------------------------------------------------------------------------------
# Rotary position embeddings (rotate-half layout)

def rope_frequencies(args: ModelArgs):
    """Inverse frequencies (head_dim/2,), with Llama 3's long-context rescaling when configured."""
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim))
    sc = args.rope_scaling
    if sc:
        # llama3: keep high frequencies, divide low ones by `factor`, blend smoothly in between
        wavelen = 2 * math.pi / inv_freq
        low_wavelen = sc["original_max_position_embeddings"] / sc["low_freq_factor"]
        high_wavelen = sc["original_max_position_embeddings"] / sc["high_freq_factor"]
        smooth = (sc["original_max_position_embeddings"] / wavelen - sc["low_freq_factor"]) / (
            sc["high_freq_factor"] - sc["low_freq_factor"])
        blended = (1 - smooth) * inv_freq / sc["factor"] + smooth * inv_freq
        inv_freq = torch.where(wavelen > low_wavelen, inv_freq / sc["factor"],
                               torch.where(wavelen < high_wavelen, inv_freq, blended))
    return inv_freq.float()


def rope_cos_sin(args: ModelArgs, length):
    """cos and signed sin tables (length, head_dim) for positions 0..length-1.

    Rotate-half layout: pair (i, i + head_dim/2) turns by angle_i. The sine table carries the sign
    of the rotation, [-sin, +sin], so that apply_rope needs no concatenation.
    """
    t = torch.arange(length, dtype=torch.float32)
    angles = torch.outer(t, rope_frequencies(args))          # (length, head_dim/2)
    sin = angles.sin()
    return torch.cat([angles.cos(), angles.cos()], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x, cos, sin):
    """x (..., head_dim); cos, signed sin (rope_cos_sin) broadcastable to it.

    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) for the two halves: roll(x) is (x2, x1).
    """
    return (x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin).type_as(x)


# ----------------------------------------------------------------------------------------------
# Static KV cache: preallocated, written in place at the current positions

class KVCache(nn.Module):
    def __init__(self, batch_size, max_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # evict semantics: which cached tokens may be attended to (all True under "keep")
        self.register_buffer("keep", torch.ones(batch_size, max_len, dtype=torch.bool, device=device),
                             persistent=False)

    def update(self, start_pos, k, v, keep=None):
        """Write k, v (B, n_kv, T, hd) at positions start_pos.. and return the whole prefix."""
        B, T = k.shape[0], k.shape[2]
        end = start_pos + T
        self.k[:B, :, start_pos:end] = k
        self.v[:B, :, start_pos:end] = v
        if keep is not None:
            self.keep[:B, start_pos:end] = keep
        return self.k[:B, :, :end], self.v[:B, :, :end], self.keep[:B, :end]


# ----------------------------------------------------------------------------------------------
# The two sublayers

class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.cache = None

    def forward(self, x, cos, sin, start_pos=0, key_keep=None):
        """x (B, T, dim) at positions start_pos..start_pos+T-1; cos/sin (T, head_dim) -> (B, T, dim).

        key_keep (B, T) bool, "evict" semantics only: False marks tokens whose K/V no query may read.
        """
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)       # (B, nh, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)    # (B, nkv, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v, cached_keep = self.cache.update(start_pos, k, v, key_keep)
            key_keep = cached_keep if key_keep is not None else None
        if key_keep is None and (start_pos == 0 or T == 1):  # plain causal prefill, or one token that sees every key
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=self.n_heads != self.n_kv_heads)
        else:
            positions = torch.arange(start_pos, start_pos + T, device=x.device)[None].expand(B, T)
            y = self.attend(q, k, v, positions, key_keep)                            # (B, nh, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))

    def attend(self, q, k, v, positions, key_keep=None):
        """Queries q (B, nh, Tq, hd) at absolute positions (B, Tq) attend to keys k, v (B, nkv, S, hd) at
        positions 0..S-1: each to the keys at or before its own position (causal) and, under evict,
        only to kept keys (key_keep (B, S)) or itself. A query at position -1 is an empty slot: it
        sees every key (a finite result, never read). -> (B, nh, Tq, hd)."""
        S = k.shape[2]
        key_pos = torch.arange(S, device=q.device)
        mask = key_pos[None, None, :] <= positions[:, :, None]                      # (B, Tq, S)
        if key_keep is not None:
            mask = mask & (key_keep[:, None, :] | (key_pos[None, None, :] == positions[:, :, None]))
        mask = mask | (positions[:, :, None] < 0)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None],
                                              enable_gqa=self.n_heads != self.n_kv_heads)

    def forward_sparse(self, x, execute, cos, sin, start_pos=0, evict=False):
        """Attention for the tokens that execute it only (execute (B, T) bool): the skipping path.

        K and V: under "keep" every token computes them (later queries attend to skipped tokens
        too); under "evict" only executing tokens do, and the other tokens are masked out as keys.
        Q, the scores and wo run for the executing tokens alone, each query at its own position.
        -> (rows (N,): the executing tokens' indices in the flattened B*T, out (N, dim))."""
        B, T, _ = x.shape
        rows = execute.reshape(-1).nonzero().squeeze(1)                             # (N,)
        b, t = rows // T, rows % T
        flat = x.reshape(B * T, -1)
        xe = flat.index_select(0, rows)                                             # (N, dim): the executing tokens
        if evict:  # zeros for the skipped tokens: masked out as keys below
            k = x.new_zeros(B * T, self.n_kv_heads * self.head_dim).index_copy(0, rows, self.wk(xe))
            v = x.new_zeros(B * T, self.n_kv_heads * self.head_dim).index_copy(0, rows, self.wv(xe))
        else:
            k, v = self.wk(flat), self.wv(flat)
        k = apply_rope(k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2), cos, sin)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        key_keep = execute if evict else None
        if self.cache is not None:
            k, v, cached_keep = self.cache.update(start_pos, k, v, key_keep)
            key_keep = cached_keep if evict else None
        if rows.numel() == 0:
            return rows, x.new_zeros(0, x.shape[-1])
        q = self.wq(xe).view(-1, self.n_heads, self.head_dim)                       # (N, nh, hd)
        q = apply_rope(q, cos.index_select(0, t)[:, None], sin.index_select(0, t)[:, None])
        # pack each sequence's queries to the left: (B, nh, n_q, hd), slot = rank among its executing tokens
        slot = (execute.cumsum(1) - 1).reshape(-1)[rows]
        n_q = int(execute.sum(1).max())
        q_packed = q.new_zeros(B, n_q, self.n_heads, self.head_dim)
        q_packed[b, slot] = q
        positions = torch.full((B, n_q), -1, device=x.device)                       # -1: an empty slot
        positions[b, slot] = t + start_pos
        y = self.attend(q_packed.transpose(1, 2), k, v, positions, key_keep)         # (B, nh, n_q, hd)
        y = y.transpose(1, 2)[b, slot].reshape(-1, self.n_heads * self.head_dim)     # (N, nh * hd)
        return rows, self.wo(y)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). w1 = gate_proj, w3 = up_proj, w2 = down_proj."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# ----------------------------------------------------------------------------------------------
# The routed block

class TransformerBlock(nn.Module):
    def __init__(self, layer_id, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)
        self.attention_router = None  # Router modules, added by Transformer.add_routers()
        self.ffn_router = None
        self.router_cfg = None

    def forward(self, x, cos, sin, start_pos=0, routing: Routing | None = None):
        """x (B, T, dim) -> (out (B, T, dim), gates (2, B, T) [attention, MLP] or None when not routed)."""
        if routing is None or self.attention_router is None:  # Llama's block
            h = x + self.attention(self.attention_norm(x), cos, sin, start_pos)
            return h + self.feed_forward(self.ffn_norm(h)), None
        evict = self.router_cfg.kv == "evict"
        g_attn = self.gate(self.attention_router, x, routing, 0, start_pos)           # (B, T), 1 = execute
        if routing.fast:  # only the executing tokens run attention; its output goes back into their rows
            rows, y = self.attention.forward_sparse(self.attention_norm(x), g_attn > 0.5, cos, sin, start_pos, evict)
            h = add_rows(x, rows, y)
        else:
            key_keep = g_attn > 0.5 if evict else None
            h = x + g_attn[..., None].to(x.dtype) * self.attention(self.attention_norm(x), cos, sin, start_pos, key_keep)
        g_mlp = self.gate(self.ffn_router, x if self.router_cfg.mlp_input == "block" else h, routing, 1, start_pos)
        if routing.fast:  # the MLP on the executing tokens' rows only
            rows = (g_mlp > 0.5).reshape(-1).nonzero().squeeze(1)                       # (N,)
            he = h.reshape(-1, h.shape[-1]).index_select(0, rows)                        # (N, dim)
            out = add_rows(h, rows, self.feed_forward(self.ffn_norm(he)))
        else:
            out = h + g_mlp[..., None].to(h.dtype) * self.feed_forward(self.ffn_norm(h))
        return out, torch.stack([g_attn, g_mlp])

    def gate(self, router, x, routing, module, start_pos=0):
        """The 0/1 gates (B, T) of one sublayer (module 0: attention, 1: MLP) from its router."""
        if self.layer_id < self.router_cfg.protect_first:  # always executes: no decision, no gradient
            return torch.ones(x.shape[:2], device=x.device)
        return self.protect_tokens(routing.gate(router(x), self.layer_id, module, start_pos), routing, start_pos)

    def protect_tokens(self, gates, routing, start_pos):
        """The first protect_first_tokens positions of a sequence always execute: every later token
        attends to the first one (the attention sink), so skipping a sublayer there changes them all.
        Decisions given explicitly (mode "force") are left as they are."""
        n = self.router_cfg.protect_first_tokens - start_pos
        if n <= 0 or routing.mode == "force":
            return gates
        first = torch.arange(gates.shape[-1], device=gates.device) < n                 # (T,)
        return torch.where(first, torch.ones_like(gates), gates)


def add_rows(x, rows, y):
    """x (B, T, dim) with y (N, dim) added to the rows `rows` (N,) of its flattened B*T."""
    return x.reshape(-1, x.shape[-1]).index_add(0, rows, y.to(x.dtype)).view_as(x)


def shallow_copy(module: nn.Module):
    """A copy of a module that shares every submodule and tensor with it (a fresh registry, so that
    the copy's children can be replaced without touching the original)."""
    clone = copy.copy(module)
    nn.Module.__init__(clone)
    for name, child in module.named_children():
        setattr(clone, name, child)
    clone.train(module.training)
    return clone


# ----------------------------------------------------------------------------------------------
# The model

class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.router_cfg = None
        self.routing_offset = 0.0  # calibrated logit offset of loaded routers (router.calibrate_offset)
        self.tokenizer = None     # set by checkpoint.load
        self.source = {}          # what was loaded (paths, fingerprints), for runs to record
        self.rope_len = 0

    def add_routers(self, cfg: RouterConfig):
        """Put a fresh attention router and MLP router in every block."""
        device = self.tok_embeddings.weight.device
        for layer in self.layers:
            layer.attention_router = Router(self.args.dim, cfg).to(device)
            layer.ffn_router = Router(self.args.dim, cfg).to(device)
        return self.set_router_config(cfg)

    def set_router_config(self, cfg: RouterConfig):
        """The routing rules every block follows (add_routers; or, for loaded routers, a changed rule
        such as protect_first_tokens)."""
        self.router_cfg = cfg
        for layer in self.layers:
            layer.router_cfg = cfg
        return self

    def router_state_dict(self):
        return {k: v for k, v in self.state_dict().items() if "_router." in k}

    def without_blocks(self, drop):
        """A copy of the model without the blocks in `drop`, sharing every weight (ShortGPT's static
        pruning: baselines.shortgpt chooses the blocks). The blocks keep their layer_id."""
        pruned = shallow_copy(self)
        pruned.layers = nn.ModuleList(layer for i, layer in enumerate(self.layers) if i not in set(drop))
        pruned.args = copy.copy(self.args)
        pruned.args.n_layers = len(pruned.layers)
        pruned.removed_blocks = sorted(set(drop) | set(getattr(self, "removed_blocks", [])))
        return pruned

    def rope(self, start_pos, T, device):
        """cos, sin (T, head_dim) for positions start_pos.., from tables grown on demand (a 128k-context
        model does not allocate them all)."""
        end = start_pos + T
        if end > self.rope_len or getattr(self, "rope_cos", None) is None or self.rope_cos.device != device:
            self.rope_len = max(end, min(self.args.max_seq_len, 4096))
            cos, sin = rope_cos_sin(self.args, self.rope_len)
            self.register_buffer("rope_cos", cos.to(device), persistent=False)
            self.register_buffer("rope_sin", sin.to(device), persistent=False)
        return self.rope_cos[start_pos:end], self.rope_sin[start_pos:end]

    def setup_cache(self, batch_size, max_len, dtype=None):
        p = self.tok_embeddings.weight
        for layer in self.layers:
            layer.attention.cache = KVCache(batch_size, max_len, self.args.n_kv_heads, self.args.head_dim,
                                            dtype or p.dtype, p.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache = None

    def forward(self, tokens, targets=None, routing: Routing | None = None, start_pos: int = 0):
        """tokens (B, T) -> (logits (B, T, vocab), loss or None, gates (L, 2, B, T) or None).

        targets (B, T): next-token ids, -1 where no loss is wanted (padding).
        routing: None runs the dense model; a Routing routes every sublayer, and the gates it
                 produced come back (1 = executed; [:, 0] attention, [:, 1] MLP).
        start_pos: position of tokens[:, 0]; > 0 only with a KV cache (setup_cache).
        """
        B, T = tokens.shape
        if start_pos + T > self.args.max_seq_len:
            raise UserError(f"sequence of {start_pos + T} tokens exceeds the model's max_seq_len {self.args.max_seq_len}")
        cos, sin = self.rope(start_pos, T, tokens.device)
        routing = routing if self.router_cfg is not None else None
        h, gates = self.run_blocks(self.tok_embeddings(tokens), cos, sin, start_pos, routing)  # (B, T, dim)
        logits = self.output(self.norm(h))
        if targets is None:
            return logits, None, gates
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss, gates

    def run_blocks(self, h, cos, sin, start_pos, routing):
        """The blocks one after the other. -> (h (B, T, dim), gates (L, 2, B, T) or None)."""
        gates = []
        for layer in self.layers:
            h, g = layer(h, cos, sin, start_pos, routing)
            gates.append(g)
        return h, (torch.stack(gates) if routing is not None else None)

    @torch.no_grad()
    def generate(self, tokens, max_new_tokens, temperature=1.0, top_k=None, routing=None,
                 stop_ids=(), use_cache=True, on_token=None):
        """Autoregressive sampling. tokens (B, T) prompt -> (B, T + n) with n <= max_new_tokens.

        temperature 0 is greedy. With use_cache the prompt is prefilled once and each new token
        is a one-token forward against the cache; without it every step reruns the whole prefix
        (the slow reference, which must give the same tokens). on_token(next_ids (B, 1), gates)
        is called after every step, gates (L, 2, B, T_step) as the forward pass returned them.
        """
        B, T = tokens.shape
        if use_cache:
            self.setup_cache(B, T + max_new_tokens)
        try:
            seq, pos = tokens, 0
            done = torch.zeros(B, dtype=torch.bool, device=tokens.device)
            stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=tokens.device)
            for _ in range(max_new_tokens):
                inp = seq[:, pos:] if use_cache else seq
                logits, _, gates = self(inp, routing=routing, start_pos=pos if use_cache else 0)
                if use_cache:
                    pos = seq.shape[1]
                logits = logits[:, -1, :].float()
                if temperature == 0:
                    nxt = logits.argmax(-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k:
                        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    nxt = torch.multinomial(logits.softmax(-1), 1)
                seq = torch.cat([seq, nxt], dim=1)
                if on_token is not None:
                    on_token(nxt, gates)
                if stop_ids:
                    done |= torch.isin(nxt[:, 0], stop)
                    if done.all():
                        break
            return seq
        finally:
            if use_cache:
                self.clear_cache()
