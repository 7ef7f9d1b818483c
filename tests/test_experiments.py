"""The study runner: jobs, dependencies, resumption, failures, and the interleaved speed measurement."""
import statistics
import sys
import types

import pytest
import torch

import bench
import experiments


def write_job(name, out, deps=(), code="pass"):
    return experiments.Job(name, [sys.executable, "-c", f"{code}\nopen(r'{out}', 'w').write('{name}')"], out, deps)


def test_jobs_run_after_their_deps_and_are_not_rerun(tmp_path):
    order = tmp_path / "order.txt"
    log = f"open(r'{order}', 'a').write('{{}}\\n')"
    a = write_job("a", tmp_path / "a.out", code=log.format("a") + "\nimport time; time.sleep(0.3)")
    b = write_job("b", tmp_path / "b.out", ["a"], code=log.format("b"))
    c = experiments.Job("c", lambda: [sys.executable, "-c",  # a command built from an earlier job's output
                                      f"open(r'{tmp_path / 'c.out'}', 'w').write(open(r'{tmp_path / 'b.out'}').read())"],
                        tmp_path / "c.out", ["b"])
    assert experiments.run_jobs([c, b, a], 2, tmp_path / "logs") == set()
    assert order.read_text().split() == ["a", "b"] and (tmp_path / "c.out").read_text() == "b"
    assert (tmp_path / "logs" / "a.log").exists()
    # everything exists: nothing runs again
    (tmp_path / "a.out").write_text("kept")
    assert experiments.run_jobs([a, b, c], 2, tmp_path / "logs") == set()
    assert (tmp_path / "a.out").read_text() == "kept"


def test_a_failed_job_fails_its_dependents_only(tmp_path):
    bad = experiments.Job("bad", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "bad.out")
    after_bad = write_job("after_bad", tmp_path / "x.out", ["bad"])
    fine = write_job("fine", tmp_path / "fine.out")
    assert experiments.run_jobs([bad, after_bad, fine], 1, tmp_path / "logs") == {"bad", "after_bad"}
    assert (tmp_path / "fine.out").exists() and not (tmp_path / "x.out").exists()


def test_speed_phase_takes_interleaved_medians_against_the_first_model(monkeypatch):
    """bench.prefill_speedups on a fake clock: each model's prefill "takes" a known time per
    repetition (with an outlier); the result must be the medians of the repetitions' time ratios to the
    first model, every model timed once per repetition, the warm-up discarded, the order rotating."""
    durations = {"dense": [9.0, 2.0, 2.0, 2.2, 50.0, 1.8],   # first: warm-up (dropped); median of the rest 2.0
                 "routed": [9.0, 1.0, 1.1, 0.9, 1.0, 30.0],  # median 1.0: twice as fast
                 "pruned": [9.0, 4.0, 4.0, 3.0, 5.0, 4.0]}   # median 4.0: half as fast
    clock, calls = [0.0], {n: 0 for n in durations}
    models = {n: (n, None) for n in durations}               # the fake run_prefill sees the name as "model"
    order = []

    def fake_prefill(model, tokens, routing_fn):
        clock[0] += durations[model][calls[model]]
        calls[model] += 1
        order.append(model)

    monkeypatch.setattr(bench, "run_prefill", fake_prefill)
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    speeds = bench.prefill_speedups(models, torch.zeros(1, 100, dtype=torch.long), repeats=5, threads=1)
    assert speeds["dense"] == pytest.approx((100 / 2.0, 1.0))
    assert speeds["routed"] == pytest.approx((100 / 1.0, 2.0))
    assert speeds["pruned"] == pytest.approx((100 / 4.0, 0.5))
    assert all(c == 6 for c in calls.values())
    rounds = [order[i:i + 3] for i in range(0, 18, 3)]
    assert all(sorted(r) == sorted(durations) for r in rounds) and rounds[0] != rounds[1]  # interleaved, rotating


def test_speedups_pair_each_repetition_so_a_drift_between_repetitions_cancels():
    """The machine slows 3x from the third repetition on, after dense's third run but before the
    variant's: ratios of the medians would say 0.67x; each repetition's pair says 2x, 4 times of 5."""
    dense, variant = [2.0, 2.0, 2.0, 6.0, 6.0], [1.0, 1.0, 3.0, 3.0, 3.0]
    assert statistics.median(dense) / statistics.median(variant) == pytest.approx(2 / 3)
    assert bench.paired_ratio(dense, variant) == pytest.approx(2.0)


def test_command_line_errors():
    from errors import UserError
    with pytest.raises(UserError, match="--quick"):
        experiments.main(["results", "--quick"])
    with pytest.raises(UserError, match="--jobs"):
        experiments.main(["ablations", "--jobs", "0"])
    with pytest.raises(UserError, match="invalid choice"):
        experiments.main(["everything"])


def test_headline_commands_and_verdicts(tmp_path, monkeypatch, capsys):
    # the study's jobs (their commands) and its verdicts, with the jobs' outputs written by hand
    import json
    from tiny import tiny_model
    model = tiny_model(n_layers=10)
    monkeypatch.setattr(experiments, "ensure_default_model", lambda: "base")
    monkeypatch.setattr(experiments, "load", lambda path: model)
    outcomes = {"dense": [1, 1, 0, 1] * 50, "skipgpt+lora": [1, 0, 0, 1] * 50, "shortgpt+lora": [0, 0, 0, 1] * 50,
                "skipgpt+lora-seed1338": [1, 1, 0, 1] * 50}   # the second seed: level with dense
    seen = {}

    def fake_run_jobs(jobs, n_parallel, log_dir):
        for j in jobs:
            seen[j.name] = list(map(str, j.cmd() if callable(j.cmd) else j.cmd))
            if j.name in outcomes:
                c = outcomes[j.name]
                task = {"acc": sum(c) / len(c), "acc_norm": sum(c) / len(c), "n": len(c), "majority": 0.6,
                        "correct": c, "correct_norm": c}
                j.output.parent.mkdir(parents=True, exist_ok=True)
                j.output.write_text(json.dumps({"tasks": {"boolq": task, "piqa": task}, "avg_harness": task["acc"],
                                                "avg_acc": task["acc"], "avg_acc_norm": task["acc"],
                                                "sparsity": {"param_sparsity": 0.0 if j.name == "dense" else 0.4},
                                                "ppl": {"general": 30.0, "lambada": 40.0}}))
        return set()
    monkeypatch.setattr(experiments, "run_jobs", fake_run_jobs)
    experiments.main(["headline", "--out_dir", str(tmp_path), "--seeds", "2"])
    out = capsys.readouterr().out
    # 40% of 10 blocks: ShortGPT removes 4; the routed models are recalibrated to 40% on task text;
    # every evaluation scores 1,000 documents per task, HellaSwag included
    assert seen["train-shortgpt+lora"][seen["train-shortgpt+lora"].index("--shortgpt") + 1] == "4"
    for name in outcomes:
        cmd = seen[name]
        assert cmd[cmd.index("--limit") + 1] == cmd[cmd.index("--hellaswag_limit") + 1] == "1000"
    # each seed: its own stage 1, its LoRA on that stage 1, evaluated; the first seed keeps the plain names
    for t, seed in (("", "1337"), ("-seed1338", "1338")):
        s1, s2, ev = seen[f"train-stage1{t}"], seen[f"train-stage2{t}"], seen[f"skipgpt+lora{t}"]
        assert s1[s1.index("--seed") + 1] == s2[s2.index("--seed") + 1] == seed
        assert s1[s1.index("--out_dir") + 1] == s2[s2.index("--init_from") + 1] == f"out/stage1-t0.40{t}"
        assert ev[ev.index("--model") + 1] == s2[s2.index("--out_dir") + 1] == f"out/stage2-t0.40{t}"
        assert ev[ev.index("--sparsity") + 1] == "0.40"
    # seed 1337: 0.50 against dense 0.75 (200 paired documents, SE ~0.03): does not match dense; against
    # ShortGPT + LoRA's 0.25: above by more than two standard errors. Seed 1338 matches dense. Mean 0.625.
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["minus_dense"][0] == pytest.approx(-0.25) and summary["minus_shortgpt_lora"][0] == pytest.approx(0.25)
    assert summary["minus_dense_by_seed"]["1338"][0] == pytest.approx(0.0)
    assert "(seed 1337) does not match dense" in out and "(seed 1338) matches dense" in out
    assert "above by more than two standard errors" in out
    assert "| 0.6250 (0.5000-0.7500) | 83.3% | -0.1250 (-0.2500 to +0.0000) |" in out

    # the long form: one seed, stage 1 for N steps, every run inside the study's directory (tracked,
    # resumable): a run with a checkpoint resumes, one without starts over
    seen.clear()
    long_dir = tmp_path / "long"
    for run in ("stage1-t0.40", "stage2-shortgpt4"):
        (long_dir / run).mkdir(parents=True)
        (long_dir / run / "ckpt.pt").write_bytes(b"")
    experiments.main(["headline", "--out_dir", str(long_dir), "--stage1_iters", "1600"])
    s1, s2, sg = seen["train-stage1"], seen["train-stage2"], seen["train-shortgpt+lora"]
    assert "train-stage1-seed1338" not in seen
    assert s1[s1.index("--max_iters") + 1] == "1600" and s1[s1.index("--resume") + 1] == "true"
    assert s1[s1.index("--out_dir") + 1] == s2[s2.index("--init_from") + 1] == str(long_dir / "stage1-t0.40")
    assert sg[sg.index("--out_dir") + 1] == str(long_dir / "stage2-shortgpt4") and "--resume" in sg
    assert "--overwrite" in s2 and "--resume" not in s2  # (stage 2 has not started)
    assert "SkipGPT stage 1 (1,600 steps) + LoRA, 40%" in capsys.readouterr().out
    (long_dir / "stage1-t0.40" / "ckpt.pt").unlink()
    experiments.main(["headline", "--out_dir", str(long_dir), "--stage1_iters", "1600"])
    assert "--overwrite" in seen["train-stage1"] and "--resume" not in seen["train-stage1"]
    with pytest.raises(experiments.UserError, match="--stage1_iters"):
        experiments.main(["curve", "--stage1_iters", "1600"])


def test_ablation_rows_with_seeds_and_one_row_as_one_command(tmp_path, monkeypatch, capsys):
    # `--rows alpha-32`: that row and the default row, each over its seeds; mean, range and whether
    # the ranges are apart; each run's command carries its own seed and the row's flags
    import json
    from pathlib import Path
    ppl = {("default", 0): 80.0, ("default", 1): 90.0, ("alpha-32", 0): 100.0, ("alpha-32", 1): 120.0}
    seen = {}

    def fake_run_jobs(jobs, n_parallel, log_dir):
        for j in jobs:
            seen[j.name] = list(map(str, j.cmd))
            row, k = j.output.parent.parent.name, int(j.output.parent.name.removeprefix("seed"))
            j.output.parent.mkdir(parents=True, exist_ok=True)
            j.output.write_text(json.dumps({"val_ppl_routed": ppl[row, k], "val_ppl_dense": 33.0, "val_param_sparsity": 0.25,
                                            "val_attn_skip": 0.3, "val_mlp_skip": 0.25}))
        return set()
    monkeypatch.setattr(experiments, "run_jobs", fake_run_jobs)
    monkeypatch.setattr(experiments, "timed_model", lambda path: (types.SimpleNamespace(tokenizer=None), None))
    monkeypatch.setattr(experiments, "load_split", lambda *a: torch.zeros(2000, dtype=torch.long).numpy())
    monkeypatch.setattr(experiments, "val_windows", lambda *a, **k: torch.zeros(1, 513, dtype=torch.long))
    monkeypatch.setattr(bench, "prefill_speedups", lambda models, text, repeats: {m: (100.0, 1.1) for m in models})
    monkeypatch.setattr(experiments, "plot_ablations", lambda *a: None)
    # a full study to rank against, in which alpha-32 is better than the default beyond its seed spread
    full = tmp_path / "full"
    full.mkdir()
    (full / "ablations.json").write_text(json.dumps({"rows": {
        "default": {"ppl": 60.0, "n": 3, "beyond": "-"}, "alpha-32": {"ppl": 50.0, "n": 3, "beyond": "yes, better"}}}))
    experiments.main(["ablations", "--quick", "--rows", "alpha-32", "--seeds", "2", "--out_dir", str(tmp_path),
                      "--full_dir", str(full)])
    assert sorted(seen) == ["train-alpha-32-seed0", "train-alpha-32-seed1", "train-default-seed0", "train-default-seed1"]
    cmd = seen["train-alpha-32-seed1"]
    assert cmd[cmd.index("--seed") + 1] == "1338" and cmd[cmd.index("--alpha") + 1] == "32"
    for flag, value in zip(experiments.QUICK_TRAIN[::2] + experiments.QUICK_STAGE1[::2],
                           experiments.QUICK_TRAIN[1::2] + experiments.QUICK_STAGE1[1::2]):
        assert cmd[cmd.index(flag) + 1] == value
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = summary["rows"]
    # quick: alpha-32 worse than the default; full: better, beyond its spread -> a sign flip, rho -1
    assert summary["agreement"]["spearman"] == pytest.approx(-1.0) and summary["agreement"]["sign_flips"] == ["alpha-32"]
    assert "| 1 | default (85.0) | alpha-32 (50.0, 3) |" in Path(tmp_path / "ablations.md").read_text()
    assert rows["default"]["ppl"] == 85.0 and (rows["alpha-32"]["lo"], rows["alpha-32"]["hi"]) == (100.0, 120.0)
    assert rows["alpha-32"]["beyond"] == "yes, worse"
    assert Path(tmp_path / "ablations.md").read_text().count("| alpha-32 |") == 1
    # the full form without zero-shot: perplexity and speed only, no evaluation job
    seen.clear()
    experiments.main(["ablations", "--rows", "alpha-32", "--seeds", "2", "--out_dir", str(tmp_path / "full-form"),
                      "--zero_shot", "false"])
    assert seen and not [name for name in seen if name.startswith("eval-")]
    assert "| 1.10x |" in Path(tmp_path / "full-form" / "ablations.md").read_text()
    # overlapping ranges are not a finding
    rows2 = experiments.ablation_rows({"default": [{"val_ppl_routed": v, "val_param_sparsity": 0.25, "val_attn_skip": 0.3,
                                                    "val_mlp_skip": 0.2} for v in (80, 90)],
                                       "x": [{"val_ppl_routed": v, "val_param_sparsity": 0.25, "val_attn_skip": 0.3,
                                              "val_mlp_skip": 0.2} for v in (85, 95)]})
    assert rows2["x"]["beyond"] == "no"


def test_spearman_against_pearson_of_ranks():
    import numpy as np
    assert experiments.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert experiments.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties take their average rank: x ranks (0, 1.5, 1.5, 3), y ranks (0, 2, 1, 3)
    want = np.corrcoef([0, 1.5, 1.5, 3], [0, 2, 1, 3])[0, 1]
    assert experiments.spearman([5.0, 7.0, 7.0, 9.0], [1.0, 3.0, 2.0, 4.0]) == pytest.approx(want)


def test_results_study_rows_and_table(tmp_path, monkeypatch, capsys):
    # every row's command, and a table in the harness metric, from hand-written evaluation outputs
    import json
    from tiny import tiny_model
    import tasks
    model = tiny_model(n_layers=30)
    monkeypatch.setattr(experiments, "ensure_default_model", lambda: "base")
    monkeypatch.setattr(experiments, "load", lambda path: model)
    monkeypatch.setattr(experiments, "general_windows", lambda tok, block: torch.zeros(1, 513, dtype=torch.long))
    monkeypatch.setattr(experiments, "load_for_speed", lambda r, base: (None, None))
    monkeypatch.setattr(bench, "prefill_speedups", lambda models, text, repeats: {m: (100.0, 1.2) for m in models})
    monkeypatch.setattr(experiments, "plot_quality", lambda *a: None)
    seen = {}

    def fake_run_jobs(jobs, n_parallel, log_dir):
        for j in jobs:
            cmd = list(map(str, j.cmd() if callable(j.cmd) else j.cmd)) if not j.name.startswith(("shortgpt@", "attention-drop@")) else None
            seen[j.name] = cmd
            if j.name.startswith("train"):
                continue
            kind = ("shortgpt+lora" if j.name.startswith("shortgpt") and "lora" in j.name else "shortgpt" if j.name.startswith("shortgpt")
                    else "attention_drop" if j.name.startswith("attention") else "dense" if j.name.startswith("dense") else "routed")
            task = {t: {"acc": 0.5, "acc_norm": 0.6 if tasks.HARNESS_METRIC[t] == "acc_norm" else 0.1, "n": 10, "majority": 0.62}
                    for t in tasks.TASKS}
            j.output.parent.mkdir(parents=True, exist_ok=True)
            j.output.write_text(json.dumps({"kind": kind, "tasks": task, "avg_acc": 0.5, "avg_acc_norm": 0.4, "avg_harness": 0.55,
                                            "knowledge": 0.5, "sparsity": {"param_sparsity": 0.25, "module_sparsity": 0.27, "attn_skip": 0.3, "mlp_skip": 0.25},
                                            "ppl": {"general": 50.0, "shakespeare": 60.0, "lambada": 70.0}}))
        for j in jobs:  # the matched baselines' commands read SkipGPT's results: build them now
            if seen[j.name] is None:
                seen[j.name] = list(map(str, j.cmd()))
        return set()
    monkeypatch.setattr(experiments, "run_jobs", fake_run_jobs)
    experiments.main(["results", "--out_dir", str(tmp_path)])
    out = capsys.readouterr().out
    # SkipGPT trained for 10/25/40%, each evaluated recalibrated to its sparsity; ShortGPT + LoRA with 3, 7, 12 blocks
    for s, blocks in (("0.10", 3), ("0.25", 7), ("0.40", 12)):
        assert seen[f"train-stage1-{s}"][seen[f"train-stage1-{s}"].index("--target_sparsity") + 1] == s
        assert seen[f"skipgpt-{s}+lora"][seen[f"skipgpt-{s}+lora"].index("--sparsity") + 1] == s
        assert seen[f"train-shortgpt{blocks}+lora"][seen[f"train-shortgpt{blocks}+lora"].index("--shortgpt") + 1] == str(blocks)
        assert seen[f"shortgpt@{s}"][seen[f"shortgpt@{s}"].index("--match_sparsity") + 1] == "0.25"  # what SkipGPT reached
    assert seen["skipgpt-0.25@0.40"][seen["skipgpt-0.25@0.40"].index("--model") + 1] == "out/stage1"
    # the harness metric per task: acc_norm (0.6) for PIQA, acc (0.5) for BoolQ; the majority rate beside
    table = (tmp_path / "results.md").read_text()
    assert "piqa (acc_norm)" in table and "boolq (acc)" in table and "0.620 of its documents" in table
    row = next(line for line in table.splitlines() if line.startswith("| SkipGPT stage 1, 25% |"))
    assert row.split(" | ")[5:8] == ["50%", "0.500", "0.600"] and "0.550 (100%)" in row and row.endswith("| 1.20x |")
    assert experiments.quality_curves("skipgpt-0.25", "routed") == ["SkipGPT (trained for each sparsity)",
                                                                     "SkipGPT 25% routers, recalibrated"]


def test_curve_table_fit_and_resumable_training_commands(tmp_path, capsys, monkeypatch):
    """The learning curve reads each finished point (run summary, its evaluation, ShortGPT's), fits
    routed / dense - 1 = c tokens^-b (three points on an exact power law give b back), and trains a
    point again with --resume where its checkpoint exists."""
    import json
    d = tmp_path / "curve"
    b, c = 0.3, 40.0
    for n in (100, 200, 400):
        (d / f"steps{n}").mkdir(parents=True)
        ratio = 1 + c * (n * 512) ** -b
        (d / f"steps{n}" / "summary.json").write_text(json.dumps(
            {"val_ppl_routed": 30 * ratio, "val_ppl_dense": 30.0, "val_ppl_shortgpt": 90.0, "shortgpt_blocks": 8,
             "val_param_sparsity": 0.25, "train_seconds": n}))
        # the training time spans sessions: 400 steps in two, 250 s and 150 s (its log restarts at step 300)
        times = [60.0 * i for i in range(n // 100)] if n < 400 else [50.0, 100.0, 250.0, 20.0, 150.0]
        (d / f"steps{n}" / "log.jsonl").write_text("".join(json.dumps({"kind": "train", "time": t}) + "\n" + (
            json.dumps({"kind": "val", "loss": 1.0}) + "\n" if i == 1 else "") for i, t in enumerate(times)))
        (d / f"steps{n}" / "config.json").write_text(json.dumps(
            {"settings": {"batch_size": 4, "block_size": 128, "gradient_accumulation_steps": 1}}))
        ev = {"ppl": {"lambada": 100.0, "shakespeare": 90.0}, "knowledge": 0.5}
        (d / f"eval-steps{n}.json").write_text(json.dumps(ev))
        (d / f"shortgpt-steps{n}.json").write_text(json.dumps(ev | {"knowledge": 0.1}))
    (d / "dense.json").write_text(json.dumps({"ppl": {"lambada": 47.0, "shakespeare": 46.0}}))
    experiments.main(["curve", "--out_dir", str(d), "--max_steps", "400", "--report_only"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [p["steps"] for p in out["points"]] == [100, 200, 400] and out["missing"] == []
    assert out["fit"]["exponent"] == pytest.approx(b, rel=1e-6) and out["fit"]["coefficient"] == pytest.approx(c, rel=1e-6)
    assert out["fit"]["ratio_at_paper_tokens"] == pytest.approx(1 + c * (10_000 * 16 * 4096) ** -b, rel=1e-6)
    assert (d / "learning_curve.png").exists() and "| 400 | 204,800 | 7 min |" in (d / "learning_curve.md").read_text()
    assert [p["train_seconds"] for p in out["points"]] == [0.0, 60.0, 400.0]
    # a point whose run stopped resumes from its checkpoint; one never started starts
    jobs = []
    monkeypatch.setattr(experiments, "run_jobs", lambda js, n, log_dir: jobs.extend(js) or set())
    (d / "steps800").mkdir()
    (d / "steps800" / "ckpt.pt").write_text("")
    experiments.main(["curve", "--out_dir", str(d)])  # (reports the three finished points again)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["missing"] == [800, 1600, 3200]
    cmds = {j.name: j.cmd() if callable(j.cmd) else j.cmd for j in jobs if j.name.startswith("train-")}
    assert "--resume" in cmds["train-steps800"] and "--overwrite" in cmds["train-steps1600"]
