"""docs/EXERCISES.md stays true: every command in it parses, the training commands run in a fast form
on a tiny model, and the "write it yourself" parts have tests that check the reference solutions
(the same tests check a student's).
"""
import json
import math
import re
import shlex
from pathlib import Path

import pytest
import torch

import analyze
import bench
import common
import eval as ev
import experiments
import sample
import train_stage1
import train_stage2
import training
from common import parse_settings
from checkpoint import load
from router import RouterConfig, Routing, gumbel_gate, routing_stats
from tiny import save_tiny_data, save_tiny_model

DOC = Path(__file__).resolve().parent.parent / "docs" / "EXERCISES.md"


def doc_commands():
    """Every `python X.py ...` line of the bash blocks: [(script, argv), ...]."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)
    commands = []
    for line in (l.split("#")[0].strip() for b in blocks for l in b.splitlines()):
        parts = shlex.split(line)
        if len(parts) >= 2 and parts[0] == "python" and parts[1].endswith(".py"):
            commands.append((parts[1][:-3], parts[2:]))
    return commands


PARSERS = {
    "train_stage1": lambda argv: parse_settings(train_stage1.Settings, "", argv, train_stage1.RECIPES),
    "train_stage2": lambda argv: parse_settings(train_stage2.Settings, "", argv),
    "eval": ev.parse_args, "bench": bench.parse, "sample": sample.parse_args, "analyze": analyze.parse_args,
    "experiments": experiments.parse_args,
}


def test_the_exercises_have_commands():
    scripts = {s for s, _ in doc_commands()}
    assert {"train_stage1", "train_stage2", "bench", "eval", "analyze", "sample"} <= scripts
    assert len(re.findall(r"^## \d+\.", DOC.read_text(), flags=re.M)) >= 6


@pytest.mark.parametrize("script,argv", doc_commands(), ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_every_command_parses(script, argv):
    PARSERS[script](argv)  # an unknown flag or a bad value raises UserError


# ---- the training commands, in a fast form ------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("exercises")
    return save_tiny_model(d / "base"), save_tiny_data(d / "data"), d


FAST = ["--batch_size", "2", "--block_size", "32", "--eval_interval", "1000", "--eval_iters", "2", "--threads", "1"]


def fast_form(argv, tiny, out):
    """A doc command's own flags, pointed at the tiny model and data, for 2 steps."""
    base, data, _ = tiny
    keep, skip = [], {"--out_dir", "--init_from", "--max_iters"}
    it = iter(argv)
    for flag in it:
        value = next(it)
        if flag not in skip:
            keep += [flag, value]
    return keep + ["--data_dir", str(data), "--out_dir", str(out), "--max_iters", "2", *FAST]


@pytest.fixture(scope="module")
def tiny_stage1(tiny):
    base, data, d = tiny
    train_stage1.main(["--init_from", str(base), "--data_dir", str(data), "--out_dir", str(d / "stage1"),
                       "--max_iters", "2", *FAST])
    return d / "stage1"


@pytest.mark.parametrize("argv", [a for s, a in doc_commands() if s == "train_stage1"], ids=" ".join)
def test_stage1_commands_run(argv, tiny, tmp_path, capsys):
    argv = fast_form(argv, tiny, tmp_path / "run") + ["--init_from", str(tiny[0])]
    train_stage1.main(argv)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert math.isfinite(summary["val_ppl_routed"]) and (tmp_path / "run" / "skip_rates.png").exists()
    # what the exercise's flag changes shows in the run (the gate estimators: tests/test_train_stage1.py)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    first_step = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    flags = dict(zip(argv[::2], argv[1::2]))
    assert cfg["router"]["kv"] == flags.get("--kv", "keep")
    assert first_step["tau"] == float(flags.get("--tau_start", train_stage1.Settings.tau_start))


@pytest.mark.parametrize("argv", [a for s, a in doc_commands() if s == "train_stage2"], ids=" ".join)
def test_stage2_commands_run(argv, tiny, tiny_stage1, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(training, "val_windows", lambda data, n=None: common.val_windows(data, n=4, block=32))
    train_stage2.main(fast_form(argv, tiny, tmp_path / "run") + ["--init_from", str(tiny_stage1)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    r = int(argv[argv.index("--lora_r") + 1])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lora"]["r"] == r
    assert summary["val_loss_stage2"] > 0


def test_analyze_runs(tiny, tiny_stage1, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(analyze, "general_windows", lambda tok: torch.randint(0, 256, (3, 65)))
    result = analyze.main(["--model", str(tiny_stage1), "--data_dir", str(tiny[1]), "--out_dir", str(tmp_path),
                           "--text", "to be or not to be", "--threads", "1"])
    assert all((tmp_path / f).exists() for f in ("per_layer.png", "position.png", "routing_map.png"))
    plays = result["texts"][f"held-out {tiny[1].name}"]
    assert len(plays["attn_exec_by_position"]) == 256 // 16
    # the same windows through the masked path (unfused, every sublayer run, the gates applied): the
    # same decisions, at the run's own offset
    model = load(tiny_stage1)
    windows = common.val_windows(common.load_split(tiny[1], "val", model.tokenizer))
    with torch.no_grad():
        _, _, gates = model(windows[:, :-1], routing=Routing(mode="hard", offset=model.routing_offset, fast=False))
    st = routing_stats(gates.float(), model.args, model.router_cfg.kv)
    assert 0 < st["param_sparsity"] < 1 and result["offset"] == model.routing_offset
    assert plays["param_sparsity"] == pytest.approx(st["param_sparsity"], abs=1e-6)
    assert plays["mlp_exec_per_layer"] == pytest.approx([round(1 - x, 3) for x in st["mlp_skip_per_layer"]], abs=1e-3)


def test_position_profile_averages_routed_blocks_only():
    gates = torch.ones(4, 2, 3, 32)
    gates[2:, 0, :, 16:] = 0  # blocks 2-3 skip attention in the second half of every window
    gates[0] = 0              # block 0 (protected in a real run) is left out of the profile
    attn, mlp = analyze.position_profile(gates, first_routed=1, bin_size=16)
    assert attn.tolist() == pytest.approx([1.0, 1 / 3]) and mlp.tolist() == pytest.approx([1.0, 1.0])


# ---- "write it yourself": the checks ------------------------------------------------------------

def test_gumbel_gate_forward_is_the_argmax_and_backward_the_soft_gradient():
    """Exercise 2. The same Gumbel noise (same seed) gives: forward = [argmax(z + G) == execute],
    gradient = the gradient of softmax((z + G) / tau)[0]."""
    torch.manual_seed(0)
    z = torch.randn(256, 2) * 2
    upstream = torch.randn(256)
    for tau in (0.5, 1.0, 5.0):
        torch.manual_seed(1)
        logits = z.clone().requires_grad_()
        g = gumbel_gate(logits, tau)
        (g * upstream).sum().backward()
        torch.manual_seed(1)  # the reference draws the same noise: -log(Exponential(1)) is Gumbel(0, 1)
        noise = -torch.empty(256, 2).exponential_().log()
        soft_logits = z.clone().requires_grad_()
        soft = ((soft_logits + noise) / tau).softmax(-1)[..., 0]
        (soft * upstream).sum().backward()
        assert torch.equal(g.detach(), ((z + noise).argmax(-1) == 0).float())
        assert torch.allclose(logits.grad, soft_logits.grad, atol=1e-6)
    # the estimators of the exercise: "none" passes nothing back, "soft" is the soft value itself
    logits = z.clone().requires_grad_()
    assert not gumbel_gate(logits, 1.0, "none").requires_grad
    torch.manual_seed(2)
    s = gumbel_gate(z, 1.0, "soft")
    assert ((s > 0) & (s < 1)).float().mean() > 0.5


def test_sample_with_routers_runs(tiny, tiny_stage1, capsys):
    """Exercise 6's second command, on the tiny run."""
    sample.main(["--routers", str(tiny_stage1), "--prompt", "to be", "--max_new_tokens", "5", "--threads", "1"])
    assert "routing: skipped" in capsys.readouterr().err


def test_masked_routing_runs_every_sublayer_and_fast_does_not():
    """Exercise 5's point, as FLOPs: the masked path costs the dense model's work, the fast path less."""
    from torch.utils.flop_counter import FlopCounterMode
    from tiny import tiny_model
    model = tiny_model().eval().add_routers(RouterConfig(protect_first=0))
    x = torch.randint(0, 256, (1, 64))
    force = (torch.rand(4, 2, 1, 64, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    flops = {}
    for name, routing in (("dense", None), ("masked", Routing(mode="force", force=force)),
                          ("fast", Routing(mode="force", force=force, fast=True))):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x, routing=routing)
        flops[name] = counter.get_total_flops()
    assert flops["masked"] >= flops["dense"] > flops["fast"]
