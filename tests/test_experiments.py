"""The study runner: jobs, dependencies, resumption, failures, and the interleaved speed measurement."""
import sys

import pytest
import torch

import bench
import experiments
from router import RouterConfig, Routing
from tiny import tiny_model


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


def test_speed_phase_reports_dense_as_one():
    model = tiny_model().eval()
    routed = tiny_model().eval().add_routers(RouterConfig(protect_first=0))
    speeds = bench.prefill_speedups({"dense": (model, None), "routed": (routed, lambda: Routing(mode="hard", fast=True))},
                                     torch.randint(0, 260, (1, 32)), repeats=2, threads=1)
    assert speeds["dense"][1] == 1.0 and speeds["routed"][0] > 0


def test_command_line_errors():
    from errors import UserError
    with pytest.raises(UserError, match="--quick"):
        experiments.main(["results", "--quick"])
    with pytest.raises(UserError, match="--jobs"):
        experiments.main(["ablations", "--jobs", "0"])
    with pytest.raises(UserError, match="invalid choice"):
        experiments.main(["everything"])
