"""A LLaMA-style decoder with a SkipGPT router before every attention and every MLP sublayer.

Read top to bottom: the model's shape (ModelArgs), RMSNorm, rotary embeddings, the KV cache,
grouped-query attention, the SwiGLU MLP, the routed block, and the whole Transformer. Loading
from disk lives beside the file formats (checkpoint.load); this file reads no files.
With routing off (routing=None) this is exactly Llama; with routing on, each block reads

    h   = x + g_attn * Attention(attention_norm(x))
    out = h + g_mlp  * MLP(ffn_norm(h))

where g is a per-token 0/1 gate from router.py. That masked form is the reference: the skipped
sublayer still runs, its output multiplied by 0. It is what stage 1 trains with (the gate's
straight-through gradient needs the skipped output). Names follow Meta's llama code.

References:
- LLaMA: Touvron et al. 2023, arXiv 2302.13971; Meta's llama3 model.py (names, GQA, RoPE scaling)
- RoPE: Su et al. 2021, arXiv 2104.09864 (rotate-half layout, as Hugging Face stores q/k)
- SkipGPT: Zhao et al., ICML 2025, arXiv 2506.04179
"""
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

    @classmethod
    def from_hf_config(cls, cfg: dict):
        """From a Hugging Face config.json (published Llama 3.x form or transformers' newer form)."""
        if cfg.get("model_type") != "llama":
            raise UserError(f"not a Llama config: model_type is {cfg.get('model_type')!r}, expected 'llama'")
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise UserError(f"unsupported Llama variant: config sets {flag}=true (this model has no biases)")
        if cfg.get("hidden_act", "silu") != "silu":
            raise UserError(f"unsupported activation {cfg['hidden_act']!r}: Llama uses silu")
        # rope settings: "rope_theta" + "rope_scaling" (Llama 3.x files) or "rope_parameters" (newer transformers)
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope_type == "default":
            scaling = None
        elif rope_type == "llama3":
            scaling = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                            "original_max_position_embeddings")}
        else:
            raise UserError(f"unsupported rope_type {rope_type!r} (supported: default, llama3)")
        n_heads = cfg["num_attention_heads"]
        return cls(
            dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            hidden_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            tie_embeddings=cfg.get("tie_word_embeddings", False))


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
# Inference-only fused weights: several linears that read the same input, laid out as one matrix

def fuse_linears(*linears):
    """Re-lay the weights (and biases) of linears that read the same input into one contiguous matrix
    (sum of outs, in). Each linear keeps its own weight, now a view into that matrix: nothing is
    stored twice, the state dict does not change, and an in-place update (LoRA's merge) updates both.
    -> (weight, bias or None)."""
    weight = torch.cat([m.weight.detach() for m in linears])
    bias = torch.cat([m.bias.detach() for m in linears]) if linears[0].bias is not None else None
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(weight[start:start + n], requires_grad=m.weight.requires_grad)
        if bias is not None:
            m.bias = nn.Parameter(bias[start:start + n], requires_grad=m.bias.requires_grad)
        start += n
    return weight, bias


def still_fused(fused, *linears):
    """Whether `fused` (fuse_linears' result) still computes exactly what the linears do: each is a
    plain nn.Linear (or a LoRA layer with its update merged) whose weight is still a view of it (a
    .to(dtype) or a reassignment since would have made new tensors)."""
    if fused is None:
        return False
    base = fused[0].untyped_storage().data_ptr()
    return all((type(m) is nn.Linear or getattr(m, "merged", False))
               and m.weight.untyped_storage().data_ptr() == base for m in linears)


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
        self.fused = None  # inference only: (wq|wk|wv, None) from fuse_linears (Transformer.fuse_weights)

    def qkv_weights(self):
        """(wq|wk|wv) as one matrix when fused and in eval mode, else None: the layers run one by one."""
        ok = not self.training and still_fused(self.fused, self.wq, self.wk, self.wv)
        return self.fused[0] if ok else None

    def project(self, x, q=True, kv=True):
        """x (..., dim) -> q (..., nh, hd) and/or k, v (..., nkv, hd), in one matmul when fused."""
        fused = self.qkv_weights()
        nq, nkv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        if fused is not None:
            w = fused if q and kv else (fused[:nq] if q else fused[nq:])
            parts = F.linear(x, w).split([nq] * q + [nkv, nkv] * kv, dim=-1)
        else:
            parts = ([self.wq(x)] if q else []) + ([self.wk(x), self.wv(x)] if kv else [])
        heads = [self.n_heads] * q + [self.n_kv_heads, self.n_kv_heads] * kv
        return [p.unflatten(-1, (h, self.head_dim)) for p, h in zip(parts, heads)]

    def forward(self, x, cos, sin, start_pos=0, key_keep=None):
        """x (B, T, dim) at positions start_pos..start_pos+T-1; cos/sin (T, head_dim).

        key_keep (B, T) bool, "evict" semantics only: False marks tokens that write no usable K/V.
        """
        B, T, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.project(x))                     # (B, heads, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v, key_keep_all = self.cache.update(start_pos, k, v, key_keep)
            if key_keep is not None:
                key_keep = key_keep_all
        S = k.shape[2]  # number of keys: start_pos + T
        if key_keep is None and (start_pos == 0 or T == 1):
            mask, causal = None, T > 1  # plain causal prefill, or one new token that sees every cached key
        else:
            # query i (absolute position start_pos + i) sees keys j <= start_pos + i ...
            q_pos = torch.arange(start_pos, start_pos + T, device=x.device)
            k_pos = torch.arange(S, device=x.device)
            mask = (k_pos[None, :] <= q_pos[:, None])[None, None]                  # (1, 1, T, S)
            if key_keep is not None:
                # ... and, under eviction, only keys that were kept, or itself
                mask = mask & (key_keep[:, None, None, :] | (k_pos[None, :] == q_pos[:, None])[None, None])
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_heads != self.n_kv_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))

    def forward_sparse(self, x, execute, rows, per_seq, cos, sin, start_pos=0, evict=False):
        """The fast path: only the tokens that execute attention run it as queries.

        x (B, T, dim) normalized input; execute (B, T) bool; rows (N,) the indices of the executing
        tokens in the flattened B*T; per_seq: how many execute in each sequence (host ints). K and V:
        under "keep" every token computes them (later queries attend to skipped tokens too); under
        evict only executing tokens do, and a skipped token's cache slot stays masked.
        Returns out (N, dim), the executing tokens' attention output, or None when N = 0.
        """
        B, T, _ = x.shape
        if not evict:  # K/V of every token: later queries may attend to it
            k, v = (t.transpose(1, 2) for t in self.project(x, q=False))           # (B, nkv, T, hd)
            k = apply_rope(k, cos, sin)
            if self.cache is not None:
                k, v, _ = self.cache.update(start_pos, k, v)
        if rows.numel() == 0:
            if evict and self.cache is not None:  # nothing computed; the slots stay masked
                self.cache.keep[:B, start_pos:start_pos + T] = False
            return None
        b_idx, t_idx = rows // T, rows % T
        xe = x.reshape(B * T, -1).index_select(0, rows)                             # (N, dim): executing rows only
        cos_e, sin_e = cos.index_select(0, t_idx)[:, None], sin.index_select(0, t_idx)[:, None]
        if evict:  # Q, K and V of the executing tokens only
            q, ke, ve = self.project(xe)                                            # (N, heads, hd)
            ke = apply_rope(ke, cos_e, sin_e)
        else:
            q, = self.project(xe, kv=False)                                         # (N, nh, hd)
        q = apply_rope(q, cos_e, sin_e)
        n_q = max(per_seq)
        if B == 1:  # one sequence: its executing tokens are already packed, in order
            slot = torch.arange(n_q, device=x.device)
        else:  # pack each sequence's executing tokens to the left: slot = rank among them
            slot = (execute.cumsum(1) - 1).view(-1).index_select(0, rows)
        q = self._pack(q, b_idx, slot, B, n_q)                                      # (B, nh, n_q, hd)
        if evict and self.cache is None:
            # keys = the executing tokens themselves, packed like the queries: causal over slots
            k, v = self._pack(ke, b_idx, slot, B, n_q), self._pack(ve, b_idx, slot, B, n_q)
            if B == 1:
                mask, causal = None, True
            else:
                filled = torch.arange(n_q, device=x.device)[None, :] < execute.sum(1, keepdim=True)  # (B, n_q)
                k_slot = torch.arange(n_q, device=x.device)
                mask = ((k_slot[None, None, :] <= k_slot[None, :, None]) & filled[:, None, :])[:, None]
                causal = False
        else:
            key_keep = None
            if evict:  # write the executing tokens' K/V at their positions; the others stay masked
                k_full = x.new_zeros(B, T, self.n_kv_heads, self.head_dim)
                v_full = x.new_zeros(B, T, self.n_kv_heads, self.head_dim)
                k_full[b_idx, t_idx], v_full[b_idx, t_idx] = ke.to(x.dtype), ve.to(x.dtype)
                k, v, key_keep = self.cache.update(start_pos, k_full.transpose(1, 2), v_full.transpose(1, 2), execute)
            pos = torch.zeros(B, n_q, dtype=torch.long, device=x.device)           # padded slots: position 0
            pos[b_idx, slot] = t_idx + start_pos
            k_pos = torch.arange(k.shape[2], device=x.device)
            mask = k_pos[None, None, :] <= pos[:, :, None]                           # (B, n_q, S): causal by true position
            if key_keep is not None:  # an executing query is itself kept
                mask = mask & key_keep[:, None, :]
            mask, causal = mask[:, None], False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_heads != self.n_kv_heads)  # (B, nh, n_q, hd)
        y = y.transpose(1, 2)                                                        # (B, n_q, nh, hd)
        y = y[0] if B == 1 else y[b_idx, slot]                                       # (N, nh, hd)
        return self.wo(y.reshape(-1, self.n_heads * self.head_dim))

    @staticmethod
    def _pack(rows, b_idx, slot, B, n):
        """Per-token rows (N, heads, hd) -> (B, heads, n, hd), each row at (b_idx, slot); zeros elsewhere."""
        if B == 1 and rows.shape[0] == n:
            return rows.transpose(0, 1)[None]
        out = rows.new_zeros(B, n, *rows.shape[1:])
        out[b_idx, slot] = rows
        return out.transpose(1, 2)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). w1 = gate_proj, w3 = up_proj, w2 = down_proj."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.fused = None  # inference only: (w1|w3, None) from fuse_linears (Transformer.fuse_weights)

    def forward(self, x):
        if not self.training and still_fused(self.fused, self.w1, self.w3):  # one matmul for w1 and w3
            gate, up = F.linear(x, self.fused[0]).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
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
        self.router_fused = None      # inference only: both routers' (weight, bias) in one, fuse_linears

    def forward(self, x, cos, sin, start_pos=0, routing: Routing | None = None):
        """x (B, T, dim) -> (out (B, T, dim), gates (2, B, T) [attention, MLP] or None when not routed)."""
        if routing is None or self.attention_router is None:  # the plain Llama block
            h = x + self.attention(self.attention_norm(x), cos, sin, start_pos)
            return h + self.feed_forward(self.ffn_norm(h)), None
        g_attn = self._gate(self.attention_router, x, routing, 0, start_pos)              # (B, T)
        key_keep = (g_attn > 0.5) if self.router_cfg.kv == "evict" else None
        h = x + g_attn[..., None].to(x.dtype) * self.attention(self.attention_norm(x), cos, sin, start_pos, key_keep)
        router_in = x if self.router_cfg.mlp_input == "block" else h
        g_mlp = self._gate(self.ffn_router, router_in, routing, 1, start_pos)             # (B, T)
        out = h + g_mlp[..., None].to(x.dtype) * self.feed_forward(self.ffn_norm(h))
        return out, torch.stack([g_attn, g_mlp])

    def forward_fast(self, x, cos, sin, start_pos, routing: Routing):
        """Same result as forward(), but skipped sublayers do not run (inference, stage 2).

        Each sublayer runs on the gathered (batch, time) rows that execute it, and its output is
        added back into those rows of the residual stream. When the MLP router reads the block input,
        both decisions of the block come from one router matmul and reach the host in one sync (the
        counts), which also sizes every gather: no further sync.
        """
        B, T, D = x.shape
        if self.router_cfg.mlp_input == "block":  # decided from x: both known before attention runs
            gates = self._gate_pair(x, routing, start_pos)                         # (2, B, T)
            counts = gates.sum(-1).tolist()                                         # [[attn per seq], [mlp per seq]]
            if B * T == 1:
                return self._decode_one(x, cos, sin, start_pos, gates, counts[0][0], counts[1][0])
            g_attn = gates[0]
        else:
            g_attn = self._gate(self.attention_router, x, routing, 0, start_pos)   # (B, T)
            counts = [g_attn.sum(-1).tolist()]
        h = self._attention_fast(x, g_attn, [int(c) for c in counts[0]], cos, sin, start_pos)
        if self.router_cfg.mlp_input == "block":
            g_mlp = gates[1]
        else:
            g_mlp = self._gate(self.ffn_router, h, routing, 1, start_pos)
            counts.append(g_mlp.sum(-1).tolist())
        n_mlp = int(sum(counts[1]))
        if n_mlp == B * T:
            out = h + self.feed_forward(self.ffn_norm(h))
        elif n_mlp == 0:
            out = h
        else:
            rows = torch.nonzero_static(g_mlp.view(-1), size=n_mlp).squeeze(1)      # (N,) in B*T
            flat = h.reshape(B * T, D)
            out = flat.index_add(0, rows, self.feed_forward(self.ffn_norm(flat.index_select(0, rows))).to(h.dtype))
            out = out.view(B, T, D)
        return out, torch.stack([g_attn, g_mlp])

    def _attention_fast(self, x, g_attn, per_seq, cos, sin, start_pos):
        """x + attention on the tokens that execute it; per_seq: executing tokens per sequence."""
        B, T, D = x.shape
        evict = self.router_cfg.kv == "evict"
        xn = self.attention_norm(x)
        n = sum(per_seq)
        if n == B * T:  # everyone executes: the dense path (under evict, every key is kept)
            return x + self.attention(xn, cos, sin, start_pos, g_attn > 0.5 if evict else None)
        rows = torch.nonzero_static(g_attn.view(-1), size=n).squeeze(1)             # (N,) in B*T
        out = self.attention.forward_sparse(xn, g_attn > 0.5, rows, per_seq, cos, sin, start_pos, evict)
        return x if out is None else x.reshape(B * T, D).index_add(0, rows, out.to(x.dtype)).view(B, T, D)

    def _decode_one(self, x, cos, sin, start_pos, gates, attn_on, mlp_on):
        """One token (batch-1 decoding): a plain branch per sublayer, no gathering at all.

        A skipped attention still writes the token's K and V to the cache under "keep", and
        nothing under evict (its slot is masked); a skipped MLP costs nothing.
        """
        evict = self.router_cfg.kv == "evict"
        if attn_on:
            h = x + self.attention(self.attention_norm(x), cos, sin, start_pos, gates[0] > 0.5 if evict else None)
        elif evict:
            self.attention.cache.keep[:1, start_pos] = False
            h = x
        else:  # K/V only
            self.attention.forward_sparse(self.attention_norm(x), gates[0] > 0.5, x.new_zeros(0, dtype=torch.long),
                                          [0], cos, sin, start_pos)
            h = x
        out = h + self.feed_forward(self.ffn_norm(h)) if mlp_on else h
        return out, gates

    def _gate(self, router, x, routing, module, start_pos=0):
        if self.layer_id < self.router_cfg.protect_first:  # always executes: no decision, no gradient
            return torch.ones(x.shape[:2], device=x.device)
        return routing.gate(router(x), self.layer_id, module, start_pos)

    def _gate_pair(self, x, routing, start_pos=0):
        """Both gates of the block from the block input x: (2, B, T). One matmul when the routers are fused."""
        if self.layer_id < self.router_cfg.protect_first:
            return torch.ones(2, *x.shape[:2], device=x.device)
        routers = (self.attention_router.proj, self.ffn_router.proj)
        if not self.training and still_fused(self.router_fused, *routers):
            logits = F.linear(self.attention_router.prepare(x), *self.router_fused)  # (B, T, 4)
            return routing.gate_pair(logits, self.layer_id, start_pos)
        return torch.stack([routing.gate(self.attention_router(x), self.layer_id, 0, start_pos),
                            routing.gate(self.ffn_router(x), self.layer_id, 1, start_pos)])


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
        self._rope_len = 0

    # --- routers -------------------------------------------------------------------------------
    def add_routers(self, cfg: RouterConfig):
        """Put a fresh attention router and MLP router in every block."""
        self.router_cfg = cfg
        device = self.tok_embeddings.weight.device
        for layer in self.layers:
            layer.attention_router = Router(self.args.dim, cfg).to(device)
            layer.ffn_router = Router(self.args.dim, cfg).to(device)
            layer.router_cfg = cfg
        return self

    def fuse_weights(self):
        """For inference (generation, evaluation, bench): lay wq|wk|wv, w1|w3 and, where both routers
        read the block input, the two linear routers of every block out as one matrix each, so that
        one matmul does the work of several. The layers keep their weights (views into the fused
        matrices: no extra memory, the same state dict). Training never uses them (train mode), nor
        does a layer with an unmerged LoRA adapter; a later .to(dtype) or reassigned weight turns
        them off (still_fused). Call it after moving the model to its device and dtype."""
        for layer in self.layers:
            layer.attention.fused = fuse_linears(layer.attention.wq, layer.attention.wk, layer.attention.wv)
            layer.feed_forward.fused = fuse_linears(layer.feed_forward.w1, layer.feed_forward.w3)
            cfg = self.router_cfg
            if cfg is not None and cfg.kind == "linear" and cfg.mlp_input == "block":
                layer.router_fused = fuse_linears(layer.attention_router.proj, layer.ffn_router.proj)
        return self

    def router_state_dict(self):
        return {k: v for k, v in self.state_dict().items() if "_router." in k}

    # --- rope tables, grown on demand so a 128k-context model does not allocate them all -------
    def _rope(self, end, device):
        if end > self._rope_len or getattr(self, "rope_cos", None) is None or self.rope_cos.device != device:
            length = max(end, min(self.args.max_seq_len, 4096))
            cos, sin = rope_cos_sin(self.args, length)
            self.register_buffer("rope_cos", cos.to(device), persistent=False)
            self.register_buffer("rope_sin", sin.to(device), persistent=False)
            self._rope_len = length
        return self.rope_cos, self.rope_sin

    # --- KV cache --------------------------------------------------------------------------------
    def setup_cache(self, batch_size, max_len, dtype=None):
        p = self.tok_embeddings.weight
        for layer in self.layers:
            layer.attention.cache = KVCache(batch_size, max_len, self.args.n_kv_heads, self.args.head_dim,
                                            dtype or p.dtype, p.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache = None

    # --- forward ---------------------------------------------------------------------------------
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
        cos, sin = self._rope(start_pos + T, tokens.device)
        cos, sin = cos[start_pos:start_pos + T], sin[start_pos:start_pos + T]
        routed = routing is not None and self.router_cfg is not None
        h = self.tok_embeddings(tokens)                               # (B, T, dim)
        gates = []
        for layer in self.layers:
            if routed and routing.fast:
                h, g = layer.forward_fast(h, cos, sin, start_pos, routing)
            else:
                h, g = layer(h, cos, sin, start_pos, routing if routed else None)
            gates.append(g)
        gates = torch.stack(gates) if routed else None                 # (L, 2, B, T)
        logits = self.output(self.norm(h))
        if targets is None:
            return logits, None, gates
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss, gates

    # --- generation ------------------------------------------------------------------------------
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
        total = T + max_new_tokens
        if use_cache:
            self.setup_cache(B, total)
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
