"""Stage 1 end to end on a tiny random model: what trains, what is saved, resume, DDP, bad input."""
import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train_stage1
import training
from errors import UserError
from checkpoint import load
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


def initial_routers(base, cfg, seed=1337):
    """The routers a run with this seed starts from (train_stage1 seeds right before add_routers)."""
    torch.manual_seed(seed)
    return {k: v for k, v in load(base).add_routers(cfg).state_dict().items() if "_router." in k}


@pytest.mark.parametrize("lr", ["0.002", "0"])
def test_step_changes_routers_only(tiny, tmp_path, lr):
    base, data = tiny
    before = load(base).state_dict()
    train_stage1.main(args_for(tiny, tmp_path / "run", "--max_iters", "2", "--calibrate", "false",
                               "--learning_rate", lr, "--weight_decay", "0"))
    after = load(tmp_path / "run")
    for name, value in after.state_dict().items():
        if "_router." in name:
            continue
        assert torch.equal(value, before[name]), name
    trained = load_file(tmp_path / "run" / "routers.safetensors")
    start = initial_routers(base, after.router_cfg)
    assert set(trained) == set(start)  # nothing of the base is stored in the run
    changed = [k for k in trained if not torch.equal(trained[k], start[k])]
    if lr == "0":  # the comparison is against the run's true starting point: with no step, nothing moved
        assert changed == []
    else:
        assert any("layers.3." in k for k in changed), "routers of an unprotected block did not change"
        assert not any("layers.0." in k or "layers.1." in k for k in changed)  # protected blocks get no gradient


def test_tau_and_target_schedules():
    s = train_stage1.Settings(max_iters=11, tau_start=5.0, tau_end=1.0, target_sparsity=0.3, sparsity_warmup=0.5)
    taus = [train_stage1.tau_at(i, s) for i in range(11)]
    assert taus == pytest.approx([5.0 - 0.4 * i for i in range(11)])  # linear, 5 at the first step, 1 at the last
    targets = [train_stage1.target_at(i, s) for i in range(11)]
    warm = 0.5 * 11                                                  # the ramp spans 5.5 steps
    assert targets == pytest.approx([0.3 * min(1.0, (i + 1) / warm) for i in range(11)])
    assert targets[4] < 0.3 and targets[5] == 0.3
    flat = train_stage1.Settings(max_iters=11, target_sparsity=0.3, sparsity_warmup=0.0)
    assert [train_stage1.target_at(i, flat) for i in range(11)] == [0.3] * 11


def test_distillation_loss_value_and_gradient():
    """KL(teacher || student) per token, averaged over tokens: value and gradient by hand."""
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 7, generator=g, requires_grad=True)
    teacher = torch.randn(2, 3, 7, generator=g) * 3
    loss = train_stage1.distill_loss(student, teacher)
    p, q = teacher.softmax(-1), student.detach().softmax(-1)
    direct = (p * (p.log() - q.log())).sum(-1).mean()
    assert loss.item() == pytest.approx(direct.item(), rel=1e-5)
    loss.backward()
    # d/dz_s of sum_v p_v (log p_v - log softmax(z_s)_v), averaged over the 6 tokens: (softmax(z_s) - p) / 6
    torch.testing.assert_close(student.grad, (q - p) / 6, atol=1e-6, rtol=1e-5)


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
    model = load(tmp_path / "run")
    assert model.routing_offset == summary["offset"]


def test_resume_reproduces_an_uninterrupted_run(tiny, tmp_path, monkeypatch, capsys):
    common = ["--max_iters", "6", "--calibrate", "false"]
    train_stage1.main(args_for(tiny, tmp_path / "a", *common))
    calls = {"n": 0}
    real_get_batch = training.get_batch

    def interrupt_at_fourth(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_get_batch(*a, **k)

    monkeypatch.setattr(training, "get_batch", interrupt_at_fourth)
    with pytest.raises(SystemExit) as e:
        train_stage1.main(args_for(tiny, tmp_path / "b", *common))
    assert e.value.code == 130
    assert json.loads((tmp_path / "b" / "config.json").read_text())["iter"] == 3
    monkeypatch.setattr(training, "get_batch", real_get_batch)
    train_stage1.main(args_for(tiny, tmp_path / "b", *common, "--resume", "true"))
    la = [r for r in map(json.loads, (tmp_path / "a" / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    lb = [r for r in map(json.loads, (tmp_path / "b" / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert [r["iter"] for r in lb] == list(range(6))
    for ra, rb in zip(la, lb):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5), ra["iter"]
    wa = load_file(tmp_path / "a" / "routers.safetensors")
    wb = load_file(tmp_path / "b" / "routers.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_ctrl_c_during_the_optimizer_step_is_taken_at_its_end(tiny, tmp_path, monkeypatch):
    """A Ctrl-C that arrives while the optimizer updates the weights waits for the update to finish:
    the saved step count matches the saved weights, and the resumed run equals an uninterrupted one."""
    import signal
    common = ["--max_iters", "4", "--calibrate", "false"]
    train_stage1.main(args_for(tiny, tmp_path / "a", *common))
    calls, real_step = {"n": 0}, torch.optim.AdamW.step

    def step_with_ctrl_c(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            signal.raise_signal(signal.SIGINT)  # arrives in the middle of step 2's update
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_with_ctrl_c)
    with pytest.raises(SystemExit):
        train_stage1.main(args_for(tiny, tmp_path / "b", *common))
    assert json.loads((tmp_path / "b" / "config.json").read_text())["iter"] == 2  # the update it interrupted counts
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    train_stage1.main(args_for(tiny, tmp_path / "b", *common, "--resume", "true"))
    wa = load_file(tmp_path / "a" / "routers.safetensors")
    wb = load_file(tmp_path / "b" / "routers.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_a_background_run_ignoring_sigint_still_stops_on_it_with_a_checkpoint(tiny, tmp_path, monkeypatch):
    """nohup and `&` start a process with SIGINT ignored; kill -INT must still save and stop the run."""
    import signal
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        calls, real_batch = {"n": 0}, training.get_batch

        def batch_then_sigint(*a, **k):
            calls["n"] += 1
            if calls["n"] == 3:
                signal.raise_signal(signal.SIGINT)  # while step 2 draws its batch
            return real_batch(*a, **k)
        monkeypatch.setattr(training, "get_batch", batch_then_sigint)
        with pytest.raises(SystemExit):
            train_stage1.main(args_for(tiny, tmp_path / "run", "--max_iters", "4", "--calibrate", "false"))
        assert json.loads((tmp_path / "run" / "config.json").read_text())["iter"] == 2
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # handed back as it was found
    finally:
        signal.signal(signal.SIGINT, previous)


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
    (["--calib_windows", "0"], "calib_windows must be in 1..8"),
    (["--no_such_flag", "1"], "unrecognized arguments"),
    (["--weighting", "bytes"], "weighting must be one of"),
    (["--recipe", "papers"], "^--recipe must be one of skipgpt, paper, got 'papers'$"),
    (["--tau_end", "0"], "tau_end must be > 0"),
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
    model = load(tmp_path / "run")
    assert model.router_cfg is not None and any(n.endswith("lora_A") for n, _ in model.named_parameters())
    dense = load(base)
    x = torch.randint(0, 256, (1, 16))
    import lora
    with torch.no_grad(), lora.disabled(model):  # LoRA off and no routing: exactly the base model
        assert torch.allclose(model(x)[0], dense(x)[0], atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(model(x)[0], dense(x)[0], atol=1e-5)
    # the dense reference is the base model, LoRA off (evaluated here, not read from the reference cache)
    import common
    val = common.val_windows(common.load_split(tiny[1], "val", dense.tokenizer), n=cfg["settings"]["val_windows"])
    assert summary["val_loss_dense"] == pytest.approx(common.evaluate(dense, val)["loss"], abs=1e-5)


@pytest.mark.parametrize("estimator", ["soft", "none"])
def test_gate_estimators(tiny, tmp_path, estimator):
    """Without a straight-through gradient ("none") the routers receive nothing and never change;
    the relaxed "soft" gates train them."""
    train_stage1.main(args_for(tiny, tmp_path / "run", "--max_iters", "2", "--calibrate", "false",
                               "--gate_estimator", estimator))
    after = load_file(tmp_path / "run" / "routers.safetensors")
    cfg = load(tmp_path / "run").router_cfg
    torch.manual_seed(1337)  # the run's seed: the routers it started from
    fresh = load(tiny[0]).add_routers(cfg)
    moved = any(not torch.equal(v, fresh.state_dict()[k]) for k, v in after.items())
    assert moved == (estimator == "soft")


# ---- DDP: one global budget ------------------------------------------------------------------------

def _router_gradients(rank, model_dir, x, y, noise, world, init_file, out_file):
    """Process `rank` of `world`: the stage-1 loss and router gradient on its share of the rows of x,
    with its rows of the given Gumbel noise (one tensor per router call, in call order)."""
    import router
    torch.set_num_threads(1)
    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    calls, real_noise = iter(noise), router.gumbel_noise
    router.gumbel_noise = lambda logits: next(calls)[rows]      # each process: its rows of the same noise
    try:
        _loss_and_gradients(model_dir, x[rows], y[rows], rank, world, out_file)
    finally:
        router.gumbel_noise = real_noise
    if world > 1:  # both ranks done with every collective, then out without tearing gloo down: its threads
        torch.distributed.barrier()  # can abort a finished process at exit ("terminate called without an
        os._exit(0)                  # active exception"), failing a test whose results are already written


def _loss_and_gradients(model_dir, x, y, rank, world, out_file):
    from training import all_reduce_mean, average_gradients
    s = train_stage1.Settings(protect_first=0, target_sparsity=0.3, sparsity_warmup=0.0, max_iters=10)
    model = load(model_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    model.add_routers(s.router_config()).train()
    params = [p for n, p in model.named_parameters() if "_router." in n]
    all_reduce = (lambda t: all_reduce_mean(t, world)) if world > 1 else None
    loss, info = train_stage1.loss(model, x, y, 5, s, contextlib.nullcontext(), all_reduce)
    loss.backward()
    if world > 1:
        average_gradients(params, world)
    if rank == 0:
        torch.save({"grads": [p.grad for p in params], "sparsity": info["sparsity"]}, out_file)


def test_ddp_sparsity_is_global_and_gradients_equal_one_process_on_the_union(tiny, tmp_path):
    """Two gloo processes with the same Gumbel noise give the router gradient (and the sparsity) of
    one process on the union of their batches: s is all-reduced before the sparsity loss."""
    base, _ = tiny
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 256, (4, 24), generator=g), torch.randint(0, 256, (4, 24), generator=g)
    n_routers = 2 * 4                                              # tiny: 4 blocks, none protected
    noise = [-torch.empty(4, 24, 2).exponential_(generator=g).log() for _ in range(n_routers)]
    _router_gradients(0, base, x, y, noise, 1, None, tmp_path / "one.pt")
    torch.multiprocessing.spawn(_router_gradients, args=(base, x, y, noise, 2, tmp_path / "init", tmp_path / "two.pt"),
                                nprocs=2, join=True)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert two["sparsity"] == pytest.approx(one["sparsity"], abs=1e-6)
    # the two halves skip differently, so without the all-reduce the sparsity term would differ
    assert any(g1.abs().max() > 0 for g1 in one["grads"])
    for g1, g2 in zip(one["grads"], two["grads"]):
        torch.testing.assert_close(g2, g1, atol=1e-6, rtol=1e-4)


# ---- resume, formats, damaged files ----------------------------------------------------------------

@pytest.mark.parametrize("flags", [["--router_norm", "false"], ["--recipe", "paper"], ["--router_kind", "mlp"],
                                   ["--mlp_input", "post_attn"], ["--kv", "evict"]], ids=" ".join)
def test_resume_of_a_run_with_non_default_router_settings(tiny, tmp_path, flags, capsys):
    """The run's own settings are restored before its routers are built: no flag needs repeating."""
    train_stage1.main(args_for(tiny, tmp_path / "run", "--max_iters", "2", "--calibrate", "false", *flags))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    summary = run(args_for(tiny, tmp_path / "run", "--max_iters", "3", "--resume", "true"), capsys)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["iter"] == 3 and cfg["router"] == saved["router"] and summary["recipe"] == saved["settings"]["recipe"]
    with pytest.raises(UserError, match="router flags given differ"):  # a router flag given again, but changed
        flip = ["--router_norm", "true" if not saved["router"]["normalize"] else "false"]
        train_stage1.main(args_for(tiny, tmp_path / "run", "--max_iters", "4", "--resume", "true", *flip))


def test_paper_recipe_is_the_papers_text_and_reports_sampled_gates(tiny, tmp_path, capsys):
    summary = run(args_for(tiny, tmp_path / "run", "--max_iters", "2", "--recipe", "paper"), capsys)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["router"]["mlp_input"] == "post_attn" and not cfg["router"]["normalize"]
    assert cfg["router"]["protect_first"] == 0 and cfg["settings"]["lr_schedule"] == "constant"
    assert cfg["settings"]["weighting"] == "modules" and not cfg["settings"]["distill"]
    assert {"val_loss_sampled", "val_loss_routed"} <= set(summary)
    assert summary["val_loss_sampled"] != summary["val_loss_routed"]  # the sampled gates differ from the hard ones


def test_a_run_of_an_older_format_is_refused_with_how_to_redo_it(tiny, tmp_path):
    train_stage1.main(args_for(tiny, tmp_path / "run", "--max_iters", "1", "--calibrate", "false"))
    cfg_file = tmp_path / "run" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg["version"]  # what every run before format version 2 looked like
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="format version 1.*train_stage1.py --out_dir .* --overwrite true"):
        load(tmp_path / "run")
    with pytest.raises(UserError, match="format version 1"):
        train_stage1.main(args_for(tiny, tmp_path / "run", "--max_iters", "2", "--resume", "true"))


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.mark.parametrize("damaged", ["routers.safetensors", "config.json", "base/model.safetensors",
                                     "base/tokenizer.tiktoken", "base/tokenizer.json", "base/config.json"])
def test_a_damaged_file_is_one_line_naming_it(tiny, tmp_path, damaged):
    base, data = tiny
    import shutil
    shutil.copytree(base, tmp_path / "base")
    train_stage1.main(args_for((tmp_path / "base", data), tmp_path / "run", "--max_iters", "1", "--calibrate", "false"))
    target = tmp_path / (damaged if damaged.startswith("base/") else f"run/{damaged}")
    truncate(target)
    p = subprocess.run([sys.executable, "sample.py", "--model", str(tmp_path / "run"), "--prompt", "to be",
                        "--max_new_tokens", "2"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr
    assert target.name in p.stderr


@pytest.mark.parametrize("damaged", ["ckpt.pt", "routers.safetensors"])
def test_a_damaged_resume_file_is_one_line(tiny, tmp_path, damaged):
    train_stage1.main(args_for(tiny, tmp_path / "run", "--max_iters", "1", "--calibrate", "false"))
    truncate(tmp_path / "run" / damaged)
    with pytest.raises(UserError, match=damaged.replace(".", r"\.")):
        train_stage1.main(args_for(tiny, tmp_path / "run", "--max_iters", "2", "--resume", "true"))


@pytest.mark.parametrize("damaged", ["train.bin", "val.bin", "meta.json"])
def test_damaged_token_files_are_one_line(tiny, tmp_path, damaged):
    base, data = tiny
    import shutil
    shutil.copytree(data, tmp_path / "data")
    truncate(tmp_path / "data" / damaged, keep=0.9)
    with pytest.raises(UserError, match=f"{damaged.replace('.', '[.]')}.*prepare the data again"):
        train_stage1.main(args_for((base, tmp_path / "data"), tmp_path / "run", "--max_iters", "1"))


def test_reference_results_are_computed_once_per_base_and_data(tmp_path):
    # the dense model's and ShortGPT's validation figures are the same for every run: cached by
    # (name, base fingerprint, the tensors' values); a damaged cache or a model without fingerprint recomputes
    import types
    from common import cached_reference
    calls = []

    def compute():
        calls.append(1)
        return {"loss": float(len(calls))}
    model = types.SimpleNamespace(source={"fingerprint": "abc"})
    a, b = torch.arange(10), torch.arange(10) + 1
    assert cached_reference(tmp_path, "dense", model, [a], compute) == {"loss": 1.0}
    assert cached_reference(tmp_path, "dense", model, [a], compute) == {"loss": 1.0} and len(calls) == 1
    assert cached_reference(tmp_path, "dense", model, [b], compute) == {"loss": 2.0}          # other windows
    assert cached_reference(tmp_path, "shortgpt8", model, [a], compute) == {"loss": 3.0}      # another reference
    other = types.SimpleNamespace(source={"fingerprint": "xyz"})
    assert cached_reference(tmp_path, "dense", other, [a], compute) == {"loss": 4.0}          # another base
    (tmp_path / "reference_cache.json").write_text("{not json")
    assert cached_reference(tmp_path, "dense", model, [a], compute) == {"loss": 5.0}
    built = types.SimpleNamespace(source={})
    cached_reference(tmp_path, "dense", built, [a], compute), cached_reference(tmp_path, "dense", built, [a], compute)
    assert len(calls) == 7
