"""bench.py on a tiny model: it runs, reports every variant, and its FLOP accounting is consistent."""
import json

import pytest

import bench
from tiny import save_tiny_model


def test_bench_quick_on_a_tiny_model(tmp_path, capsys):
    base = save_tiny_model(tmp_path / "base", n_layers=6)
    bench.main(["--model", str(base), "--quick", "--threads", "1", "--plot", str(tmp_path / "b.png"),
                "--sparsities", "0,0.25,0.5"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = out["results"]
    assert {r["variant"] for r in rows} == {"dense", "fast", "masked", "shortgpt"}
    assert (tmp_path / "b.png").exists()
    for r in rows:
        for key in ("variant", "regime", "sparsity", "tokens_per_s", "speedup", "ideal_speedup", "efficiency",
                    "flops_per_token"):
            assert key in r
        if r["regime"].startswith("prefill") or r["regime"] in ("decode64",):
            # batch 1: the counter sees exactly the work the analytic formula describes
            assert r["flops_counted_per_token"] == pytest.approx(r["flops_per_token"], rel=1e-3), r
        if r["variant"] == "masked":
            assert r["ideal_speedup"] <= 1.0  # masking saves nothing
    fast = {r["sparsity"]: r for r in rows if r["variant"] == "fast" and r["regime"] == "prefill64"}
    assert fast[0.5]["flops_per_token"] < fast[0.25]["flops_per_token"] < fast[0.0]["flops_per_token"]
    assert fast[0.25]["executed_param_fraction"] == pytest.approx(0.75, abs=0.08)
