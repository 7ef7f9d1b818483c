"""bench.py on a tiny model: it runs, reports every variant, and its FLOP accounting is consistent."""
import json
import math

import pytest

import bench
from checkpoint import load
from router import RouterConfig
from tiny import save_tiny_model


def test_bench_quick_on_a_tiny_model(tmp_path, capsys):
    base = save_tiny_model(tmp_path / "base", n_layers=6)
    # (eager decoding: compiled decoding equals eager, tests/test_routing.py, and compiling costs ~20 s here)
    bench.main(["--model", str(base), "--quick", "--threads", "1", "--plot", str(tmp_path / "b.png"),
                "--sparsities", "0,0.25,0.5", "--compile", "false"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = out["results"]
    assert {r["variant"] for r in rows} == {"dense", "fast", "masked", "shortgpt", "transformers", "floor",
                                              "floor_flinear"}
    assert out["checks"]["prefill64 fast vs masked max |logit diff|"] < 1e-4  # the same decisions, the same logits
    assert all(math.isfinite(out["checks"][k]) for k in ("decode64 dense / floor", "decode64 F.linear floor / floor"))
    # the floor multiplies by every matrix that dense decoding reads (not the routers' rows): the
    # analytic weight bytes of a dense step, less the norms' weights
    model = load(base)
    model.add_routers(RouterConfig(protect_first=0))
    model.fuse_weights()
    a, dense = model.args, next(r for r in rows if r["variant"] == "dense" and r["regime"] == "decode64")
    norm_bytes = (2 * a.n_layers + 1) * a.dim * 4
    assert sum(m.numel() for m in bench.decode_weights(model)) * 4 == dense["weight_bytes_per_step"] - norm_bytes
    assert (tmp_path / "b.png").exists()
    for r in rows:
        keys = ("variant", "regime", "sparsity", "tokens_per_s", "speedup", "ideal_speedup", "efficiency")
        assert all(key in r for key in keys)
        if r["variant"] in ("transformers", "floor", "floor_flinear"):
            continue
        assert "flops_per_token" in r
        if r["regime"].startswith("prefill") or r["regime"] in ("decode64",):
            # batch 1: the counter sees exactly the work the analytic formula describes
            assert r["flops_counted_per_token"] == pytest.approx(r["flops_per_token"], rel=1e-3), r
    # masking saves nothing: the counter sees at least the dense model's work (plus the routers) at every
    # sparsity, while the fast path's counted work falls
    by = {(r["variant"], r["regime"], r["sparsity"]): r for r in rows}
    for (variant, regime, s), r in by.items():
        if variant == "masked":
            dense = by[("dense", regime, 0.0)]["flops_counted_per_token"]
            assert r["flops_counted_per_token"] >= dense, r
            assert by[("fast", regime, s)]["flops_counted_per_token"] < dense, r
    fast = {r["sparsity"]: r for r in rows if r["variant"] == "fast" and r["regime"] == "prefill64"}
    assert fast[0.5]["flops_per_token"] < fast[0.25]["flops_per_token"] < fast[0.0]["flops_per_token"]
    assert fast[0.25]["executed_param_fraction"] == pytest.approx(0.75, abs=0.08)


def test_evict_accounting_matches_the_counted_flops():
    """Under evict, K/V run only for tokens that execute attention: the analytic count bench.py reports
    is what FlopCounterMode sees the fast path do."""
    import torch
    from router import RouterConfig, Routing
    from tiny import tiny_model
    model = tiny_model(n_layers=4).eval().add_routers(RouterConfig(protect_first=0, kv="evict"))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 260, (1, 48), generator=gen)
    force = bench.random_decisions(model.args, 0.4, 1, 48, gen)
    reg = {"kind": "prefill", "name": "prefill48", "batch": 1, "length": 48}
    row = bench.measure_costs(reg, "fast@0.4", model, lambda: Routing(mode="force", force=force, fast=True), tokens, 0,
                              "cpu", 4, "evict", model)
    assert row["flops_counted_per_token"] == pytest.approx(row["flops_per_token"], rel=1e-3)
    # and the same decisions under keep count the K/V projections of every token
    model.add_routers(RouterConfig(protect_first=0, kv="keep"))
    keep = bench.measure_costs(reg, "fast@0.4", model, lambda: Routing(mode="force", force=force, fast=True), tokens, 0,
                               "cpu", 4, "keep", model)
    assert keep["flops_counted_per_token"] > row["flops_counted_per_token"]


def test_transformers_twin_holds_the_same_model():
    """The transformers row times the same weights: its logits are ours."""
    import torch
    from tiny import tiny_model
    model = tiny_model().eval()
    hf = bench.transformers_twin(model)
    x = torch.randint(0, 260, (2, 24))
    with torch.no_grad():
        assert (hf(x).logits - model(x)[0]).abs().max() < 1e-4


def test_bench_with_trained_routers_times_held_out_text(tmp_path, capsys):
    """--routers: held-out text of the routers' own data, at their own offset; the sparsity reported is
    the one measured on that text, and the fast path's logits equal the masked path's."""
    import train_stage1
    from tiny import save_tiny_data
    base, data = save_tiny_model(tmp_path / "base"), save_tiny_data(tmp_path / "data")
    train_stage1.main(["--init_from", str(base), "--data_dir", str(data), "--out_dir", str(tmp_path / "run"),
                       "--batch_size", "2", "--block_size", "32", "--max_iters", "2", "--eval_iters", "2",
                       "--threads", "1", "--protect_first", "0", "--target_sparsity", "0.3"])
    capsys.readouterr()
    bench.main(["--routers", str(tmp_path / "run"), "--quick", "--threads", "1", "--plot", "",
                "--transformers", "false"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    fast = {r["regime"]: r for r in out["results"] if r["variant"] == "fast"}
    masked = {r["regime"]: r for r in out["results"] if r["variant"] == "masked"}
    assert set(fast) == {"prefill64", "decode64", "decode32x4"}
    assert all(0.05 < r["sparsity"] < 0.9 and r["flops_counted_per_token"] < masked[g]["flops_counted_per_token"]
               for g, r in fast.items())  # the routers skip on this text, and the fast path runs less
    # the same routing, run in full: each row's sparsity comes from its own gates
    assert all(abs(masked[g]["sparsity"] - fast[g]["sparsity"]) < 0.02 for g in fast)
    assert all(masked[g]["executed_param_fraction"] == pytest.approx(1) for g in fast)
    assert out["checks"]["prefill64 fast vs masked max |logit diff|"] < 1e-4


@pytest.mark.parametrize("spare", [0, 10])
def test_decode_repetitions_reuse_one_prefill_without_changing_it(spare):
    """Each repetition of a decode measurement starts from the same prefilled cache: after any number
    of repetitions the cache holds exactly what one fresh prefill + decode leaves (K, V and, under
    evict, which slots may be attended to), so every repetition times the same work; a cache longer
    than needed (bench sizes every batch-1 cache alike) changes nothing either."""
    import torch
    from router import RouterConfig, Routing
    from tiny import tiny_model
    model = tiny_model(n_layers=4).eval().add_routers(RouterConfig(protect_first=0, kv="evict"))
    gen = torch.Generator().manual_seed(0)
    context, steps = torch.randint(0, 260, (2, 20), generator=gen), 6
    force = bench.random_decisions(model.args, 0.4, 2, 20 + steps, gen)
    routing = lambda: Routing(mode="force", force=force, fast=True)  # noqa: E731

    def state(caches):  # the slots the decoding uses
        n = 20 + steps
        return [torch.cat([c.k[:, :, :n].flatten(), c.v[:, :, :n].flatten(), c.keep[:, :n].float().flatten()])
                for c in caches]
    with torch.no_grad():  # the reference: the model's own cached decoding, once, from scratch
        model.setup_cache(2, 20 + steps)
        nxt = model(context, routing=routing())[0][:, -1:].argmax(-1)
        for i in range(steps):
            nxt = model(nxt, routing=routing(), start_pos=20 + i)[0][:, -1:].argmax(-1)
        caches = [layer.attention.cache for layer in model.layers]
        expected = state(caches)
        model.clear_cache()
    reused = bench.prefill_context(model, context, steps, routing, cache_len=20 + steps + spare)
    assert reused[0][0].k.shape[2] == 20 + steps + spare
    for _ in range(3):
        bench.run_decode(model, reused, steps, routing, "cpu")
    assert any(c.k[:, :, -1].abs().sum() > 0 for c in caches)  # the decode reached the last slot
    for a, b in zip(expected, state(reused[0])):
        assert torch.equal(a, b)
    assert all(layer.attention.cache is None for layer in model.layers)  # the model is left without a cache
