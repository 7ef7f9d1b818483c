"""SkipGPT routing: the gate, the sparsity loss, the masked reference path and the fast path."""

import math

import pytest
import torch

from model import ModelArgs, Transformer
from router import (RouterConfig, Routing, block_params, calibrate_offset, gumbel_gate, module_params,
                    routing_stats, sparsity_loss)
from tiny import tiny_model

ARGS = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, vocab_size=101, max_seq_len=64)


def routed_model(seed=0, **router):
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**ARGS)).eval()
    return model.add_routers(RouterConfig(**{"protect_first": 0, **router}))


def test_gumbel_gate_is_exactly_binary_and_has_gradient():
    logits = torch.randn(64, 2, requires_grad=True)
    g = gumbel_gate(logits, tau=2.0)
    assert set(g.unique().tolist()) <= {0.0, 1.0}
    (g * torch.arange(64.0)).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_execute_everything_is_the_dense_model_exactly():
    model = routed_model()
    x = torch.randint(0, 101, (2, 16))
    dense, _, _ = model(x)
    ones = torch.ones(3, 2, 2, 16)
    routed, _, _ = model(x, routing=Routing(mode="force", force=ones))
    assert torch.equal(dense, routed)
    fast, _, _ = model(x, routing=Routing(mode="force", force=ones, fast=True))
    assert torch.equal(dense, fast)


def test_skip_everything_is_embeddings_norm_head():
    model = routed_model()
    x = torch.randint(0, 101, (2, 16))
    zeros = torch.zeros(3, 2, 2, 16)
    ref = model.output(model.norm(model.tok_embeddings(x)))
    for fast in (False, True):
        out, _, _ = model(x, routing=Routing(mode="force", force=zeros, fast=fast))
        assert torch.allclose(out, ref, atol=1e-6)


def test_protected_blocks_always_execute():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**ARGS)).eval().add_routers(RouterConfig(protect_first=2))
    _, _, g = model(torch.randint(0, 101, (1, 8)), routing=Routing(mode="force", force=torch.zeros(3, 2, 1, 8)))
    assert g[:2].eq(1).all() and g[2].eq(0).all()


@pytest.mark.parametrize("fuse", [False, True])
def test_first_tokens_always_execute(fuse):
    # routers that skip everything: only the first protect_first_tokens positions of a sequence still
    # run, in training (Gumbel, no gradient there), inference (masked, fast, cached); forced decisions stay
    model = routed_model(protect_first_tokens=2)
    with torch.no_grad():
        for layer in model.layers:
            for r in (layer.attention_router, layer.ffn_router):
                r.proj.bias.copy_(torch.tensor([-50.0, 50.0]))
    if fuse:
        model.fuse_weights()
    x = torch.randint(0, 101, (2, 10))
    for routing in (Routing(mode="hard"), Routing(mode="hard", fast=True), Routing(mode="sample")):
        _, _, g = model(x, routing=routing)
        assert g[..., :2].eq(1).all() and g[..., 2:].eq(0).all()
    _, _, g = model(x[:, 4:], routing=Routing(mode="hard", fast=True), start_pos=4)  # later positions: not protected
    assert g.eq(0).all()
    _, _, g = model(x, routing=Routing(mode="force", force=torch.zeros(3, 2, 2, 10)))
    assert g.eq(0).all()
    # generation with the KV cache executes the prompt's first two tokens, then skips everything
    with torch.no_grad():
        seen = []
        model.generate(x[:1, :3], 3, temperature=0, routing=Routing(mode="hard", fast=True),
                       on_token=lambda nxt, gates: seen.append(gates.float().mean().item()))
    assert seen[-1] == 0.0
    # Gumbel training: the protected positions are 1 and pass no gradient to the routers
    model.drop_fused()
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    bias = model.layers[1].attention_router.proj.bias
    bias.requires_grad_(True)
    _, _, g = model(x, routing=Routing(mode="gumbel", tau=1.0))
    assert g[..., :2].eq(1).all()
    g[1, 0, :, :2].sum().backward()
    assert bias.grad is None or bias.grad.abs().sum() == 0
    # protect_first_tokens=0 (the paper): the first token skips like any other
    plain = routed_model(protect_first_tokens=0)
    with torch.no_grad():
        for layer in plain.layers:
            layer.attention_router.proj.bias.copy_(torch.tensor([-50.0, 50.0]))
    _, _, g = plain(x, routing=Routing(mode="hard"))
    assert g[:, 0].eq(0).all()


@pytest.mark.parametrize("kv", ["keep", "evict"])
@pytest.mark.parametrize("weighting", ["modules", "params"])
def test_sparsity_loss_matches_hand_computation(weighting, kv):
    args = ModelArgs(**ARGS)
    gates = torch.tensor([[[[1., 0, 1, 1]], [[0., 0, 1, 1]]],      # layer 0: attn skips 1/4, mlp 2/4
                          [[[1., 1, 1, 1]], [[1., 1, 1, 0]]],      # layer 1: attn 0, mlp 1/4
                          [[[0., 0, 0, 0]], [[1., 1, 1, 1]]]])     # layer 2: attn 1, mlp 0
    # the weights by hand: dim 64, 4 query heads and 2 K/V heads of 16, hidden 96
    wq = wo = 64 * 64
    wk = wv = 64 * 32
    w1 = w2 = w3 = 64 * 96
    block = wq + wk + wv + wo + w1 + w2 + w3                      # the denominator: every block weight
    wa = wq + wo + (wk + wv if kv == "evict" else 0)              # what a skipped attention does not run
    wm = w1 + w2 + w3
    loss, s = sparsity_loss(gates, 0.3, 8.0, args, kv, weighting, "global")
    attn = [0.25, 0.0, 1.0]
    mlp = [0.5, 0.25, 0.0]
    if weighting == "modules":
        per_layer = [(a + m) / 2 for a, m in zip(attn, mlp)]
    else:
        per_layer = [(wa * a + wm * m) / block for a, m in zip(attn, mlp)]
    expected = sum(per_layer) / 3
    assert s.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(8.0 * abs(0.3 - expected), rel=1e-4, abs=1e-6)
    if weighting == "params":  # the loss's s is the sparsity every report shows
        assert s.item() == pytest.approx(routing_stats(gates, args, kv)["param_sparsity"], rel=1e-6)
    # per-layer budget: mean over layers of |target - s_l|
    loss_pl, _ = sparsity_loss(gates, 0.3, 8.0, args, kv, weighting, "per_layer")
    assert loss_pl.item() == pytest.approx(8.0 * sum(abs(0.3 - p) for p in per_layer) / 3, rel=1e-6)


def test_param_sparsity_counts_kv_projections_as_executed_under_keep():
    args = ModelArgs(**ARGS)
    gates = torch.ones(3, 2, 1, 4)
    gates[:, 0] = 0  # every attention skipped
    st_keep = routing_stats(gates, args, "keep")
    st_evict = routing_stats(gates, args, "evict")
    q = args.n_heads * args.head_dim
    assert st_keep["param_sparsity"] == pytest.approx(2 * args.dim * q / block_params(args))
    assert st_evict["param_sparsity"] > st_keep["param_sparsity"]
    assert st_keep["attn_skip"] == 1.0 and st_keep["mlp_skip"] == 0.0


@pytest.mark.parametrize("kv", ["keep", "evict"])
@pytest.mark.parametrize("mlp_input", ["block", "post_attn"])
def test_routing_is_causal(kv, mlp_input):
    model = routed_model(kv=kv, mlp_input=mlp_input)
    with torch.no_grad():  # make the routers decisive so both kinds of decision occur
        for layer in model.layers:
            for r in (layer.attention_router, layer.ffn_router):
                r.proj.weight.mul_(20)
    x = torch.randint(0, 101, (1, 24))
    y = x.clone()
    y[0, 12:] = torch.randint(0, 101, (12,))
    for fast in (False, True):
        a, _, g = model(x, routing=Routing(fast=fast))
        b, _, gb = model(y, routing=Routing(fast=fast))
        assert torch.allclose(a[:, :12], b[:, :12], atol=1e-5)
        assert torch.equal(g[..., :12], gb[..., :12])
        assert 0 < g.mean() < 1  # decisions of both kinds were exercised


@pytest.mark.parametrize("kv", ["keep", "evict"])
@pytest.mark.parametrize("skip", [0.0, 0.4, 1.0])
def test_fast_path_equals_masked_path(kv, skip):
    model = routed_model(kv=kv)
    torch.manual_seed(1)
    B, T = 3, 20
    x = torch.randint(0, 101, (B, T))
    force = (torch.rand(3, 2, B, T) >= skip).float()
    masked, _, _ = model(x, routing=Routing(mode="force", force=force))
    fast, _, _ = model(x, routing=Routing(mode="force", force=force, fast=True))
    assert (masked - fast).abs().max() < 1e-4
    # decode against the KV cache, in chunks and one token at a time, batched and batch 1
    for batch in (slice(0, B), slice(1, 2)):
        for fast_path in (True, False):
            model.setup_cache(B, T)
            outs, pos = [], 0
            for n in (8, 1, 1, 5, 5):
                f = force[:, :, batch]
                o, _, _ = model(x[batch, pos:pos + n], routing=Routing(mode="force", force=f, fast=fast_path), start_pos=pos)
                outs.append(o)
                pos += n
            model.clear_cache()
            assert (torch.cat(outs, 1) - masked[batch]).abs().max() < 1e-4


def test_fast_path_flops_follow_the_analytic_count():
    from torch.utils.flop_counter import FlopCounterMode
    model = routed_model()
    args = model.args
    x = torch.randint(0, 101, (1, 32))
    force = torch.ones(3, 2, 1, 32)
    force[:, 1, :, ::2] = 0   # half the tokens skip every MLP
    force[:, 0, :, 1::4] = 0  # a quarter skip every attention
    flops = {}
    for name, f in (("dense", torch.ones_like(force)), ("routed", force)):
        with FlopCounterMode(display=False) as fc:
            model(x, routing=Routing(mode="force", force=f, fast=True))
        flops[name] = fc.get_total_flops()
    # saved: MLP matmuls of 16 tokens x 3 layers, wq + wo of 8 tokens x 3 layers (scores counted separately)
    q = args.n_heads * args.head_dim
    saved_matmul = 3 * (16 * 2 * 3 * args.dim * args.hidden_dim + 8 * 2 * 2 * args.dim * q)
    assert flops["dense"] - flops["routed"] >= saved_matmul


def flops_by_module(model, x, routing, start_pos=0):
    """FLOPs counted per linear layer name (e.g. "layers.1.attention.wk") of one forward."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        model(x, routing=routing, start_pos=start_pos)
    counts = fc.get_flop_counts()
    return {name.removeprefix("Transformer."): sum(c.values()) for name, c in counts.items()}


@pytest.mark.parametrize("B", [1, 2])
def test_evict_computes_k_and_v_only_for_tokens_that_execute_attention(B):
    """Under evict the fast path runs wk and wv on the executing tokens only: the accounting that
    credits K/V as saved (module_params(..., "evict")) is work that really does not run."""
    args = ModelArgs(**ARGS)
    T = 24
    x = torch.randint(0, 101, (B, T))
    force = torch.ones(3, 2, B, T)
    force[:, 0, :, 1::3] = 0                                    # a third of the tokens skip attention everywhere
    executing = int(force[0, 0].sum())
    kv_dim = args.n_kv_heads * args.head_dim
    for kv in ("keep", "evict"):
        model = routed_model(kv=kv)
        counts = flops_by_module(model, x, Routing(mode="force", force=force, fast=True))
        for layer in range(3):
            tokens_run = B * T if kv == "keep" else executing
            for proj in ("wk", "wv"):
                assert counts[f"layers.{layer}.attention.{proj}"] == 2 * tokens_run * args.dim * kv_dim, (kv, proj)
            assert counts[f"layers.{layer}.attention.wq"] == 2 * executing * args.dim * args.n_heads * args.head_dim
    # and the outputs still equal the masked reference under evict
    model = routed_model(kv="evict")
    masked, _, _ = model(x, routing=Routing(mode="force", force=force))
    fast, _, _ = model(x, routing=Routing(mode="force", force=force, fast=True))
    assert (masked - fast).abs().max() < 1e-4


def test_evict_decoding_writes_no_k_v_for_a_skipped_token():
    """Batch-1 decoding under evict: a token that skips attention computes no K/V at all."""
    model = routed_model(kv="evict")
    x = torch.randint(0, 101, (1, 9))
    force = torch.ones(3, 2, 1, 9)
    force[:, 0, :, 8] = 0                                       # the last token skips attention
    model.setup_cache(1, 9)
    try:
        model(x[:, :8], routing=Routing(mode="force", force=force, fast=True))
        counts = flops_by_module(model, x[:, 8:], Routing(mode="force", force=force, fast=True), start_pos=8)
        keep_flags = [layer.attention.cache.keep[0, 8].item() for layer in model.layers]
    finally:
        model.clear_cache()
    assert not any(k.endswith(("wk", "wv", "wq", "wo")) and v for k, v in counts.items())
    assert all(counts[f"layers.{i}.feed_forward.w1"] for i in range(3))  # the MLPs did run
    assert keep_flags == [False] * 3


def decisive_routers(model, scale=20.0):
    """Sharpen the routers so that deterministic routing gives both decisions often."""
    with torch.no_grad():
        for layer in model.layers:
            for r in (layer.attention_router, layer.ffn_router):
                r.proj.weight.mul_(scale)
    return model


@pytest.mark.parametrize("kv", ["keep", "evict"])
@pytest.mark.parametrize("mlp_input", ["block", "post_attn"])
def test_fast_path_equals_masked_path_with_router_decisions(kv, mlp_input):
    """Not forced gates: the routers decide (hard gates at an offset), on both paths, batched and not,
    with and without the KV cache. Same gates, same logits."""
    model = decisive_routers(routed_model(kv=kv, mlp_input=mlp_input))
    x = torch.randint(0, 101, (3, 20), generator=torch.Generator().manual_seed(5))
    routing = dict(mode="hard", offset=0.5)
    masked, _, g_masked = model(x, routing=Routing(**routing))
    fast, _, g_fast = model(x, routing=Routing(**routing, fast=True))
    assert 0.2 < g_masked.mean() < 0.9                            # both decisions occur
    assert torch.equal(g_masked, g_fast)
    assert (masked - fast).abs().max() < 1e-4
    for batch in (slice(0, 3), slice(2, 3)):                    # decoding against the cache, chunks and single tokens
        model.setup_cache(3, 20)
        outs, pos = [], 0
        for n in (7, 1, 1, 11):
            o, _, _ = model(x[batch, pos:pos + n], routing=Routing(**routing, fast=True), start_pos=pos)
            outs.append(o)
            pos += n
        model.clear_cache()
        assert (torch.cat(outs, 1) - masked[batch]).abs().max() < 1e-4


def test_cached_routed_generation_equals_uncached():
    model = routed_model()
    with torch.no_grad():
        for layer in model.layers:
            layer.attention_router.proj.weight.mul_(20)
            layer.ffn_router.proj.weight.mul_(20)
    prompt = torch.randint(0, 101, (2, 6))
    for fast in (False, True):
        gates = []
        a = model.generate(prompt, 15, temperature=0, routing=Routing(fast=fast), use_cache=True,
                           on_token=lambda ids, g: gates.append(g.float()[..., -1:]))  # the new tokens' decisions
        b = model.generate(prompt, 15, temperature=0, routing=Routing(fast=fast), use_cache=False)
        assert torch.equal(a, b)
        assert 0.1 < torch.cat(gates, -1).mean() < 0.9  # the decoded tokens skipped and executed sublayers


def test_calibrated_offset_hits_the_requested_sparsity():
    model = tiny_model(n_layers=4).eval().add_routers(RouterConfig(protect_first=0))
    windows = torch.randint(0, 260, (8, 65))

    def measure(offset):
        _, _, gates = model(windows[:, :-1], routing=Routing(mode="hard", offset=offset))
        return routing_stats(gates, model.args)["param_sparsity"]

    for target in (0.1, 0.3, 0.5):
        offset = calibrate_offset(measure, target, lo=-30, hi=30, iters=20)
        assert measure(offset) == pytest.approx(target, abs=0.02)


def test_fast_path_gives_the_masked_paths_lora_gradients():
    # stage 2 trains LoRA on the fast path: same loss and gradients as the masked reference
    from lora import add_lora, mark_only_lora_trainable
    model = routed_model()
    add_lora(model, r=4, alpha=8, dropout=0.0)
    mark_only_lora_trainable(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    x, y = torch.randint(0, 101, (2, 16)), torch.randint(0, 101, (2, 16))
    force = (torch.rand(3, 2, 2, 16, generator=torch.Generator().manual_seed(3)) > 0.4).float()
    grads = []
    for fast in (False, True):
        model.zero_grad()
        _, loss, _ = model(x, y, routing=Routing(mode="force", force=force, fast=fast))
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-5)
    for n in grads[0][1]:
        assert torch.allclose(grads[0][1][n], grads[1][1][n], atol=1e-5), n


def test_compiled_groups_take_their_own_blocks_given_decisions(monkeypatch):
    """Batch-1 compiled decoding with given decisions: the decisions at a position are copied once
    for every block and each group of blocks takes its own rows. With groups of 2 blocks (blocks
    0-1, then 2), a group reading another group's rows would decide differently from eager decoding."""
    import model as model_module
    monkeypatch.setattr(model_module, "DECODE_GROUP", 2)
    model = routed_model(seed=5).fuse_weights()
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
    model = decisive_routers(routed_model(seed=3, kv=kv)).fuse_weights()
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
    model = decisive_routers(routed_model(seed=3, protect_first=2)).fuse_weights()
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
    """model.linear gives F.linear's result and gradients for any row count and output size, and takes
    the batched product over blocks of the weight's rows (split_linear) exactly where it was recorded
    faster for that matrix and row count (choose_products), for at most FEW_ROWS rows."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    import model as model_module
    from model import FEW_ROWS, linear
    torch.manual_seed(0)
    w = torch.randn(out, 24, requires_grad=True)
    x = torch.randn(*shape, requires_grad=True)
    rows = math.prod(shape[:-1])
    monkeypatch.setattr(model_module, "FASTER_SPLIT", {(out, 24, w.dtype, rows == 1): split_faster})
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
    import model as model_module
    monkeypatch.setattr(model_module, "FASTER_SPLIT", {})
    model = routed_model().fuse_weights()
    a = model.args
    nkv, nq = 2 * a.n_kv_heads * a.head_dim, a.n_heads * a.head_dim
    shapes = {(4 + nkv + nq, a.dim), (4 + nkv, a.dim), (nkv + nq, a.dim), (nkv, a.dim),
              (nq, a.dim), (4, a.dim), (a.dim, nq), (2 * a.hidden_dim, a.dim), (a.dim, a.hidden_dim)}
    assert set(model_module.FASTER_SPLIT) == {(*s, torch.float32, one) for s in shapes for one in (True, False)}
    assert all(isinstance(v, bool) for v in model_module.FASTER_SPLIT.values())
    timed = []
    monkeypatch.setattr(model_module, "_seconds", lambda *args: timed.append(args) or 0.0)
    routed_model(seed=1).fuse_weights()
    assert timed == []


@pytest.mark.parametrize("kv", ["keep", "evict"])
@pytest.mark.parametrize("mlp_input", ["block", "post_attn"])
def test_fused_inference_weights_change_nothing(kv, mlp_input):
    """fuse_weights (wq|wk|wv, w1|w3 and the two routers as one matmul each) gives the same logits and
    gates as the layers one by one: dense and routed, prefill and cached decoding. The weights stay
    views of the fused matrices, so the state dict is unchanged."""
    model = decisive_routers(routed_model(kv=kv, mlp_input=mlp_input))
    with torch.no_grad():  # norm weights away from 1: the routers folded into the attention matrix are W / w
        for layer in model.layers:
            layer.attention_norm.weight.uniform_(0.5, 1.5)
    ref = routed_model(kv=kv, mlp_input=mlp_input)
    ref.load_state_dict(model.state_dict())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.fuse_weights()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.layers[0].attention.fused_weights() is not None
    x = torch.randint(0, 101, (2, 18), generator=torch.Generator().manual_seed(2))
    for routing in (None, Routing(mode="hard", offset=0.5, fast=True), Routing(mode="hard", offset=0.5)):
        a, _, ga = model(x, routing=routing)
        b, _, gb = ref(x, routing=routing)
        assert (a - b).abs().max() < 1e-4
        assert (ga is None and gb is None) or torch.equal(ga, gb)
    for fast in (True, False):  # cached decoding, batch 1, token by token after a prefill
        outs = []
        for m in (model, ref):
            m.setup_cache(1, 18)
            o = [m(x[1:, :10], routing=Routing(mode="hard", offset=0.5, fast=fast))[0]]
            o += [m(x[1:, t:t + 1], routing=Routing(mode="hard", offset=0.5, fast=fast), start_pos=t)[0] for t in range(10, 18)]
            m.clear_cache()
            outs.append(torch.cat(o, 1))
        assert (outs[0] - outs[1]).abs().max() < 1e-4


def test_fused_weights_are_not_used_where_they_would_be_wrong():
    """In training mode, after LoRA is added, or after the model is cast or reloaded, the layers run
    one by one; fusing refuses unmerged adapters, and a fused model refuses to unmerge."""
    from errors import UserError
    from lora import add_lora, merge_lora
    model = routed_model().fuse_weights()
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
    model = decisive_routers(routed_model()).fuse_weights()
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
    import model as model_module
    torch.manual_seed(3)
    model = Transformer(ModelArgs(**{**ARGS, "max_seq_len": 256})).eval().add_routers(RouterConfig(protect_first=0, kv=kv))
    T = 3 * model_module.ATTN_CHUNK + 10
    x = torch.randint(0, 101, (1, T))
    force = (torch.rand(3, 2, 1, T, generator=torch.Generator().manual_seed(4)) > 0.3).float()
    masked, _, _ = model(x, routing=Routing(mode="force", force=force))
    fast, _, _ = model(x, routing=Routing(mode="force", force=force, fast=True))
    assert (masked - fast).abs().max() < 1e-4
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
    model.fuse_weights()
    x = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, masked = model(x, routing=Routing(mode="hard", offset=0.5))
        _, _, fast = model(x, routing=Routing(mode="hard", offset=0.5, fast=True))
    assert 0.1 < masked.mean() < 0.95 and torch.equal(masked, fast)


def test_offset_search_spends_few_passes_and_stays_in_bounds():
    # each call of the measure is a pass over the calibration text: a smooth falling sparsity curve is
    # solved to the tolerance in at most 9 calls (bisection over [-8, 8] needs 12 for 0.004 of offset)
    for center in (-3.0, 0.3, 2.0, 6.0):
        for target in (0.1, 0.25, 0.4):
            calls = []

            def measure(offset):
                calls.append(offset)
                return 0.6 / (1 + math.exp(1.5 * (offset - center)))
            offset = calibrate_offset(measure, target, lo=-8, hi=8, iters=12)
            assert abs(measure(offset) - target) <= 0.002 and len(calls) <= 10
            assert all(-8 <= c <= 8 for c in calls)
    # a target out of reach gives the nearest bound; a staircase (few tokens) the nearest step
    assert calibrate_offset(lambda o: 0.9, 0.25, lo=-8, hi=8) == 8
    assert calibrate_offset(lambda o: 0.0, 0.25, lo=-8, hi=8) == -8
    stairs = lambda o: round(0.5 / (1 + math.exp(o)), 2)
    assert stairs(calibrate_offset(stairs, 0.253, lo=-8, hi=8, iters=12)) == pytest.approx(0.25)
