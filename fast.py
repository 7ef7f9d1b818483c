"""The speed engine: the reference model of model.py, made fast for inference.

    import fast
    model = fast.accelerate(checkpoint.load(path))        # fused matmuls, routers folded in
    model = fast.accelerate(model, compile_decoding=True)  # and torch.compile'd decoding steps

accelerate() turns a model.Transformer into a FastTransformer in place: the same modules, weights
and state dict, with engine subclasses of model.py's classes that run the same mathematics with
less overhead. Every path here equals model.py's masked reference (tests/test_routing.py,
tests/test_fast.py):

- fused weights: [wk; wv; wq] and [w1; w3] as one matrix each (one matmul where there were three or
  two), the layers' weights views into them (no extra memory);
- folded routers: a linear router reads rms_norm(x) = attention_norm(x) / w, so its rows, divided
  by w, lead the attention's fused matrix, and the routing decisions of a block come out of the
  same matmul as every token's K and V;
- product choice: one-row products run at the speed of memory, and how a CPU's BLAS streams a
  matrix for one row differs from machine to machine; choose_products times F.linear against a
  batched split of the same product once per process and shape, and linear() takes the faster;
- both decisions of a block known before it runs (one host sync sizes every gather); chunked
  attention for many executing queries (scores follow the causal triangle);
- compiled decoding: the small operations of a one-token step fused by torch.compile, up to
  DECODE_GROUP blocks per graph, a routed sublayer a real branch inside the graph (torch.cond);
  several sequences decode through one graph for their executing rows.

model.py never imports this file; training never uses it (stage 1 trains model.py's masked path,
stage 2 its skipping path).
"""
import math
import statistics
import sys
import time
from collections import namedtuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import UserError
from model import Attention, FeedForward, Transformer, TransformerBlock, apply_rope
from router import RouterConfig, Routing, hard_gate_pair


# ----------------------------------------------------------------------------------------------
# Few-row products: per matrix shape, the faster of F.linear and split_linear, as timed here

FEW_ROWS = 8           # products of up to this many rows are the ones measured
FASTER_SPLIT = {}      # (out, in, dtype, one row?) -> whether split_linear was measured faster here


def split_linear(x, weight):
    """x (rows, in) @ weight (out, in).T as weight (c, out/c, in) @ x.T (c, in, rows), c = gcd(out, 8)
    blocks of the weight's rows multiplied as one batched product: the same dot products as
    F.linear (equal up to fp32 rounding), spread over the cores by the batched kernel."""
    rows, n_in = x.numel() // x.shape[-1], x.shape[-1]
    c = math.gcd(weight.shape[0], 8)
    y = torch.bmm(weight.view(c, -1, n_in), x.reshape(rows, n_in).t().expand(c, n_in, rows))  # (c, out/c, rows)
    return y.permute(2, 0, 1).reshape(*x.shape[:-1], weight.shape[0])


def linear(x, weight):
    """x (..., in) @ weight (out, in).T -> (..., out): F.linear, or split_linear where that was
    measured faster on this machine for this matrix and row count (choose_products)."""
    rows = x.numel() // x.shape[-1]
    if (rows <= FEW_ROWS and x.device.type == "cpu" and weight.is_contiguous()
            and FASTER_SPLIT.get((*weight.shape, weight.dtype, rows == 1), False)):
        return split_linear(x, weight)
    return F.linear(x, weight)


def _seconds(product, x, weights):
    """Seconds for product(x, w) over every matrix w of `weights`, one after the other."""
    t0 = time.perf_counter()
    for w in weights:
        product(x, w)
    return time.perf_counter() - t0


@torch.no_grad()
def choose_products(weights, repeats=7):
    """For each CPU matrix shape not measured yet in this process: time F.linear and split_linear on
    one row and on FEW_ROWS // 2 rows and record the faster in FASTER_SPLIT. -> the number of shapes
    measured now. Each timing is one pass over every matrix of that shape (one per block: read from
    memory, as decoding reads them, not from a cache that one matrix timed again and again would sit
    in), the two products interleaved, the median of `repeats` passes (one small matrix timed alone
    is too noisy to choose by)."""
    by_shape = {}
    for w in weights:
        if w.device.type == "cpu" and w.dim() == 2 and w.is_contiguous() and math.gcd(w.shape[0], 8) > 1:
            by_shape.setdefault((*w.shape, w.dtype), []).append(w)
    measured = 0
    for shape, mats in by_shape.items():
        for rows in (1, FEW_ROWS // 2):
            key = (*shape, rows == 1)
            if key in FASTER_SPLIT:
                continue
            x = torch.randn(rows, shape[1], dtype=shape[2])
            _seconds(F.linear, x, mats[:1]), _seconds(split_linear, x, mats[:1])  # warm up
            plain, split = zip(*[(_seconds(F.linear, x, mats), _seconds(split_linear, x, mats)) for _ in range(repeats)])
            FASTER_SPLIT[key] = statistics.median(split) < statistics.median(plain)
            measured += 1
    return measured


class Linear(nn.Linear):
    """nn.Linear whose product is linear(): the same parameters and state dict."""

    def forward(self, x):
        y = linear(x, self.weight)
        return y if self.bias is None else y + self.bias


DECODE_GROUP = 10  # blocks per compiled graph in one-token forwards (docs/SPEED.md: how many pay off)
ATTN_CHUNK = 64  # queries per attention call on the fast path, one sequence on a CPU (FastAttention._attend_by_position)



# ----------------------------------------------------------------------------------------------
# Inference-only fused weights: several linears that read the same input, laid out as one matrix

def fuse_linears(*linears, head=None):
    """Re-lay the weights of bias-free linears that read the same input into one contiguous matrix
    (sum of outs, in), after the rows of `head` if given. Each linear keeps its own weight, now a view
    into that matrix: nothing is stored twice, the state dict does not change, and an in-place update
    of a weight updates the matrix too. -> the matrix."""
    weight = torch.cat(([head] if head is not None else []) + [m.weight.detach() for m in linears])
    start = 0 if head is None else head.shape[0]
    for m in linears:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(weight[start:start + n], requires_grad=m.weight.requires_grad)
        start += n
    return weight


def snapshot(owners_and_names):
    """What unchanged() compares against: for each (module, parameter name), the module's parameter
    dict, the parameter and its version. (unchanged() runs for every routed block of every decoded
    token: a plain dict lookup, where getattr(module, name) would go through nn.Module.__getattr__.)"""
    return [(m._parameters, name, m._parameters[name], m._parameters[name]._version) for m, name in owners_and_names]


def unchanged(snap):
    """Whether every parameter of a snapshot is still in place and unmodified (no in-place update since)."""
    return all(params.get(name) is p and p._version == v for params, name, p, v in snap)


# ----------------------------------------------------------------------------------------------
# The sublayers, fused

class FastAttention(Attention):
    """Attention with [router rows; wk; wv; wq] as one matrix (fused) at inference."""
    fused, router_rows = None, 0  # set by FastTransformer.fuse_weights

    def fused_weights(self):
        """[router rows; wk; wv; wq] when fused and in eval mode, else None: the layers run one by one."""
        return None if self.training else self.fused

    def project(self, x, q=True, kv=True, kv_given=None):
        """x (..., dim) -> [q (..., nh, hd)] + [k, v (..., nkv, hd)], in one matmul when fused.
        kv_given: (k, v) already computed (with the router logits): only q is projected."""
        if kv_given is not None:
            return (self.project(x, kv=False) if q else []) + list(kv_given)
        fused = self.fused_weights()
        nq, nkv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        if fused is not None:  # rows: router, k, v, q
            r = self.router_rows
            k_v_q = linear(x, fused[r + (0 if kv else 2 * nkv):r + 2 * nkv + (nq if q else 0)])
            parts = k_v_q.split([nkv, nkv] * kv + [nq] * q, dim=-1)
            parts = parts[2:] + parts[:2] if q and kv else parts                    # -> q, k, v order
        else:
            parts = ([self.wq(x)] if q else []) + ([self.wk(x), self.wv(x)] if kv else [])
        heads = [self.n_heads] * q + [self.n_kv_heads, self.n_kv_heads] * kv
        return [p.unflatten(-1, (h, self.head_dim)) for p, h in zip(parts, heads)]

    def forward(self, x, cos, sin, start_pos=0, key_keep=None, kv=None):
        """x (B, T, dim) at positions start_pos..start_pos+T-1; cos/sin (T, head_dim).

        key_keep (B, T) bool, "evict" semantics only: False marks tokens that write no usable K/V.
        kv: this x's (k, v) (B, T, nkv, hd) before RoPE, when already computed (the fast path).
        """
        B, T, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.project(x, kv_given=kv))        # (B, heads, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v, key_keep_all = self.cache.update(start_pos, k, v, key_keep)
            if key_keep is not None:
                key_keep = key_keep_all
        if key_keep is None and (start_pos == 0 or T == 1):  # plain causal prefill, or one token that sees every key
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=self.n_heads != self.n_kv_heads)
        else:  # model.py's mask: causal by absolute position, and under evict only kept keys or itself
            positions = torch.arange(start_pos, start_pos + T, device=x.device)[None].expand(B, T)
            y = self.attend(q, k, v, positions, key_keep)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))

    def sparse_rows(self, x, execute, rows, per_seq, cos, sin, start_pos=0, evict=False, kv=None):
        """The fast path: only the tokens that execute attention run it as queries.

        x (B, T, dim) normalized input; execute (B, T) bool; rows (N,) the indices of the executing
        tokens in the flattened B*T; per_seq: how many execute in each sequence (host ints). K and V:
        under "keep" every token computes them (later queries attend to skipped tokens too); under
        evict only executing tokens do, and a skipped token's cache slot stays masked. kv: every
        token's (k, v) before RoPE, when already computed (with the router logits, under "keep").
        Returns out (N, dim), the executing tokens' attention output, or None when N = 0.
        """
        B, T, _ = x.shape
        if not evict:  # K/V of every token: later queries may attend to it
            k, v = (t.transpose(1, 2) for t in self.project(x, q=False, kv_given=kv))  # (B, nkv, T, hd)
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
        y = None
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
            if B == 1:  # the executing tokens' positions, in order
                pos = (t_idx + start_pos)[None]                                     # (1, n_q)
            else:
                pos = torch.zeros(B, n_q, dtype=torch.long, device=x.device)       # padded slots: position 0
                pos[b_idx, slot] = t_idx + start_pos
            y = self._attend_by_position(q, k, v, pos, key_keep)
        if y is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               enable_gqa=self.n_heads != self.n_kv_heads)  # (B, nh, n_q, hd)
        y = y.transpose(1, 2)                                                        # (B, n_q, nh, hd)
        y = y[0] if B == 1 else y[b_idx, slot]                                       # (N, nh, hd)
        return self.wo(y.reshape(-1, self.n_heads * self.head_dim))

    def _attend_by_position(self, q, k, v, pos, key_keep=None):
        """Queries q (B, nh, n_q, hd) at positions pos (B, n_q) attend causally to keys k, v (B, nkv, S, hd)
        at positions 0..S-1 (under evict, only to kept keys: key_keep (B, S)). -> (B, nh, n_q, hd).

        One sequence on a CPU, more than two chunks' worth of queries: the queries go in chunks of
        ATTN_CHUNK, each against the keys up to its last query only, so the scores computed follow the
        causal triangle (as the dense causal kernel's do) rather than the whole n_q x S rectangle an
        explicit mask would cost. (Fewer queries: one call, no host sync for the chunks' last positions;
        the scores saved would not pay for the calls.)
        """
        B, n_q = pos.shape
        chunk = ATTN_CHUNK if B == 1 and q.device.type == "cpu" and n_q > 2 * ATTN_CHUNK else n_q
        starts = list(range(0, n_q, chunk))
        lasts = (pos[0, [min(c + chunk, n_q) - 1 for c in starts]].tolist() if chunk < n_q
                 else [k.shape[2] - 1])                                             # one call: every key
        out = []
        for c, last in zip(starts, lasts):
            keys = last + 1                                                         # keys this chunk can see
            mask = torch.arange(keys, device=q.device)[None, None, :] <= pos[:, c:c + chunk, None]  # (B, n_c, keys)
            if key_keep is not None:  # an executing query is itself kept
                mask = mask & key_keep[:, None, :keys]
            out.append(F.scaled_dot_product_attention(q[:, :, c:c + chunk], k[:, :, :keys], v[:, :, :keys],
                                                      attn_mask=mask[:, None], enable_gqa=self.n_heads != self.n_kv_heads))
        return out[0] if len(out) == 1 else torch.cat(out, dim=2)

    @staticmethod
    def _pack(rows, b_idx, slot, B, n):
        """Per-token rows (N, heads, hd) -> (B, heads, n, hd), each row at (b_idx, slot); zeros elsewhere."""
        if B == 1 and rows.shape[0] == n:
            return rows.transpose(0, 1)[None]
        out = rows.new_zeros(B, n, *rows.shape[1:])
        out[b_idx, slot] = rows
        return out.transpose(1, 2)



class FastFeedForward(FeedForward):
    """SwiGLU with [w1; w3] as one matrix at inference."""
    fused = None  # set by FastTransformer.fuse_weights

    def forward(self, x):
        if self.fused is not None and not self.training:  # one matmul for w1 and w3
            gate, up = linear(x, self.fused).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return super().forward(x)


# ----------------------------------------------------------------------------------------------
# The steps of a block. Decoding runs them n_layers times per token, each as ~15-30 small
# operations whose fixed cost rivals the matmuls' (bench.py: dense decode / floor).
# FastTransformer.compile_decoding() swaps in, for one-token forwards only, torch.compile'd versions
# that fuse those operations (DecodeSteps), several blocks per graph where it can (each call into
# compiled code has a fixed cost too); prefill stays as written.

DecodeSteps = namedtuple("DecodeSteps", "attention mlp router blocks routed_blocks sparse")

def attention_step(block, x, xn, cos, sin, start_pos, key_keep=None, kv=None):
    """x (B, T, dim) + attention(xn): the residual stream after the attention sublayer.
    xn: attention_norm(x), or None to compute it here."""
    xn = block.attention_norm(x) if xn is None else xn
    return x + block.attention(xn, cos, sin, start_pos, key_keep, kv)


def mlp_step(block, h):
    """h (B, T, dim) + MLP(norm(h)): the residual stream after the MLP sublayer."""
    return h + block.feed_forward(block.ffn_norm(h))


def router_step(block, x, rows):
    """The routed fast path's first step when the routers are folded into the attention's matrix:
    xn = attention_norm(x) and, from one matmul, xn times its leading `rows` rows (the routers'
    logits, then, under "keep", every token's K and V) -> (xn, (B, T, rows))."""
    xn = block.attention_norm(x)
    return xn, linear(xn, block.attention.fused[:rows])


def branch(pred, run, skip, operands):
    """run(*operands) if pred (a 0-d bool tensor) holds, else skip(*operands): only one of them runs.
    Compiled, a torch.cond, a branch inside the graph; eager, a Python if (which FLOP counters see as
    it is: bench.py counts the decoding's FLOPs eager, torch.compiler.set_stance("force_eager"))."""
    if torch.compiler.is_compiling():
        return torch.cond(pred, run, skip, operands)
    return run(*operands) if pred else skip(*operands)


def blocks_step(blocks, x, cos, sin, start_pos):
    """Plain (dense) blocks one after the other, attention then MLP in each. Compiled for one-token
    forwards: one graph for a group of up to DECODE_GROUP blocks (FastTransformer._decode_group)."""
    for block in blocks:
        x = mlp_step(block, attention_step(block, x, None, cos, sin, start_pos))
    return x


def routed_decode_step(block, x, cos, sin, start_pos, bias, offset, forced=None):
    """Batch-1 decoding through a routed block whose routers are folded into the attention's
    matrix, under "keep" (FastTransformer._decode_group): the same result as
    FastBlock._decode_one, written so that torch.compile makes the whole block one graph.

    One matmul gives the routers' logits and the token's K and V; the decisions follow (hard
    routing at `offset`, or `forced` (2, 1, 1) given); K and V go to the cache (later tokens attend
    to a skipped one); then each sublayer is a real branch, torch.cond(pred, run, skip): only the
    taken branch executes, and no Python runs between the block's operations (`branch`). Branches
    return flat (dim,) vectors (torch.cond wants both branches' outputs laid out alike).
    x (1, 1, dim) -> (out (1, 1, dim), gates (2, 1, 1) [attention, MLP])."""
    att = block.attention
    r, nkv, hd = att.router_rows, att.n_kv_heads * att.head_dim, att.head_dim
    xn = block.attention_norm(x)
    out = linear(xn, att.fused[:r + 2 * nkv])                                   # (1, 1, r + 2 nkv): logits, k, v
    logits = out[..., :r] + bias                                                # (1, 1, 4)
    gates = hard_gate_pair(logits, offset) if forced is None else forced                # (2, 1, 1)
    k, v = (t.unflatten(-1, (-1, hd)).transpose(1, 2) for t in out[..., r:].split(nkv, dim=-1))  # (1, nkv, 1, hd)
    keys, values, _ = att.cache.update(start_pos, apply_rope(k, cos, sin), v)

    def attend(xn, keys, values):
        q = linear(xn, att.fused[r + 2 * nkv:]).unflatten(-1, (-1, hd)).transpose(1, 2)   # (1, nh, 1, hd)
        y = F.scaled_dot_product_attention(apply_rope(q, cos, sin), keys, values, enable_gqa=att.n_heads != att.n_kv_heads)
        return att.wo(y.transpose(1, 2).reshape(1, 1, -1)).reshape(-1)

    def mlp(h):
        return block.feed_forward(block.ffn_norm(h)).reshape(-1)

    def skip(t, *_):
        return t.new_zeros(t.shape[-1])
    h = x + branch(gates[0].reshape(()) > 0.5, attend, skip, (xn, keys, values)).view_as(x)
    return h + branch(gates[1].reshape(()) > 0.5, mlp, skip, (h,)).view_as(x), gates


def routed_blocks_step(blocks, x, cos, sin, start_pos, biases, offset, forced):
    """routed_decode_step through consecutive blocks, as one compiled graph for up to DECODE_GROUP of
    them (FastTransformer._decode_group): fewer calls into compiled code per token. biases: per block;
    forced: the blocks' given decisions (len(blocks), 2, 1, 1), or None under hard routing.
    -> (out (1, 1, dim), gates (len(blocks), 2, 1, 1))."""
    gates = []
    for j, (block, bias) in enumerate(zip(blocks, biases)):
        x, g = routed_decode_step(block, x, cos, sin, start_pos, bias, offset, None if forced is None else forced[j])
        gates.append(g)
    return x, torch.stack(gates)


def sparse_decode_step(block, x, xn, kv, attn_rows, mlp_rows, cos, sin, start_pos):
    """Several sequences decoding one token each through a routed block under "keep", the rows that
    execute each sublayer known (FastBlock.forward_fast: one host sync per block sizes them):
    the same result as the gather/scatter path, written so that torch.compile makes it one graph
    (its sizes dynamic: one graph serves every count of executing rows).

    x, xn (B, 1, dim) the block input and attention_norm(x); kv: every row's (k, v) (B, 1, nkv, hd),
    computed with the router logits; attn_rows (Na,), mlp_rows (Nm,): the executing rows, or None
    where none executes. Every row's K and V go to the cache (later tokens attend to a skipped one);
    the executing rows' queries attend, each over its own sequence (a skipped row's query slot is
    zero, its output never read: (B - Na) x cache length dot products, as the gather path's packing
    costs too). -> out (B, 1, dim)."""
    att = block.attention
    B, _, D = x.shape
    k, v = (t.transpose(1, 2) for t in kv)                                      # (B, nkv, 1, hd)
    keys, values, _ = att.cache.update(start_pos, apply_rope(k, cos, sin), v)
    out = x.reshape(B, D)
    if attn_rows is not None:
        q, = att.project(xn.reshape(B, D).index_select(0, attn_rows), kv=False)   # (Na, nh, hd)
        q = x.new_zeros(B, *q.shape[1:]).index_copy(0, attn_rows, apply_rope(q, cos, sin))[:, :, None]  # (B, nh, 1, hd)
        y = F.scaled_dot_product_attention(q, keys, values, enable_gqa=att.n_heads != att.n_kv_heads)
        out = out.index_add(0, attn_rows, att.wo(y.reshape(B, D).index_select(0, attn_rows)))
    if mlp_rows is not None:
        out = out.index_add(0, mlp_rows, block.feed_forward(block.ffn_norm(out.index_select(0, mlp_rows))))
    return out.view(B, 1, D)


EAGER_STEPS = DecodeSteps(attention_step, mlp_step, router_step, blocks_step, routed_blocks_step, sparse_decode_step)


# ----------------------------------------------------------------------------------------------
# The routed block

class FastBlock(TransformerBlock):
    router_fold = None   # the routers folded into the attention's matrix: (biases (4,), snapshot)
    decode_steps = None  # the DecodeSteps compiled (compile_decoding)

    def forward(self, x, cos, sin, start_pos=0, routing: Routing | None = None):
        if routing is None or self.attention_router is None:  # the plain block
            return self._steps(x.shape[1]).blocks((self,), x, cos, sin, start_pos), None
        if routing.fast:
            return self.forward_fast(x, cos, sin, start_pos, routing)
        return super().forward(x, cos, sin, start_pos, routing)  # masked

    def _steps(self, T):
        """The block's DecodeSteps, compiled for one-token forwards after FastTransformer.compile_decoding()."""
        return self.decode_steps if T == 1 and self.decode_steps is not None else EAGER_STEPS

    def forward_fast(self, x, cos, sin, start_pos, routing: Routing):
        """Same result as model.TransformerBlock.forward, but skipped sublayers do not run.

        Each sublayer runs on the gathered (batch, time) rows that execute it, and its output is
        added back into those rows of the residual stream. When the MLP router reads the block input,
        both decisions of the block are known before it runs: they come from one matmul (with the
        K/V projection of every token, under "keep", when the routers are fused) and reach the host
        in one sync (the counts), which also sizes every gather: no further sync. (Compiled batch-1
        decoding through blocks that allow it does not come here: FastTransformer.run_blocks runs them in
        groups, routed_blocks_step.)
        """
        B, T, D = x.shape
        kv = None
        if self.router_cfg.mlp_input == "block":  # decided from x: both known before attention runs
            gates, kv, xn = self._gate_pair(x, routing, start_pos)                 # (2, B, T)
            counts = gates.sum(-1).tolist()                                         # [[attn per seq], [mlp per seq]]
            if B * T == 1:
                return self._decode_one(x, xn, kv, cos, sin, start_pos, gates, counts[0][0], counts[1][0])
            if T == 1 and kv is not None and self.decode_steps is not None and self.attention.cache is not None:
                # several sequences, one token each, compiled: the sublayers on their rows, one graph
                rows = [torch.nonzero_static(g.reshape(-1), size=int(sum(c))).squeeze(1) if sum(c) else None
                        for g, c in zip(gates, counts)]                             # (N,) executing rows, or None
                return self.decode_steps.sparse(self, x, xn, kv, *rows, cos, sin, start_pos), gates
            g_attn = gates[0]
        else:
            xn = self.attention_norm(x)
            g_attn = self.gate(self.attention_router, x, routing, 0, start_pos)   # (B, T)
            counts = [g_attn.sum(-1).tolist()]
        h = self._attention_fast(x, xn, kv, g_attn, [int(c) for c in counts[0]], cos, sin, start_pos)
        if self.router_cfg.mlp_input == "block":
            g_mlp = gates[1]
        else:
            g_mlp = self.gate(self.ffn_router, h, routing, 1, start_pos)
            counts.append(g_mlp.sum(-1).tolist())
        n_mlp = int(sum(counts[1]))
        if n_mlp == B * T:
            out = self._steps(T).mlp(self, h)
        elif n_mlp == 0:
            out = h
        else:
            rows = torch.nonzero_static(g_mlp.reshape(-1), size=n_mlp).squeeze(1)      # (N,) in B*T
            flat = h.reshape(B * T, D)
            out = flat.index_add(0, rows, self.feed_forward(self.ffn_norm(flat.index_select(0, rows))).to(h.dtype))
            out = out.view(B, T, D)
        return out, torch.stack([g_attn, g_mlp])

    def _attention_fast(self, x, xn, kv, g_attn, per_seq, cos, sin, start_pos):
        """x + attention on the tokens that execute it; per_seq: executing tokens per sequence."""
        B, T, D = x.shape
        evict = self.router_cfg.kv == "evict"
        n = sum(per_seq)
        if n == B * T:  # everyone executes: the dense path (under evict, every key is kept)
            return self._steps(T).attention(self, x, xn, cos, sin, start_pos, g_attn > 0.5 if evict else None, kv)
        rows = torch.nonzero_static(g_attn.reshape(-1), size=n).squeeze(1)             # (N,) in B*T
        out = self.attention.sparse_rows(xn, g_attn > 0.5, rows, per_seq, cos, sin, start_pos, evict, kv)
        return x if out is None else x.reshape(B * T, D).index_add(0, rows, out.to(x.dtype)).view(B, T, D)

    def _decode_one(self, x, xn, kv, cos, sin, start_pos, gates, attn_on, mlp_on):
        """One token (batch-1 decoding): a plain branch per sublayer, no gathering at all.

        A skipped attention still writes the token's K and V to the cache under "keep", and
        nothing under evict (its slot is masked); a skipped MLP costs nothing.
        """
        evict = self.router_cfg.kv == "evict"
        attend, mlp = self._steps(1)[:2]
        if attn_on:
            h = attend(self, x, xn, cos, sin, start_pos, gates[0] > 0.5 if evict else None, kv)
        elif evict:
            if self.attention.cache is not None:  # its slot stays masked
                self.attention.cache.keep[:1, start_pos] = False
            h = x
        else:  # K/V only
            self.attention.sparse_rows(xn, gates[0] > 0.5, x.new_zeros(0, dtype=torch.long), [0], cos, sin,
                                          start_pos, kv=kv)
            h = x
        out = mlp(self, h) if mlp_on else h
        return out, gates

    def _folded(self, x):
        """Whether the routers' rows lead the attention's fused matrix and can run there for x."""
        fused = self.attention.fused_weights()
        # (in fp32 only: in bf16, W/w and xn round differently from W and rms_norm(x), and decisions flip)
        return (fused is not None and fused.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type)
                and self._fold_current())

    def _fold_current(self):
        """Whether fuse_weights folded this block's routers and none of them changed since."""
        return self.router_fold is not None and unchanged(self.router_fold[1])

    def _gate_pair(self, x, routing, start_pos=0):
        """Both gates of the block from the block input x: (2, B, T); when the routers are folded
        into the attention's matrix under "keep", every token's (k, v) (B, T, nkv, hd) from the same
        matmul (else None); and xn = attention_norm(x)."""
        if self.layer_id < self.router_cfg.protect_first:
            return torch.ones(2, *x.shape[:2], device=x.device), None, self.attention_norm(x)
        if self._folded(x):
            # rms_norm(x) = attention_norm(x) / w, so the routers' W rms_norm(x) is (W / w) xn: their
            # rows, scaled once, lead the attention's matrix and run in the K/V matmul
            r, nkv = self.attention.router_rows, self.attention.n_kv_heads * self.attention.head_dim
            keep = self.router_cfg.kv == "keep"
            xn, out = self._steps(x.shape[1]).router(self, x, r + 2 * nkv * keep)
            logits = out[..., :r] + self.router_fold[0]                              # (B, T, 4)
            kv = None
            if keep:
                k, v = out[..., r:].split(nkv, dim=-1)
                kv = (k.unflatten(-1, (-1, self.attention.head_dim)), v.unflatten(-1, (-1, self.attention.head_dim)))
            return self.protect_tokens(routing.gate_pair(logits, self.layer_id, start_pos), routing, start_pos), kv, xn
        return torch.stack([self.gate(self.attention_router, x, routing, 0, start_pos),
                            self.gate(self.ffn_router, x, routing, 1, start_pos)]), None, self.attention_norm(x)


# ----------------------------------------------------------------------------------------------
# The model

class FastTransformer(Transformer):
    _fused_key = None  # set by fuse_weights: the weights it fused (see _weights_key)

    def add_routers(self, cfg: RouterConfig):
        self.drop_fused()  # fused matrices would hold the old routers' rows
        return super().add_routers(cfg)

    def fuse_weights(self):
        """For inference (generation, evaluation, bench): one matmul where the layers would run several.

        Per block: [wk; wv; wq] as one matrix, led by the two routers' rows where both read the
        normalized block input (linear routers, --mlp_input block): rms_norm(x) = attention_norm(x) / w,
        so a router's W rms_norm(x) is (W / w) attention_norm(x), computed with K and V in one matmul.
        And [w1; w3]. The layers keep their weights as views into these matrices (no extra memory, the
        same state dict). Training never uses them (train mode); adding LoRA drops them (lora.add_lora),
        so does moving, casting or reloading the model, and a router changed in place is not folded.
        On a CPU it also times the two few-row products for each matrix decoding multiplies by, once
        per process (choose_products: a second or two for SmolLM2-135M on a CPU).
        Call it last: after moving the model to its device and dtype and merging any LoRA."""
        refuse_unmerged_lora(self)
        cfg = self.router_cfg
        for layer in self.layers:
            att, ffn, head = layer.attention, layer.feed_forward, None
            layer.router_fold = None
            w = layer.attention_norm.weight
            if (cfg is not None and cfg.kind == "linear" and cfg.normalize and cfg.mlp_input == "block"
                    and layer.layer_id >= cfg.protect_first and bool((w.abs() > 1e-6).all())):
                routers = (layer.attention_router.proj, layer.ffn_router.proj)
                head = torch.cat([m.weight.detach() for m in routers]) / w.detach()[None, :]  # (4, dim)
                watched = [(m, name) for m in routers for name in ("weight", "bias")] + [(layer.attention_norm, "weight")]
                layer.router_fold = (torch.cat([m.bias.detach() for m in routers]), snapshot(watched))
            if isinstance(att, Attention):  # (not a removed one: baselines.drop_attention)
                att.fused = fuse_linears(att.wk, att.wv, att.wq, head=head)
                att.router_rows = 0 if head is None else head.shape[0]
                for m in (att.wq, att.wk, att.wv):
                    m.fused_view = True  # (LoRALinear.unmerge refuses: the fused matrix would keep the update)
            ffn.fused = fuse_linears(ffn.w1, ffn.w3)
            ffn.w1.fused_view = ffn.w3.fused_view = True
        self._fused_key = self._weights_key()
        choose_products(self._decode_matrices())
        return self

    def _decode_matrices(self):
        """Every matrix (or fused slice) a decoding step may multiply one or a few rows by."""
        mats = [self.output.weight]
        for layer in self.layers:
            att, ffn = layer.attention, layer.feed_forward
            if isinstance(att, Attention) and att.fused is not None:
                r, kv = att.router_rows, 2 * att.n_kv_heads * att.head_dim
                f = att.fused  # rows: router, k, v, q; Attention.project and the routed steps take these slices
                mats += [f, f[:r + kv], f[r:], f[r:r + kv], f[r + kv:]] + ([f[:r]] if r else []) + [att.wo.weight]
            mats += [ffn.fused if ffn.fused is not None else ffn.w1.weight, ffn.w2.weight]
        return mats

    def drop_fused(self):
        """Back to running every layer on its own (the layers' weights stay what they are)."""
        for layer in self.layers:
            if isinstance(layer.attention, Attention):
                layer.attention.fused, layer.attention.router_rows = None, 0
            layer.feed_forward.fused, layer.router_fold = None, None
        self._fused_key = None

    def compile_decoding(self):
        """torch.compile the DecodeSteps of every block for one-token forwards (decoding, batch 1 or
        several sequences), for inference: the small operations of a step become a few fused kernels.
        Up to DECODE_GROUP consecutive dense blocks are one graph (blocks_step); so are routed blocks
        in batch-1 decoding (routed_blocks_step, each block's sublayers real branches): a few calls
        into compiled code per token instead of one per block. With several routed sequences, per
        block, the router step, one host sync, then the executing rows of both sublayers in one graph
        (sparse_decode_step). Prefill and training stay eager. The first decoded tokens pay the
        compilation (~20-90 s on a CPU, once per process; inductor caches compiled kernels on disk).
        -> whether it compiled: False, with the reason printed, where torch.compile cannot run here
        (no C++ compiler, say)."""
        try:
            with torch.no_grad():
                torch.compile(mlp_step)(self.layers[0], self.tok_embeddings.weight[:1, None].detach())
        except Exception as e:  # inductor needs a working compiler toolchain; decoding then stays eager
            print(f"torch.compile unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]}): decoding runs eager",
                  file=sys.stderr)
            return False
        # one compiled function serves every block; shapes (cache length, batch) and the K/V and key
        # masks passed or not each specialize it once, more than dynamo's default limit of 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        steps = DecodeSteps(*(torch.compile(step) for step in EAGER_STEPS))
        for layer in self.layers:
            layer.decode_steps = steps
        return True

    def _weights_key(self):
        # moving, casting or reloading the model makes new tensors: new addresses
        return self.tok_embeddings.weight.data_ptr(), self.norm.weight.data_ptr()

    def forward(self, tokens, targets=None, routing: Routing | None = None, start_pos: int = 0):
        if self._fused_key is not None and self._fused_key != self._weights_key():
            self.drop_fused()  # moved, cast or reloaded since fuse_weights(): its matrices are stale
        return super().forward(tokens, targets, routing, start_pos)

    def run_blocks(self, h, cos, sin, start_pos, routing):
        """The blocks, in compiled groups where decoding allows (_decode_group), else one by one."""
        routed = routing is not None
        blocks = tuple(self.layers)  # (a slice of a tuple is cheap; a slice of the ModuleList builds a module)
        gates, given, i = [], None, 0  # gates: (n, 2, B, T) per block or group of blocks
        while i < len(blocks):
            group, routed_group = self._decode_group(blocks, i, h, routing, start_pos)
            if group:  # compiled decoding: several blocks in one graph
                steps = group[0].decode_steps
                if routed_group:
                    if routing.mode == "force" and given is None:  # every block's given decisions at this position,
                        # copied once per token (so that their strides do not depend on how many positions were
                        # given: no recompiling); each group takes its rows
                        given = (routing.given([layer.layer_id for layer in blocks], start_pos, 1)
                                 .to(h.device).clone(memory_format=torch.contiguous_format))  # (L, 2, 1, 1)
                    h, g = steps.routed_blocks(group, h, cos, sin, start_pos, tuple(layer.router_fold[0] for layer in group),
                                               routing.offset, None if given is None else given[i:i + len(group)])
                    gates.append(g)                                    # (n, 2, 1, 1)
                else:  # plain blocks: the dense model's, or protected ones (they always execute)
                    h = steps.blocks(group, h, cos, sin, start_pos)
                    if routed:
                        gates.append(h.new_ones(len(group), 2, 1, 1, dtype=torch.float32))
                i += len(group)
                continue
            h, g = blocks[i](h, cos, sin, start_pos, routing)
            if routed:
                gates.append(g[None])
            i += 1
        return h, (torch.cat(gates) if routed else None)                # (L, 2, B, T)

    def _decode_group(self, blocks, i, x, routing, start_pos):
        """Blocks i.. (of the tuple `blocks`) that one compiled graph runs in a batch-1 one-token
        forward, and whether they are routed: up to DECODE_GROUP consecutive plain blocks (no routing,
        or protected blocks, which always execute), or routed blocks that take routed_decode_step
        (compiled decoding, a KV cache, "keep", deterministic or given decisions past the protected
        first tokens, and each block's routers folded: linear, reading the block input); () where
        block i takes its own path (not compiled, masked routing, several sequences: each batch size
        and group length is a compilation of its own). This runs for every decoded token, between calls
        into compiled code, where Python operations cost several times what they cost in a loop of their
        own (docs/SPEED.md): what the blocks share is checked once."""
        if x.shape[0] * x.shape[1] != 1 or blocks[i].decode_steps is None:
            return (), False
        if routing is None:
            return blocks[i:i + DECODE_GROUP], False
        if not (routing.fast and routing.mode in ("hard", "force") and self.router_cfg.kv == "keep"
                and start_pos >= self.router_cfg.protect_first_tokens and blocks[i].attention.cache is not None):
            return (), False
        protected = self.router_cfg.protect_first
        if blocks[i].layer_id < protected:  # always executed: plain blocks (layer ids increase along blocks)
            return blocks[i:i + sum(layer.layer_id < protected for layer in blocks[i:i + DECODE_GROUP])], False
        if not blocks[i]._folded(x):
            return (), False
        n = 1
        for layer in blocks[i + 1:i + DECODE_GROUP]:  # fused with the first (fuse_weights): folded, and unchanged since?
            if layer.training or not layer._fold_current():
                break
            n += 1
        return blocks[i:i + n], True



def refuse_unmerged_lora(model):
    """The fused matrices hold the base weights only: an unmerged adapter would be skipped."""
    if any(getattr(m, "lora_A", None) is not None and not m.merged for m in model.modules()):
        raise UserError("merge the LoRA adapters before fusing the weights (lora.merge_lora)")


def accelerate(model: Transformer, compile_decoding=False) -> "FastTransformer":
    """Make a model.Transformer the engine's, in place: the same modules and weights, engine
    classes (FastTransformer, FastBlock, FastAttention, FastFeedForward, Linear), fused weights.
    Call it last: after moving the model to its device and dtype and merging any LoRA, and before
    copying it (a without_blocks copy shares its blocks with the model it came from, so converting
    the copy would convert those blocks of the original too).
    compile_decoding: also torch.compile the one-token steps (falls back to eager, saying why)."""
    refuse_unmerged_lora(model)  # before any class changes: a refused model stays as it was
    for layer in model.layers:
        layer.__class__ = FastBlock
        if type(layer.attention) is Attention:  # (not a removed one: baselines.drop_attention)
            layer.attention.__class__ = FastAttention
        layer.feed_forward.__class__ = FastFeedForward
        for m in (*layer.attention.children(), *layer.feed_forward.children()):
            if type(m) is nn.Linear:  # (a LoRA layer keeps its class: fusing needs it merged)
                m.__class__ = Linear
    if type(model.output) is nn.Linear:
        model.output.__class__ = Linear
    model.__class__ = FastTransformer
    model.fuse_weights()
    if compile_decoding:
        model.compile_decoding()
    return model


ENGINES = ("fast", "reference")  # the --engine choices of sample.py, eval.py and bench.py


def engine(model: Transformer, name="fast", compile_decoding=False):
    """The model as --engine names it: "fast" accelerates it (this file), "reference" leaves it as
    model.py wrote it (its simple gather/scatter path really skips work, with none of the above)."""
    if name not in ENGINES:
        raise UserError(f"--engine must be one of {', '.join(ENGINES)}, got {name!r}")
    if name == "reference":
        if compile_decoding:
            raise UserError("--compile needs the fast engine (--engine fast): the reference runs as written")
        return model
    return accelerate(model, compile_decoding)
