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
    """cos, sin tables (length, head_dim) for positions 0..length-1."""
    t = torch.arange(length, dtype=torch.float32)
    angles = torch.outer(t, rope_frequencies(args))          # (length, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)            # (length, head_dim), rotate-half layout
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x (B, heads, T, head_dim); cos/sin broadcastable to it. Rotates pairs (i, i + head_dim/2)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


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
        """x (B, T, dim) at positions start_pos..start_pos+T-1; cos/sin (T, head_dim).

        key_keep (B, T) bool, "evict" semantics only: False marks tokens that write no usable K/V.
        """
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, nh, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
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

    def forward_sparse(self, x, execute, cos, sin, start_pos=0, evict=False):
        """The fast path: only the tokens that execute attention run it as queries.

        x (B, T, dim) normalized input; execute (B, T) bool. K and V: under "keep" every token
        computes them (later queries attend to skipped tokens too); under evict only executing
        tokens do, and a skipped token's cache slot stays masked. Returns (rows, out): rows (N,)
        indices into the flattened (B*T) tokens that execute, out (N, dim) their output, or None.
        """
        B, T, _ = x.shape
        rows = execute.view(-1).nonzero().squeeze(1)                               # (N,) in B*T
        if not evict:  # K/V of every token: later queries may attend to it
            k, v = self._kv(x, cos, sin)                                            # (B, nkv, T, hd) each
            if self.cache is not None:
                k, v, _ = self.cache.update(start_pos, k, v)
        if rows.numel() == 0:
            if evict and self.cache is not None:  # nothing computed; the slots stay masked
                self.cache.keep[:B, start_pos:start_pos + T] = False
            return rows, None
        b_idx, t_idx = rows // T, rows % T
        xe = x.reshape(B * T, -1).index_select(0, rows)                             # (N, dim): executing rows only
        cos_e, sin_e = cos.index_select(0, t_idx)[:, None], sin.index_select(0, t_idx)[:, None]
        q = apply_rope(self.wq(xe).view(-1, self.n_heads, self.head_dim), cos_e, sin_e)   # (N, nh, hd)
        if evict:
            ke = apply_rope(self.wk(xe).view(-1, self.n_kv_heads, self.head_dim), cos_e, sin_e)  # (N, nkv, hd)
            ve = self.wv(xe).view(-1, self.n_kv_heads, self.head_dim)
        if B == 1:  # one sequence: its executing tokens are already packed, in order
            n_q = rows.numel()
            slot = torch.arange(n_q, device=x.device)
        else:  # pack each sequence's executing tokens to the left: slot = rank among them
            slot = (execute.cumsum(1) - 1).view(-1).index_select(0, rows)
            n_q = int(slot.max()) + 1
        pos = torch.zeros(B, n_q, dtype=torch.long, device=x.device)               # padded slots: position 0
        pos[b_idx, slot] = t_idx + start_pos
        q = self._pack(q, b_idx, slot, B, n_q)                                      # (B, nh, n_q, hd)
        if evict and self.cache is None:
            # keys = the executing tokens themselves, packed like the queries: causal over slots
            k, v = self._pack(ke, b_idx, slot, B, n_q), self._pack(ve, b_idx, slot, B, n_q)
            if B == 1:
                mask, causal = None, True
            else:
                filled = torch.zeros(B, n_q, dtype=torch.bool, device=x.device)
                filled[b_idx, slot] = True
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
            k_pos = torch.arange(k.shape[2], device=x.device)
            mask = k_pos[None, None, :] <= pos[:, :, None]                           # (B, n_q, S): causal by true position
            if key_keep is not None:  # an executing query is itself kept
                mask = mask & key_keep[:, None, :]
            mask, causal = mask[:, None], False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_heads != self.n_kv_heads)  # (B, nh, n_q, hd)
        y = y.transpose(1, 2)                                                        # (B, n_q, nh, hd)
        y = y[0] if B == 1 else y[b_idx, slot]                                       # (N, nh, hd)
        return rows, self.wo(y.reshape(-1, self.n_heads * self.head_dim))

    def _kv(self, x, cos, sin):
        B, T, _ = x.shape
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        return apply_rope(k, cos, sin), v

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
        added back into those rows of the residual stream. One host sync per sublayer (the count).
        """
        g_attn = self._gate(self.attention_router, x, routing, 0, start_pos)              # (B, T)
        g_mlp = None
        if self.router_cfg.mlp_input == "block":  # decided from x: known before attention runs
            g_mlp = self._gate(self.ffn_router, x, routing, 1, start_pos)
        if x.shape[0] * x.shape[1] == 1 and g_mlp is not None:
            return self._decode_one(x, cos, sin, start_pos, g_attn, g_mlp)
        execute = g_attn > 0.5
        evict = self.router_cfg.kv == "evict"
        xn = self.attention_norm(x)
        B, T, D = x.shape
        if not evict and bool(execute.all()):
            h = x + self.attention(xn, cos, sin, start_pos)          # everyone executes: the dense path
        else:
            rows, out = self.attention.forward_sparse(xn, execute, cos, sin, start_pos, evict)
            h = x if out is None else x.reshape(B * T, D).index_add(0, rows, out.to(x.dtype)).view(B, T, D)
        if g_mlp is None:
            g_mlp = self._gate(self.ffn_router, h, routing, 1, start_pos)
        rows = (g_mlp > 0.5).view(-1).nonzero().squeeze(1)                           # (N,) in B*T
        if rows.numel() == B * T:
            out = h + self.feed_forward(self.ffn_norm(h))
        elif rows.numel() == 0:
            out = h
        else:
            flat = h.reshape(B * T, D)
            out = flat.index_add(0, rows, self.feed_forward(self.ffn_norm(flat.index_select(0, rows))).to(h.dtype))
            out = out.view(B, T, D)
        return out, torch.stack([g_attn, g_mlp])

    def _decode_one(self, x, cos, sin, start_pos, g_attn, g_mlp):
        """One token (batch-1 decoding): a plain branch per sublayer, no gathering at all.

        A skipped attention still writes the token's K and V to the cache under "keep", and
        nothing under evict (its slot is masked); a skipped MLP costs nothing.
        """
        attn_on, mlp_on = torch.cat([g_attn, g_mlp]).view(-1).tolist()  # one host sync for both
        xn = self.attention_norm(x)
        if attn_on:
            h = x + self.attention(xn, cos, sin, start_pos, g_attn > 0.5 if self.router_cfg.kv == "evict" else None)
        else:
            self.attention.forward_sparse(xn, g_attn > 0.5, cos, sin, start_pos, self.router_cfg.kv == "evict")
            h = x
        out = h + self.feed_forward(self.ffn_norm(h)) if mlp_on else h
        return out, torch.stack([g_attn, g_mlp])

    def _gate(self, router, x, routing, module, start_pos=0):
        if self.layer_id < self.router_cfg.protect_first:  # always executes: no decision, no gradient
            return torch.ones(x.shape[:2], device=x.device)
        return routing.gate(router(x), self.layer_id, module, start_pos)


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
