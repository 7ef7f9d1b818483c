"""Stage 1 end to end on a tiny random model: what trains, what is saved, resume, DDP, bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train_stage1
from errors import UserError
from model import Transformer
from tiny import save_tiny_data, save_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    return save_tiny_model(d / "base"), save_tiny_data(d / "data")


def args_for(tiny, out, *extra):
    base, data = tiny
    return ["--init_from", str(base), "--data_dir", str(data), "--out_dir", str(out), "--batch_size", "2",
            "--block_size", "32", "--eval_interval", "1000", "--eval_iters", "2", "--threads", "1", *extra]


def run(argv, capsys):
    train_stage1.main(argv)
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_step_changes_routers_only(tiny, tmp_path):
    base, data = tiny
    before = Transformer.from_checkpoint(base).state_dict()
    train_stage1.main(args_for(tiny, tmp_path / "run", "--max_iters", "2", "--calibrate", "false"))
    after = Transformer.from_checkpoint(tmp_path / "run")
    for name, value in after.state_dict().items():
        if "_router." in name:
            continue
        assert torch.equal(value, before[name]), name
    fresh = Transformer.from_checkpoint(base).add_routers(after.router_cfg)
    torch.manual_seed(0)
    trained = load_file(tmp_path / "run" / "routers.safetensors")
    changed = [k for k in trained if "layers.3." in k and not torch.equal(trained[k], fresh.state_dict()[k])]
    assert changed, "routers of an unprotected block did not change"
    # nothing of the base is stored in the run
    assert set(trained) == {k for k in after.state_dict() if "_router." in k}


def test_short_run_moves_sparsity_toward_target(tiny, tmp_path, capsys):
    summary = run(args_for(tiny, tmp_path / "run", "--max_iters", "40", "--target_sparsity", "0.4",
                           "--protect_first", "0", "--sparsity_warmup", "0", "--distill", "false",
                           "--calibrate", "false", "--learning_rate", "0.02"), capsys)
    log = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train = [r for r in log if r["kind"] == "train"]
    assert train[0]["sparsity"] < 0.1
    assert sum(r["sparsity"] for r in train[-5:]) / 5 > 0.25
    for key in ("target_sparsity", "val_sparsity", "val_attn_skip", "val_mlp_skip", "val_param_sparsity",
                "val_loss_dense", "val_loss_routed", "val_loss_shortgpt", "out_dir"):
        assert key in summary
    assert (tmp_path / "run" / "curves.png").exists() and (tmp_path / "run" / "skip_rates.png").exists()


def test_calibrated_run_hits_target(tiny, tmp_path, capsys):
    summary = run(args_for(tiny, tmp_path / "run", "--max_iters", "3", "--target_sparsity", "0.3",
                           "--protect_first", "0"), capsys)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["finished"] and cfg["offset"] == summary["offset"]
    # the offset is calibrated on training text; validation text lands close to it
    assert abs(summary["val_param_sparsity"] - 0.3) < 0.1
    model = Transformer.from_checkpoint(tmp_path / "run")
    assert model.routing_offset == summary["offset"]


def test_resume_reproduces_an_uninterrupted_run(tiny, tmp_path, monkeypatch, capsys):
    common = ["--max_iters", "6", "--calibrate", "false"]
    train_stage1.main(args_for(tiny, tmp_path / "a", *common))
    calls = {"n": 0}
    real_get_batch = train_stage1.get_batch

    def interrupt_at_fourth(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_get_batch(*a, **k)

    monkeypatch.setattr(train_stage1, "get_batch", interrupt_at_fourth)
    with pytest.raises(SystemExit) as e:
        train_stage1.main(args_for(tiny, tmp_path / "b", *common))
    assert e.value.code == 130
    assert json.loads((tmp_path / "b" / "config.json").read_text())["iter"] == 3
    monkeypatch.setattr(train_stage1, "get_batch", real_get_batch)
    train_stage1.main(args_for(tiny, tmp_path / "b", *common, "--resume", "true"))
    la = [r for r in map(json.loads, (tmp_path / "a" / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    lb = [r for r in map(json.loads, (tmp_path / "b" / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert [r["iter"] for r in lb] == list(range(6))
    for ra, rb in zip(la, lb):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5), ra["iter"]
    wa = load_file(tmp_path / "a" / "routers.safetensors")
    wb = load_file(tmp_path / "b" / "routers.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_existing_run_is_not_overwritten(tiny, tmp_path):
    train_stage1.main(args_for(tiny, tmp_path / "run", "--max_iters", "1", "--calibrate", "false"))
    before = (tmp_path / "run" / "routers.safetensors").read_bytes()
    with pytest.raises(UserError, match="--resume true.*--overwrite true"):
        train_stage1.main(args_for(tiny, tmp_path / "run", "--max_iters", "1"))
    assert (tmp_path / "run" / "routers.safetensors").read_bytes() == before


@pytest.mark.parametrize("flags,message", [
    (["--target_sparsity", "1.0"], "target_sparsity must be in"),
    (["--target_sparsity", "-0.1"], "target_sparsity must be in"),
    (["--alpha", "-1"], "alpha must be >= 0"),
    (["--no_such_flag", "1"], "unrecognized arguments"),
    (["--weighting", "bytes"], "weighting must be one of"),
])
def test_bad_settings_are_one_line_errors(tiny, tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        train_stage1.main(args_for(tiny, tmp_path / "run", *flags))
    assert not (tmp_path / "run").exists()


def test_missing_data_is_a_clear_error(tiny, tmp_path):
    base, _ = tiny
    with pytest.raises(UserError, match="prepare the data first"):
        train_stage1.main(args_for((base, tmp_path / "nodata"), tmp_path / "run", "--max_iters", "1"))


def test_resume_with_another_base_is_refused(tiny, tmp_path):
    base, data = tiny
    train_stage1.main(args_for(tiny, tmp_path / "run", "--max_iters", "1", "--calibrate", "false"))
    other = save_tiny_model(tmp_path / "other", seed=1)
    with pytest.raises(UserError, match="not for"):
        train_stage1.main(args_for((other, data), tmp_path / "run", "--max_iters", "2", "--resume", "true"))


def test_cli_error_is_one_line_and_nonzero(tiny, tmp_path):
    p = subprocess.run([sys.executable, "train_stage1.py", *args_for(tiny, tmp_path / "run", "--target_sparsity", "2")],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "target_sparsity" in p.stderr
    assert "Traceback" not in p.stderr


def test_torchrun_two_gloo_processes(tiny, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train_stage1.py", *args_for(tiny, tmp_path / "run", "--max_iters", "2", "--calibrate", "false")],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["out_dir"] == str(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["iter"] == 2


def test_joint_run_trains_lora_and_routers_and_loads_back(tiny, tmp_path, capsys):
    """--joint_lora_r: one-stage training; the run holds LoRA beside the routers and loads with both."""
    base, _ = tiny
    summary = run(args_for(tiny, tmp_path / "run", "--max_iters", "3", "--joint_lora_r", "4",
                           "--joint_lora_lr", "0.01"), capsys)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["lora"]["r"] == 4 and (tmp_path / "run" / "lora.safetensors").exists()
    adapters = load_file(tmp_path / "run" / "lora.safetensors")
    assert any(k.endswith("lora_B") and v.abs().max() > 0 for k, v in adapters.items())  # B left zero: LoRA trained
    model = Transformer.from_checkpoint(tmp_path / "run")
    assert model.router_cfg is not None and any(n.endswith("lora_A") for n, _ in model.named_parameters())
    dense = Transformer.from_checkpoint(base)
    x = torch.randint(0, 256, (1, 16))
    import lora
    with torch.no_grad(), lora.disabled(model):  # LoRA off and no routing: exactly the base model
        assert torch.allclose(model(x)[0], dense(x)[0], atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(model(x)[0], dense(x)[0], atol=1e-5)
    assert summary["val_loss_dense"] == pytest.approx(
        run(args_for(tiny, tmp_path / "plain", "--max_iters", "1"), capsys)["val_loss_dense"])


@pytest.mark.parametrize("estimator", ["soft", "none"])
def test_gate_estimators(tiny, tmp_path, estimator):
    """Without a straight-through gradient ("none") the routers receive nothing and never change;
    the relaxed "soft" gates train them."""
    train_stage1.main(args_for(tiny, tmp_path / "run", "--max_iters", "2", "--calibrate", "false",
                               "--gate_estimator", estimator))
    after = load_file(tmp_path / "run" / "routers.safetensors")
    cfg = Transformer.from_checkpoint(tmp_path / "run").router_cfg
    torch.manual_seed(1337)  # the run's seed: the routers it started from
    fresh = Transformer.from_checkpoint(tiny[0]).add_routers(cfg)
    moved = any(not torch.equal(v, fresh.state_dict()[k]) for k, v in after.items())
    assert moved == (estimator == "soft")
