"""The engine (fast.py): fused and folded weights, the few-row product choice, compiled decoding,
chunked attention. Every path equals model.py's masked reference; the paths both engines share
(gather/scatter prefill, cached decoding, evict) are checked in test_routing.py for each engine."""
import math

import pytest
import torch

import fast
from model import ModelArgs, Transformer
from router import RouterConfig, Routing
from test_routing import ARGS, decisive_routers, routed_model


def test_compiled_groups_take_their_own_blocks_given_decisions(monkeypatch):
    """Batch-1 compiled decoding with given decisions: the decisions at a position are copied once
    for every block and each group of blocks takes its own rows. With groups of 2 blocks (blocks
    0-1, then 2), a group reading another group's rows would decide differently from eager decoding."""
    monkeypatch.setattr(fast, "DECODE_GROUP", 2)
    model = routed_model(seed=5, engine="fast")
    x = torch.randint(0, 101, (1, 14), generator=torch.Generator().manual_seed(6))
    forced = (torch.rand(len(model.layers), 2, 1, 14, generator=torch.Generator().manual_seed(7)) > 0.5).float()
    forced[2, :, :, 8:] = 1 - forced[0, :, :, 8:]  # block 2's decisions differ from block 0's at every decoded token

    def decode():
        model.setup_cache(1, 14)
        try:
            out = [model(x[:, :8], routing=Routing(mode="force", force=forced, fast=True))]
            out += [model(x[:, t:t + 1], routing=Routing(mode="force", force=forced, fast=True), start_pos=t)
                    for t in range(8, 14)]
        finally:
            model.clear_cache()
        return torch.cat([o[0] for o in out], 1), torch.cat([o[2] for o in out], -1)

    with torch.no_grad():
        eager_logits, eager_gates = decode()
        assert model.compile_decoding()
        logits, gates = decode()
    assert torch.equal(eager_gates, forced) and torch.equal(gates, forced)
    assert (logits - eager_logits).abs().max() < 1e-4


@pytest.mark.parametrize("kv", ["keep", "evict"])
def test_compiled_decoding_equals_eager(kv):
    """compile_decoding (torch.compile'd steps for one-token forwards) decodes as the eager model
    does: dense and routed fast decoding (with skips of both sublayers), batch 1 and 2, hard and
    given decisions; batch-1 decoding compiled runs groups of blocks as one graph each (routed: real
    branches, routed_decode_step), eager routed the sublayer-by-sublayer reference (_decode_one); with several
    sequences, compiled, the executing rows run in one graph (sparse_decode_step), eager the
    gather/scatter reference (Attention.forward_sparse)."""
    model = fast.accelerate(decisive_routers(routed_model(seed=3, kv=kv)))
    x = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(4))

    def decode(routing, B):
        model.setup_cache(B, 16)
        gates = []
        try:
            logits = [model(x[:B, :8], routing=routing)[0]]
            for t in range(8, 16):
                out, _, g = model(x[:B, t:t + 1], routing=routing, start_pos=t)
                logits.append(out)
                gates.append(g)
        finally:
            model.clear_cache()
        return torch.cat(logits, 1), gates

    forced = (torch.rand(len(model.layers), 2, 2, 16, generator=torch.Generator().manual_seed(5)) > 0.4).float()
    runs = [(None, 1), (Routing(mode="hard", offset=0.5, fast=True), 1), (Routing(mode="hard", offset=0.5, fast=True), 2),
            (Routing(mode="force", force=forced[:, :, :1], fast=True), 1),  # (bench.py's random routing)
            (Routing(mode="force", force=forced, fast=True), 2)]  # two rows: none, one or both execute a sublayer
    with torch.no_grad():
        eager = [decode(r, B) for r, B in runs]
        assert model.compile_decoding()
        calls = []

        def counted(step):  # records the step and, for the block groups, how many blocks one call ran
            return lambda *args: calls.append((step, len(args[0]) if isinstance(args[0], tuple) else 0)) or step(*args)
        steps = model.layers[0].decode_steps  # DecodeSteps: attention, MLP, router, dense blocks, routed blocks, sparse rows
        for layer in model.layers:
            layer.decode_steps = type(steps)(*(counted(step) for step in layer.decode_steps))
        compiled = [decode(r, B) for r, B in runs]
    assert len(calls) > 8 * len(model.layers)  # the compiled steps ran (one-token forwards only) ...
    # ... the ones each K/V rule should take: under "keep", routed decoding is the group of routed
    # blocks (batch 1) or the rows step (several sequences); under evict, the sublayers' steps one by one
    want = {"blocks", "router"} | ({"routed_blocks", "sparse"} if kv == "keep" else {"attention", "mlp"})
    assert {id(c) for c, _ in calls} == {id(getattr(steps, name)) for name in want}
    # batch-1 decoding runs every block of the model in one call (fewer than DECODE_GROUP blocks here)
    group_calls = {name: [n for c, n in calls if c is getattr(steps, name)] for name in ("blocks", "routed_blocks")}
    assert max(group_calls["blocks"]) == len(model.layers)
    if kv == "keep":
        assert max(group_calls["routed_blocks"]) == len(model.layers)
    for (a, ga), (b, gb) in zip(eager, compiled):
        assert (a - b).abs().max() < 1e-4
        assert all(g1 is None and g2 is None or torch.equal(g1, g2) for g1, g2 in zip(ga, gb))
    g = torch.stack(eager[1][1])                                 # (steps, L, 2, 1, 1): both sublayers skipped somewhere
    assert 0 < g[:, :, 0].mean() < 1 and 0 < g[:, :, 1].mean() < 1
    rows = torch.stack(eager[4][1]).sum(-2)                      # (steps, L, 2, 1): rows executing, of 2
    assert all((rows == n).any() for n in (0, 1, 2))


def test_compiled_decoding_runs_protected_blocks_as_one_plain_group():
    """Protected blocks (protect_first) always execute. In batch-1 routed decoding, compiled, they run
    together as one graph of plain blocks (blocks_step) and the others as routed groups, with the same
    logits and gates as eager decoding (where every block takes its own path), ones for the protected."""
    model = fast.accelerate(decisive_routers(routed_model(seed=3, protect_first=2)))
    x = torch.randint(0, 101, (1, 16), generator=torch.Generator().manual_seed(4))
    forced = (torch.rand(len(model.layers), 2, 1, 16, generator=torch.Generator().manual_seed(5)) > 0.4).float()

    def decode(routing):
        model.setup_cache(1, 16)
        try:
            out = [model(x[:, :8], routing=routing)] + [model(x[:, t:t + 1], routing=routing, start_pos=t)
                                                        for t in range(8, 16)]
        finally:
            model.clear_cache()
        return torch.cat([o[0] for o in out], 1), torch.cat([o[2] for o in out], -1)

    runs = [Routing(mode="hard", offset=0.5, fast=True), Routing(mode="force", force=forced, fast=True)]
    with torch.no_grad():
        eager = [decode(r) for r in runs]
        assert model.compile_decoding()
        calls = []
        steps = model.layers[0].decode_steps
        for layer in model.layers:
            layer.decode_steps = type(steps)(*((lambda *a, s=s: calls.append((s, len(a[0]) if isinstance(a[0], tuple)
                                                                                 else 0)) or s(*a))
                                               for s in steps))
        compiled = [decode(r) for r in runs]
    # per decoded token: one call for blocks 0-1 (plain), one for block 2 (routed), nothing else
    assert calls == [(steps.blocks, 2), (steps.routed_blocks, 1)] * 8 * len(runs)
    for (a, ga), (b, gb) in zip(eager, compiled):
        assert (a - b).abs().max() < 1e-4 and torch.equal(ga, gb)
        assert (ga[:2] == 1).all() and (ga[2, :, :, 8:] == 0).any()  # block 2 skips some decoded tokens


@pytest.mark.parametrize("shape", [(1, 1, 24), (2, 1, 24), (1, 8, 24), (9, 24), (3, 4, 24)])
@pytest.mark.parametrize("out", [96, 12, 7])
@pytest.mark.parametrize("split_faster", [True, False])
def test_few_row_product_equals_f_linear(shape, out, split_faster, monkeypatch):
    """fast.linear gives F.linear's result and gradients for any row count and output size, and takes
    the batched product over blocks of the weight's rows (split_linear) exactly where it was recorded
    faster for that matrix and row count (choose_products), for at most FEW_ROWS rows."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from fast import FEW_ROWS, linear
    torch.manual_seed(0)
    w = torch.randn(out, 24, requires_grad=True)
    x = torch.randn(*shape, requires_grad=True)
    rows = math.prod(shape[:-1])
    monkeypatch.setattr(fast, "FASTER_SPLIT", {(out, 24, w.dtype, rows == 1): split_faster})
    with FlopCounterMode(display=False) as counter:
        y = linear(x, w)
    ref = F.linear(x, w)
    assert y.shape == ref.shape and (y - ref).abs().max() < 1e-5
    batched = torch.ops.aten.bmm in counter.get_flop_counts()["Global"]
    assert batched == (split_faster and rows <= FEW_ROWS)  # the path it should take
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(y, (x, w), g)
    grads_ref = torch.autograd.grad(ref, (x, w), g)
    assert all((a - b).abs().max() < 1e-4 for a, b in zip(grads, grads_ref))


def test_fuse_weights_measures_each_decoding_product_once(monkeypatch):
    """fuse_weights times both one-row products for every matrix decoding multiplies by (one row and a
    few rows; the head's 101 rows do not split into blocks), records which is faster, and a second
    model of the same shapes measures nothing new."""
    monkeypatch.setattr(fast, "FASTER_SPLIT", {})
    model = routed_model(engine="fast")
    a = model.args
    nkv, nq = 2 * a.n_kv_heads * a.head_dim, a.n_heads * a.head_dim
    shapes = {(4 + nkv + nq, a.dim), (4 + nkv, a.dim), (nkv + nq, a.dim), (nkv, a.dim),
              (nq, a.dim), (4, a.dim), (a.dim, nq), (2 * a.hidden_dim, a.dim), (a.dim, a.hidden_dim)}
    assert set(fast.FASTER_SPLIT) == {(*s, torch.float32, one) for s in shapes for one in (True, False)}
    assert all(isinstance(v, bool) for v in fast.FASTER_SPLIT.values())
    timed = []
    monkeypatch.setattr(fast, "_seconds", lambda *args: timed.append(args) or 0.0)
    routed_model(seed=1, engine="fast")
    assert timed == []


@pytest.mark.parametrize("kv", ["keep", "evict"])
@pytest.mark.parametrize("mlp_input", ["block", "post_attn"])
def test_fused_inference_weights_change_nothing(kv, mlp_input):
    """fast.accelerate (wq|wk|wv, w1|w3 and the two routers as one matmul each) gives the same logits and
    gates as the layers one by one: dense and routed, prefill and cached decoding. The weights stay
    views of the fused matrices, so the state dict is unchanged."""
    model = decisive_routers(routed_model(kv=kv, mlp_input=mlp_input))
    with torch.no_grad():  # norm weights away from 1: the routers folded into the attention matrix are W / w
        for layer in model.layers:
            layer.attention_norm.weight.uniform_(0.5, 1.5)
    ref = routed_model(kv=kv, mlp_input=mlp_input)
    ref.load_state_dict(model.state_dict())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fast.accelerate(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.layers[0].attention.fused_weights() is not None
    x = torch.randint(0, 101, (2, 18), generator=torch.Generator().manual_seed(2))
    for routing in (None, Routing(mode="hard", offset=0.5, fast=True), Routing(mode="hard", offset=0.5)):
        a, _, ga = model(x, routing=routing)
        b, _, gb = ref(x, routing=routing)
        assert (a - b).abs().max() < 1e-4
        assert (ga is None and gb is None) or torch.equal(ga, gb)
    for skipping in (True, False):  # cached decoding, batch 1, token by token after a prefill
        outs = []
        for m in (model, ref):
            m.setup_cache(1, 18)
            o = [m(x[1:, :10], routing=Routing(mode="hard", offset=0.5, fast=skipping))[0]]
            o += [m(x[1:, t:t + 1], routing=Routing(mode="hard", offset=0.5, fast=skipping), start_pos=t)[0] for t in range(10, 18)]
            m.clear_cache()
            outs.append(torch.cat(o, 1))
        assert (outs[0] - outs[1]).abs().max() < 1e-4


def test_fused_weights_are_not_used_where_they_would_be_wrong():
    """In training mode, after LoRA is added, or after the model is cast or reloaded, the layers run
    one by one; fusing refuses unmerged adapters, and a fused model refuses to unmerge."""
    from errors import UserError
    from lora import add_lora, merge_lora
    model = routed_model(engine="fast")
    att = model.layers[1].attention
    assert att.fused_weights() is not None
    model.train()
    assert att.fused_weights() is None
    model.eval()
    add_lora(model, targets=("wq", "w1"), r=2, alpha=4, dropout=0.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    assert att.fused_weights() is None and model.layers[1].feed_forward.fused is None
    x = torch.randint(0, 101, (1, 12))
    unmerged, _, _ = model(x)
    with pytest.raises(UserError, match="merge the LoRA adapters"):
        model.fuse_weights()
    merge_lora(model).fuse_weights()
    assert att.fused_weights() is not None
    merged, _, _ = model(x)
    assert (merged - unmerged).abs().max() < 1e-4
    with pytest.raises(UserError, match="load the model again"):
        att.wq.unmerge()
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)  # new tensors
    again, _, _ = model(x)
    assert att.fused_weights() is None and (again - merged).abs().max() < 1e-4
    # a router changed in place after fusing: its folded copy is not used (the routers run on their own)
    model = fast.accelerate(decisive_routers(routed_model()))
    x = torch.randint(0, 101, (1, 16))
    with torch.no_grad():
        model.layers[2].ffn_router.proj.bias.add_(torch.tensor([-50.0, 50.0]))  # now always skips
    _, _, gates = model(x, routing=Routing(mode="hard", fast=True))
    assert gates[2, 1, :, 1:].eq(0).all()  # (the first token always executes)
    # new routers after fusing: the fused matrices, which hold the old routers' rows, are dropped
    model.add_routers(RouterConfig(protect_first=0))
    assert all(layer.router_fold is None and layer.attention.fused is None for layer in model.layers)


@pytest.mark.parametrize("kv", ["keep", "evict"])
def test_chunked_attention_of_a_long_sequence_equals_the_masked_path(kv):
    """Past ATTN_CHUNK executing queries the fast path attends in chunks, each to the keys up to its
    last query: the same logits as the masked reference, prefill and cached, and fewer scores counted."""
    torch.manual_seed(3)
    model = Transformer(ModelArgs(**{**ARGS, "max_seq_len": 256})).eval().add_routers(RouterConfig(protect_first=0, kv=kv))
    model = fast.accelerate(model)
    T = 3 * fast.ATTN_CHUNK + 10
    x = torch.randint(0, 101, (1, T))
    force = (torch.rand(3, 2, 1, T, generator=torch.Generator().manual_seed(4)) > 0.3).float()
    masked, _, _ = model(x, routing=Routing(mode="force", force=force))
    skipped, _, _ = model(x, routing=Routing(mode="force", force=force, fast=True))
    assert (masked - skipped).abs().max() < 1e-4
    model.setup_cache(1, T)
    a, _, _ = model(x[:, :40], routing=Routing(mode="force", force=force, fast=True))
    b, _, _ = model(x[:, 40:], routing=Routing(mode="force", force=force, fast=True), start_pos=40)
    model.clear_cache()
    assert (torch.cat([a, b], 1) - masked).abs().max() < 1e-4
    if kv == "keep":  # fewer scores than the whole (executing queries x keys) rectangle
        from torch.utils.flop_counter import FlopCounterMode
        import bench  # (registers the FLOP formula of the CPU attention kernel)
        with FlopCounterMode(display=False) as fc:
            model(x, routing=Routing(mode="force", force=force, fast=True))
        attention = sum(v for op, v in fc.get_flop_counts()["Global"].items() if "attention" in str(op))
        args = model.args
        rectangle = sum(2 * 2 * args.n_heads * args.head_dim * int(force[l, 0].sum()) * T for l in range(3))
        assert 0 < attention < 0.75 * rectangle


def test_fused_routers_decide_as_the_masked_path_under_bf16_autocast():
    """The routers folded into the K/V matmul are used in fp32 only: under bf16 autocast the fast
    path's decisions are the masked path's (W / w and xn round differently from W and rms_norm(x))."""
    model = decisive_routers(routed_model())
    with torch.no_grad():
        for layer in model.layers:
            layer.attention_norm.weight.uniform_(0.5, 1.5)
    fast.accelerate(model)
    x = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, masked = model(x, routing=Routing(mode="hard", offset=0.5))
        _, _, skipped = model(x, routing=Routing(mode="hard", offset=0.5, fast=True))
    assert 0.1 < masked.mean() < 0.95 and torch.equal(masked, skipped)
