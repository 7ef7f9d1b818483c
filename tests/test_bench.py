"""bench.py on a tiny model: it runs, reports every variant, and its FLOP accounting is consistent."""
import json
import math
import statistics

import pytest

import bench
import fast
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
    assert {r["variant"] for r in rows} == {"dense", "fast", "masked", "ref-dense", "ref-fast", "shortgpt", "transformers", "floor",
                                              "floor_flinear"}
    assert out["checks"]["prefill64 fast vs masked max |logit diff|"] < 1e-4  # the same decisions, the same logits
    assert all(math.isfinite(out["checks"][k]) for k in ("decode64 dense / floor", "decode64 F.linear floor / floor"))
    for k in ("decode64 dense / floor", "decode64 F.linear floor / floor"):  # ratios of times: intervals too
        lo, hi, conf = out["check_intervals"][k]
        assert lo <= out["checks"][k] <= hi and conf == 0.5
    # the floor multiplies by every matrix that dense decoding reads (not the routers' rows): the
    # analytic weight bytes of a dense step, less the norms' weights
    model = load(base)
    model.add_routers(RouterConfig())  # as bench adds them for random routing
    fast.accelerate(model)
    a, dense = model.args, next(r for r in rows if r["variant"] == "dense" and r["regime"] == "decode64")
    norm_bytes = (2 * a.n_layers + 1) * a.dim * 4
    assert sum(m.numel() for m in bench.decode_weights(model)) * 4 == dense["weight_bytes_per_step"] - norm_bytes
    assert (tmp_path / "b.png").exists()
    for r in rows:
        keys = ("variant", "regime", "sparsity", "tokens_per_s", "speedup", "ideal_speedup", "efficiency",
                "speedup_lo", "speedup_hi", "speedup_conf", "efficiency_lo", "efficiency_hi")
        assert all(key in r for key in keys)
        # every speedup carries its interval: 2 repetitions (decoding) give the range of 2 ratios, a 50%
        # interval; prefill 64 repeats 8x as often (16: the 4th to the 13th ratio, 98%)
        assert r["repetitions"] == {"prefill64": 16, "decode64": 2, "decode32x4": 2}[r["regime"]]
        assert r["speedup_lo"] <= r["speedup"] <= r["speedup_hi"], r
        assert r["speedup_conf"] == (0.5 if r["repetitions"] == 2 else pytest.approx(1 - 2 * 697 / 2 ** 16))
        if r["efficiency"] is not None:  # the efficiency at the speedup's endpoints (it rises with the speedup)
            assert r["efficiency_lo"] <= r["efficiency"] <= r["efficiency_hi"], r
            assert r["efficiency_lo"] == pytest.approx(bench.efficiency(r["speedup_lo"], r["ideal_speedup"]))
        if r["variant"] == "dense":
            assert r["speedup_lo"] == r["speedup_hi"] == 1
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
    fast_rows = {r["sparsity"]: r for r in rows if r["variant"] == "fast" and r["regime"] == "prefill64"}
    assert fast_rows[0.5]["flops_per_token"] < fast_rows[0.25]["flops_per_token"] < fast_rows[0.0]["flops_per_token"]
    assert fast_rows[0.25]["executed_param_fraction"] == pytest.approx(0.75, abs=0.08)


def test_median_interval():
    """The distribution-free interval for a median: order statistics chosen by Binomial(n, 1/2)."""
    # 9 values: the 2nd smallest to the 2nd largest, P = 1 - 2 (1 + 9) / 2^9 = 0.9609 (the 3rd: 0.82 < 0.95)
    lo, hi, conf = bench.median_interval([5, 1, 9, 3, 7, 2, 8, 4, 6])
    assert (lo, hi) == (2, 8) and conf == pytest.approx(1 - 20 / 512)
    # 20 values (prefill 128's repetitions): the 6th to the 15th, P = 1 - 2 * 21700 / 2^20
    lo, hi, conf = bench.median_interval(range(1, 21))
    assert (lo, hi) == (6, 15) and conf == pytest.approx(1 - 2 * 21700 / 2 ** 20) and conf >= 0.95
    # 5 values (the default repeats): too few for 95%, so the whole range, at its own 1 - 2^-4
    assert bench.median_interval([1.1, 1.3, 1.0, 1.2, 1.25]) == (1.0, 1.3, pytest.approx(0.9375))
    assert bench.median_interval([2.0, 1.0]) == (1.0, 2.0, 0.5)
    assert bench.median_interval([1.5]) == (1.5, 1.5, 0.0)
    # it contains the median, widens with the spread, and narrows (in ranks) with more repetitions
    import random
    rng = random.Random(0)
    ratios = [1.2 + rng.gauss(0, 0.05) for _ in range(40)]
    lo, hi, _ = bench.median_interval(ratios)
    wide = bench.median_interval([1.2 + 3 * (r - 1.2) for r in ratios])
    assert lo <= statistics.median(ratios) <= hi and wide[1] - wide[0] == pytest.approx(3 * (hi - lo))
    assert hi - lo < bench.median_interval(ratios[:10])[1] - bench.median_interval(ratios[:10])[0]
    # the speedup is the median of the paired ratios, the interval theirs
    dense, fast_times = [2.0, 2.2, 1.8, 2.1, 2.0, 2.4, 1.9], [1.0, 2.0, 1.5, 1.4, 1.6, 2.0, 1.0]
    ratios = [d / f for d, f in zip(dense, fast_times)]
    assert bench.paired_speedup(dense, fast_times) == (statistics.median(ratios), min(ratios), max(ratios),
                                                       pytest.approx(1 - 2 / 128))


def test_random_routing_protects_what_trained_routers_protect(tmp_path, capsys, monkeypatch):
    """bench's random decisions execute the blocks and the first tokens that trained routers always
    execute (RouterConfig's defaults), in every sequence, and the rows report what they run."""
    import torch
    from router import routing_stats
    used, real = {}, bench.Routing

    def spy(**kw):  # every decision tensor bench routes with
        if kw.get("mode") == "force":
            used[id(kw["force"])] = kw["force"]
        return real(**kw)
    monkeypatch.setattr(bench, "Routing", spy)
    base = save_tiny_model(tmp_path / "base", n_layers=6)
    bench.main(["--model", str(base), "--regimes", "prefill24,decode16x3", "--repeats", "1", "--decode_steps", "2",
                "--batched_decode_steps", "3", "--threads", "1", "--plot", "", "--sparsities", "0.25,0.5",
                "--compile", "false", "--transformers", "false"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cfg = RouterConfig()
    assert cfg.protect_first_tokens >= 1 and len(used) == 4  # 2 regimes x 2 sparsities
    for force in used.values():
        assert force[..., :cfg.protect_first_tokens].eq(1).all()  # every block, sublayer and sequence
        assert force[:cfg.protect_first].eq(1).all()
        assert force[cfg.protect_first:, :, :, cfg.protect_first_tokens:].eq(0).any()  # the rest does skip
    # the sparsity each prefill row reports is measured from the decisions it ran
    args = load(base).args
    measured = sorted(routing_stats(f, args)["param_sparsity"] for f in used.values() if f.shape[-1] == 24)
    rows = [r for r in out["results"] if r["variant"] == "fast" and r["regime"] == "prefill24"]
    assert sorted(1 - r["gated_param_fraction"] for r in rows) == pytest.approx(measured, abs=1e-6)
    # and the skip probability makes up for the protected blocks and tokens: the named sparsity, on average
    gen = torch.Generator().manual_seed(0)
    for s in (0.25, 0.5):
        for length, timed_from in ((24, 0), (40, 24)):  # a prefill; a decode after 24 tokens of context
            d = bench.random_routing(args, cfg, s, 2000, length, gen, timed_from=timed_from)
            assert routing_stats(d[..., timed_from:], args)["param_sparsity"] == pytest.approx(s, abs=0.01)
    with pytest.raises(bench.UserError):  # beyond what the unprotected blocks can skip
        bench.random_routing(args, cfg, 0.6, 1, 24, gen)


@pytest.mark.parametrize("variant", ["fast", "ref-fast"])
def test_evict_accounting_matches_the_counted_flops(variant):
    """Under evict, K/V run only for tokens that execute attention: the analytic count bench.py reports
    is what FlopCounterMode sees each skipping path do (the engine's packs the keys too; model.py's
    attends to every key position, the skipped ones masked)."""
    import torch
    from router import RouterConfig, Routing
    from tiny import tiny_model
    model = tiny_model(n_layers=4).eval().add_routers(RouterConfig(protect_first=0, kv="evict"))
    if variant == "fast":
        fast.accelerate(model)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 260, (1, 48), generator=gen)
    force = bench.random_decisions(model.args, 0.4, 1, 48, gen)
    reg = {"kind": "prefill", "name": "prefill48", "batch": 1, "length": 48}
    row = bench.measure_costs(reg, f"{variant}@0.4", model, lambda: Routing(mode="force", force=force, fast=True),
                              tokens, 0, "cpu", 4, "evict", model)
    assert row["flops_counted_per_token"] == pytest.approx(row["flops_per_token"], rel=1e-3)
    # and the same decisions under keep count the K/V projections of every token
    model.add_routers(RouterConfig(protect_first=0, kv="keep"))
    keep = bench.measure_costs(reg, f"{variant}@0.4", model, lambda: Routing(mode="force", force=force, fast=True),
                               tokens, 0, "cpu", 4, "keep", model)
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
    fast_rows = {r["regime"]: r for r in out["results"] if r["variant"] == "fast"}
    masked = {r["regime"]: r for r in out["results"] if r["variant"] == "masked"}
    assert set(fast_rows) == {"prefill64", "decode64", "decode32x4"}
    assert all(0.05 < r["sparsity"] < 0.9 and r["flops_counted_per_token"] < masked[g]["flops_counted_per_token"]
               for g, r in fast_rows.items())  # the routers skip on this text, and the fast path runs less
    # the same routing, run in full: each row's sparsity comes from its own gates
    assert all(abs(masked[g]["sparsity"] - fast_rows[g]["sparsity"]) < 0.02 for g in fast_rows)
    assert all(masked[g]["executed_param_fraction"] == pytest.approx(1) for g in fast_rows)
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
