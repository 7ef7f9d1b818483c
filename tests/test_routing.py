"""SkipGPT routing: the gate, the sparsity loss, the masked reference path and the paths that really
skip work: model.py's simple gather/scatter path ("reference") and the engine's (fast.py, "fast"),
each checked against the masked path."""

import math

import pytest
import torch

import fast
from model import ModelArgs, Transformer
from router import (RouterConfig, Routing, block_params, calibrate_offset, gumbel_gate, module_params,
                    routing_stats, sparsity_loss)
from tiny import tiny_model

ARGS = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, vocab_size=101, max_seq_len=64)


ENGINES = ["reference", "fast"]


def routed_model(seed=0, engine="reference", **router):
    """A tiny routed model in eval mode; engine "fast": accelerated by fast.py (same weights)."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**ARGS)).eval()
    model.add_routers(RouterConfig(**{"protect_first": 0, **router}))
    return fast.accelerate(model) if engine == "fast" else model


def test_gumbel_gate_is_exactly_binary_and_has_gradient():
    logits = torch.randn(64, 2, requires_grad=True)
    g = gumbel_gate(logits, tau=2.0)
    assert set(g.unique().tolist()) <= {0.0, 1.0}
    (g * torch.arange(64.0)).sum().backward()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("engine", ENGINES)
def test_execute_everything_is_the_dense_model_exactly(engine):
    model = routed_model(engine=engine)
    x = torch.randint(0, 101, (2, 16))
    dense, _, _ = model(x)
    ones = torch.ones(3, 2, 2, 16)
    routed, _, _ = model(x, routing=Routing(mode="force", force=ones))
    assert torch.equal(dense, routed)
    skipped, _, _ = model(x, routing=Routing(mode="force", force=ones, fast=True))
    assert torch.equal(dense, skipped)


@pytest.mark.parametrize("engine", ENGINES)
def test_skip_everything_is_embeddings_norm_head(engine):
    model = routed_model(engine=engine)
    x = torch.randint(0, 101, (2, 16))
    zeros = torch.zeros(3, 2, 2, 16)
    ref = model.output(model.norm(model.tok_embeddings(x)))
    for skipping in (False, True):
        out, _, _ = model(x, routing=Routing(mode="force", force=zeros, fast=skipping))
        assert torch.allclose(out, ref, atol=1e-6)


def test_protected_blocks_always_execute():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**ARGS)).eval().add_routers(RouterConfig(protect_first=2))
    _, _, g = model(torch.randint(0, 101, (1, 8)), routing=Routing(mode="force", force=torch.zeros(3, 2, 1, 8)))
    assert g[:2].eq(1).all() and g[2].eq(0).all()


@pytest.mark.parametrize("engine", ENGINES)
def test_first_tokens_always_execute(engine):
    # routers that skip everything: only the first protect_first_tokens positions of a sequence still
    # run, in training (Gumbel, no gradient there), inference (masked, fast, cached); forced decisions stay
    model = routed_model(protect_first_tokens=2)
    with torch.no_grad():
        for layer in model.layers:
            for r in (layer.attention_router, layer.ffn_router):
                r.proj.bias.copy_(torch.tensor([-50.0, 50.0]))
    if engine == "fast":
        fast.accelerate(model)
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


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kv", ["keep", "evict"])
@pytest.mark.parametrize("mlp_input", ["block", "post_attn"])
def test_routing_is_causal(kv, mlp_input, engine):
    model = routed_model(kv=kv, mlp_input=mlp_input)
    with torch.no_grad():  # make the routers decisive so both kinds of decision occur
        for layer in model.layers:
            for r in (layer.attention_router, layer.ffn_router):
                r.proj.weight.mul_(20)
    model = fast.accelerate(model) if engine == "fast" else model
    x = torch.randint(0, 101, (1, 24))
    y = x.clone()
    y[0, 12:] = torch.randint(0, 101, (12,))
    for skipping in (False, True):
        a, _, g = model(x, routing=Routing(fast=skipping))
        b, _, gb = model(y, routing=Routing(fast=skipping))
        assert torch.allclose(a[:, :12], b[:, :12], atol=1e-5)
        assert torch.equal(g[..., :12], gb[..., :12])
        assert 0 < g.mean() < 1  # decisions of both kinds were exercised


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kv", ["keep", "evict"])
@pytest.mark.parametrize("skip", [0.0, 0.4, 1.0])
def test_fast_path_equals_masked_path(kv, skip, engine):
    model, reference = routed_model(kv=kv, engine=engine), routed_model(kv=kv)  # the same weights
    torch.manual_seed(1)
    B, T = 3, 20
    x = torch.randint(0, 101, (B, T))
    force = (torch.rand(3, 2, B, T) >= skip).float()
    masked, _, _ = reference(x, routing=Routing(mode="force", force=force))  # model.py's masked path
    skipped, _, _ = model(x, routing=Routing(mode="force", force=force, fast=True))
    assert (masked - skipped).abs().max() < 1e-4
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


@pytest.mark.parametrize("engine", ENGINES)
def test_fast_path_flops_follow_the_analytic_count(engine):
    from torch.utils.flop_counter import FlopCounterMode
    model = routed_model(engine=engine)
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
    """FLOPs counted per linear layer name (e.g. "layers.1.attention.wk") of one forward. (The
    engine's fused matrices are dropped first: each projection then runs as its own layer.)"""
    from torch.utils.flop_counter import FlopCounterMode
    if isinstance(model, fast.FastTransformer):
        model.drop_fused()
    with FlopCounterMode(display=False) as fc:
        model(x, routing=routing, start_pos=start_pos)
    counts = fc.get_flop_counts()
    return {name.partition(".")[2]: sum(c.values()) for name, c in counts.items()}  # "FastTransformer.layers.1..." -> "layers.1..."


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("B", [1, 2])
def test_evict_computes_k_and_v_only_for_tokens_that_execute_attention(B, engine):
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
        model = routed_model(kv=kv, engine=engine)
        counts = flops_by_module(model, x, Routing(mode="force", force=force, fast=True))
        for layer in range(3):
            tokens_run = B * T if kv == "keep" else executing
            for proj in ("wk", "wv"):
                assert counts[f"layers.{layer}.attention.{proj}"] == 2 * tokens_run * args.dim * kv_dim, (kv, proj)
            assert counts[f"layers.{layer}.attention.wq"] == 2 * executing * args.dim * args.n_heads * args.head_dim
    # and the outputs still equal the masked reference under evict
    model = routed_model(kv="evict", engine=engine)
    masked, _, _ = model(x, routing=Routing(mode="force", force=force))
    skipped, _, _ = model(x, routing=Routing(mode="force", force=force, fast=True))
    assert (masked - skipped).abs().max() < 1e-4


@pytest.mark.parametrize("engine", ENGINES)
def test_evict_decoding_writes_no_k_v_for_a_skipped_token(engine):
    """Batch-1 decoding under evict: a token that skips attention computes no K/V at all."""
    model = routed_model(kv="evict", engine=engine)
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


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kv", ["keep", "evict"])
@pytest.mark.parametrize("mlp_input", ["block", "post_attn"])
def test_fast_path_equals_masked_path_with_router_decisions(kv, mlp_input, engine):
    """Not forced gates: the routers decide (hard gates at an offset), on both paths, batched and not,
    with and without the KV cache. Same gates, same logits."""
    model = decisive_routers(routed_model(kv=kv, mlp_input=mlp_input))
    model = fast.accelerate(model) if engine == "fast" else model
    reference = decisive_routers(routed_model(kv=kv, mlp_input=mlp_input))  # the same weights, model.py as written
    x = torch.randint(0, 101, (3, 20), generator=torch.Generator().manual_seed(5))
    routing = dict(mode="hard", offset=0.5)
    masked, _, g_masked = reference(x, routing=Routing(**routing))
    skipped, _, g_fast = model(x, routing=Routing(**routing, fast=True))
    assert 0.2 < g_masked.mean() < 0.9                            # both decisions occur
    assert torch.equal(g_masked, g_fast)
    assert (masked - skipped).abs().max() < 1e-4
    for batch in (slice(0, 3), slice(2, 3)):                    # decoding against the cache, chunks and single tokens
        model.setup_cache(3, 20)
        outs, pos = [], 0
        for n in (7, 1, 1, 11):
            o, _, _ = model(x[batch, pos:pos + n], routing=Routing(**routing, fast=True), start_pos=pos)
            outs.append(o)
            pos += n
        model.clear_cache()
        assert (torch.cat(outs, 1) - masked[batch]).abs().max() < 1e-4


@pytest.mark.parametrize("engine", ENGINES)
def test_cached_routed_generation_equals_uncached(engine):
    model = decisive_routers(routed_model())
    model = fast.accelerate(model) if engine == "fast" else model
    prompt = torch.randint(0, 101, (2, 6))
    for skipping in (False, True):
        gates = []
        a = model.generate(prompt, 15, temperature=0, routing=Routing(fast=skipping), use_cache=True,
                           on_token=lambda ids, g: gates.append(g.float()[..., -1:]))  # the new tokens' decisions
        b = model.generate(prompt, 15, temperature=0, routing=Routing(fast=skipping), use_cache=False)
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


@pytest.mark.parametrize("kv", ["keep", "evict"])
def test_fast_path_gives_the_masked_paths_lora_gradients(kv):
    # stage 2 trains LoRA on model.py's skipping path: same loss and gradients as the masked reference,
    # also where a sequence has fewer executing queries than another (empty slots) and, under evict,
    # no key before its first executing query
    from lora import add_lora, mark_only_lora_trainable
    model = routed_model(kv=kv)
    add_lora(model, r=4, alpha=8, dropout=0.0)
    mark_only_lora_trainable(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    x, y = torch.randint(0, 101, (2, 16)), torch.randint(0, 101, (2, 16))
    force = (torch.rand(3, 2, 2, 16, generator=torch.Generator().manual_seed(3)) > 0.4).float()
    force[:, 0, 0], force[:, 0, 1, :3] = 1, 0  # sequence 0: every query; sequence 1: fewer, its first tokens none
    grads = []
    for skipping in (False, True):
        model.zero_grad()
        _, loss, _ = model(x, y, routing=Routing(mode="force", force=force, fast=skipping))
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-5)
    for n in grads[0][1]:
        assert torch.allclose(grads[0][1][n], grads[1][1][n], atol=1e-5), n


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
