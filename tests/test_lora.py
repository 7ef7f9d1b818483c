"""LoRA (lora.py) and stage-2 runs (train_stage2.py) on tiny random models: invariants and formats."""
import contextlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import assets
import common
import train_stage2
import training
from checkpoint import RUN_VERSION, attach_lora, attach_routers, load, read_config, save_model_dir
from errors import UserError
from lora import (LoRALinear, add_lora, lora_layers, lora_state_dict, mark_only_lora_trainable,
                  merge_lora)
from model import ModelArgs, Transformer
from router import RouterConfig, Routing
from tokenizer import GPT2_PATTERN, Tokenizer

ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, vocab_size=101, max_seq_len=64)


def tiny(seed=0, routers=False, **overrides):
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**(ARGS | overrides)))
    with torch.no_grad():  # embeddings (tied to the head) at a trained model's scale, not N(0, 1): logits ~ 1
        model.tok_embeddings.weight.normal_(0, 0.05)
    if routers:  # zero-bias routers on every block: roughly half the modules skip
        model.add_routers(RouterConfig(init="paper", protect_first=0))
    return model.eval()


def tokens(vocab=101, T=24, seed=1):
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(seed))


def randomize_lora(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def logits(model, x, routing=True):
    with torch.no_grad():
        r = Routing(mode="hard", offset=model.routing_offset) if routing and model.router_cfg is not None else None
        return model(x, routing=r)[0]


# ---- the layer ---------------------------------------------------------------------------------

def test_fresh_lora_changes_nothing():
    model, x = tiny(routers=True), tokens()
    before = logits(model, x)
    replaced = add_lora(model)
    assert replaced == [f"layers.{i}.{m}" for i in range(2) for m in ("attention.wq", "attention.wv", "feed_forward.w1")]
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in replaced)
    assert torch.equal(logits(model, x), before)  # B = 0: the update is exactly zero
    model.train()  # dropout on the LoRA branch is still multiplied by B = 0
    with torch.no_grad():
        assert torch.equal(model(x)[0], logits(tiny(), x, routing=False))


def test_merged_equals_unmerged():
    model, x = tiny(), tokens()
    add_lora(model)
    randomize_lora(model)
    unmerged = logits(model, x)
    assert (unmerged - logits(tiny(), x)).abs().max() > 1e-3  # the adapters do something
    merge_lora(model)
    assert all(m.merged for m in lora_layers(model))
    assert torch.allclose(logits(model, x), unmerged, atol=1e-5, rtol=0)


def test_merge_unmerge_restores_weight_and_train_eval_do_not_merge():
    model = tiny()
    add_lora(model, targets=("wq",), r=4, alpha=8)
    randomize_lora(model)
    layer = model.layers[0].attention.wq
    w0 = layer.weight.detach().clone()
    model.train(), model.eval()
    assert not layer.merged and torch.equal(layer.weight, w0)
    layer.merge()
    assert torch.allclose(layer.weight, w0 + 2.0 * layer.lora_B @ layer.lora_A, atol=1e-6)
    layer.merge()  # twice is once
    layer.unmerge()
    assert not layer.merged and torch.allclose(layer.weight, w0, atol=1e-6)


def test_base_weights_shared_and_base_checkpoints_still_load():
    model = tiny()
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    wq = model.layers[0].attention.wq.weight
    add_lora(model)
    assert model.layers[0].attention.wq.weight is wq  # by reference, not a copy
    result = model.load_state_dict(base_sd, strict=False)
    assert not result.unexpected_keys
    assert sorted(result.missing_keys) == sorted(lora_state_dict(model))


def test_only_lora_trainable_and_saved():
    model = tiny(routers=True)
    replaced = add_lora(model, targets=("wq", "w1"), r=8)
    params = mark_only_lora_trainable(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(params) == len(trainable) == 2 * len(replaced)
    saved = lora_state_dict(model)
    assert sorted(saved) == sorted(f"{n}.lora_{ab}" for n in replaced for ab in "AB")
    assert saved["layers.0.attention.wq.lora_A"].shape == (8, 64)
    assert saved["layers.0.feed_forward.w1.lora_B"].shape == (96, 8)


def test_training_step_changes_only_lora():
    model, x = tiny(routers=True), tokens()
    add_lora(model)
    params = mark_only_lora_trainable(model)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    lora_before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    model.train()
    loss, _ = train_stage2.Stage().loss(model, x[:, :-1], x[:, 1:], 0, train_stage2.Settings(), contextlib.nullcontext(), None)
    loss.backward()
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # base weights and routers untouched
    assert any(not torch.equal(after[k], v) for k, v in lora_before.items() if k.endswith("lora_B"))


def test_stage2_gates():
    model = tiny(routers=True)
    model.routing_offset = 0.3
    hard = train_stage2.make_routing(model, train_stage2.Settings())
    assert (hard.mode, hard.offset) == ("hard", 0.3)  # as inference routes, with stage 1's calibrated offset
    assert train_stage2.make_routing(model, train_stage2.Settings(gate="sample")).mode == "sample"
    assert train_stage2.make_routing(tiny(), train_stage2.Settings(dense=True)) is None


@pytest.mark.parametrize("kwargs,match", [(dict(targets=("wq", "q_proj")), "'q_proj' matches no linear layer"),
                                          (dict(r=0), "rank"), (dict(r=-3), "rank"), (dict(dropout=1.0), "dropout")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(UserError, match=match):
        add_lora(tiny(), **kwargs)


def test_lora_twice_is_refused():
    model = tiny()
    add_lora(model, targets=("wv",))
    with pytest.raises(UserError, match="already has a LoRA adapter"):
        add_lora(model, targets=("wv",))


# ---- runs on disk --------------------------------------------------------------------------------

def write_base(path, model):
    state = {k: v for k, v in model.state_dict().items() if "_router." not in k and "lora_" not in k}
    state.pop("output.weight")  # tied embeddings: stored once
    save_model_dir(path, state, model.args, model.tokenizer, source={})
    return load(path)


def write_stage1(path, base, seed=3, offset=0.25):
    """A stage-1 run by hand: the base with fresh routers, as train_stage1.py would save it."""
    torch.manual_seed(seed)
    base.add_routers(RouterConfig(init="paper", protect_first=0))
    path.mkdir(parents=True)
    save_file(base.router_state_dict(), path / "routers.safetensors")
    cfg = {"format": "stage1", "version": RUN_VERSION, "base": {"path": base.source["path"], "fingerprint": base.source["fingerprint"]},
           "router": base.router_cfg.to_dict(), "offset": offset, "finished": True, "settings": {}}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture
def stage1_run(tmp_path):
    base = write_base(tmp_path / "base", tiny())
    return write_stage1(tmp_path / "stage1", base)


def trained_stage2(tmp_path, stage1_dir, dense=False):
    """A stage-2 model with random adapters, saved with train_stage2.save_run."""
    s = train_stage2.Settings(out_dir=str(tmp_path / "stage2"), dense=dense)
    model, _ = train_stage2.load_start(stage1_dir, dense)
    add_lora(model, s.targets(), s.lora_r, s.lora_alpha, s.lora_dropout)
    randomize_lora(model)
    params = mark_only_lora_trainable(model)
    out = tmp_path / "stage2"
    out.mkdir()
    stage = train_stage2.Stage()
    stage.stage1 = None if dense else train_stage2.stage1_reference(stage1_dir)
    training.save_run(out, stage, model, s, 5, torch.optim.AdamW(params), final=True)
    return model.eval(), out


@pytest.mark.parametrize("dense", [False, True], ids=["routed", "dense"])
def test_stage2_run_reloads_to_identical_logits(tmp_path, stage1_run, dense):
    model, out = trained_stage2(tmp_path, stage1_run, dense)
    cfg = read_config(out)
    assert cfg["format"] == "stage2" and cfg["lora"] == {"r": 16, "alpha": 32.0, "dropout": 0.1, "targets": ["wq", "wv", "w1"]}
    assert (cfg["stage1"] is None) == dense
    loaded = load(out).eval()
    assert (loaded.router_cfg is None) == dense and loaded.routing_offset == (0.0 if dense else 0.25)
    x = tokens()
    assert torch.equal(logits(loaded, x), logits(model, x))


@pytest.mark.parametrize("dense", [False, True], ids=["routed", "dense"])
def test_merged_checkpoint_matches_base_plus_lora(tmp_path, stage1_run, dense):
    model, out = trained_stage2(tmp_path, stage1_run, dense)
    merged_dir = train_stage2.save_merged(model, out, None if dense else read_config(stage1_run))
    assert read_config(merged_dir)["format"] == ("model" if dense else "stage1")
    merged = load(merged_dir).eval()
    assert not lora_layers(merged) and merged.routing_offset == model.routing_offset
    x = tokens()
    assert torch.allclose(logits(merged, x), logits(model, x), atol=1e-5, rtol=0)
    assert lora_state_dict(model)  # saving merged weights left the adapters in place, unmerged
    assert not any(m.merged for m in lora_layers(model))


def test_routers_of_another_base_are_refused(tmp_path, stage1_run):
    other = write_base(tmp_path / "other", tiny(seed=9))
    with pytest.raises(UserError, match="holds routers for base model"):
        attach_routers(other, stage1_run)
    _, out = trained_stage2(tmp_path, stage1_run)
    with pytest.raises(UserError, match="holds LoRA weights for base model"):
        attach_lora(load(tmp_path / "other"), out, read_config(out))
    # the base a run names was replaced by another model: refused by fingerprint, on one line
    write_base(tmp_path / "base2", tiny(seed=9))
    (tmp_path / "base" / "model.safetensors").write_bytes((tmp_path / "base2" / "model.safetensors").read_bytes())
    cfg = read_config(tmp_path / "base2")
    (tmp_path / "base" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="routers from another base model"):
        load(out)


def test_stage2_refuses_changed_stage1_routers(tmp_path, stage1_run):
    _, out = trained_stage2(tmp_path, stage1_run)
    base = load(read_config(stage1_run)["base"]["path"])
    (stage1_run / "routers.safetensors").unlink()
    torch.manual_seed(7)
    base.add_routers(RouterConfig(init="paper", protect_first=0))
    save_file(base.router_state_dict(), stage1_run / "routers.safetensors")
    with pytest.raises(UserError, match="now holds other routers"):
        load(out)


# ---- the command line, end to end, on a tiny model and a tiny byte-level corpus ------------------

def byte_tokenizer():
    return Tokenizer({bytes([b]): b for b in range(256)}, {"<|endoftext|>": 256}, GPT2_PATTERN, name="bytes", eos_id=256)


@pytest.fixture
def project(tmp_path, capsys, monkeypatch):
    """A tiny base with a tokenizer, a stage-1 run on it, token files; -> (stage-1 dir, run(*flags) -> JSON)."""
    monkeypatch.setattr(training, "val_windows", lambda data, n=None: common.val_windows(data, n=4, block=32))
    tok = byte_tokenizer()
    model = tiny(vocab_size=257)
    model.tokenizer = tok
    stage1 = write_stage1(tmp_path / "stage1", write_base(tmp_path / "base", model), offset=0.0)
    rng = np.random.default_rng(0)
    text = lambda n: " ".join(rng.choice(["to", "be", "or", "not", "that", "is", "the", "question"], n))
    assets.write_dataset(tmp_path / "data", tok, {"a": text(300)}, {"b": text(120)})
    flags = ["--data_dir", str(tmp_path / "data"), "--max_iters", "3", "--eval_interval", "2", "--eval_iters", "2",
             "--batch_size", "2", "--block_size", "16", "--device", "cpu"]

    def run(*argv):
        capsys.readouterr()
        train_stage2.main(flags + list(argv))
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return stage1, run


def test_cli_end_to_end(tmp_path, project):
    stage1, run = project
    out = tmp_path / "s2"
    summary = run("--init_from", str(stage1), "--out_dir", str(out), "--merge", "true")
    assert {"val_loss_dense", "val_loss_stage1", "val_loss_stage2", "val_sparsity", "out_dir"} <= set(summary)
    assert summary["val_loss_stage2"] != summary["val_loss_stage1"]
    # the dense reference is the base model, evaluated here (the runs read it from the reference cache)
    base = load(tmp_path / "base")
    dense_loss = common.evaluate(base, training.val_windows(common.load_split(tmp_path / "data", "val", base.tokenizer)))["loss"]
    assert summary["val_loss_dense"] == pytest.approx(dense_loss, abs=1e-6)
    assert (out / "curves.png").exists() and read_config(out)["finished"]
    assert [r["iter"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"] == [0, 1, 2]
    x = tokens(vocab=257)
    torch.testing.assert_close(logits(load(out / "merged"), x),
                               logits(load(out), x), atol=1e-5, rtol=0)
    # the inference tools take a stage-2 run (LoRA merged before their fused matmuls)
    import eval as ev
    import sample
    sample.main(["--model", str(out), "--prompt", "to be", "--max_new_tokens", "3", "--threads", "1"])
    a = ev.parse_args(["--model", str(out), "--data_dir", str(tmp_path / "data")])
    model, _, routing, _ = ev.build(a, out, ev.base_of(out), "cpu", contextlib.nullcontext())
    torch.testing.assert_close(logits(model, x), logits(load(out), x), atol=1e-4, rtol=0)
    with pytest.raises(UserError, match="already holds a stage-2 run"):
        run("--init_from", str(stage1), "--out_dir", str(out))

    dense = run("--init_from", str(stage1), "--out_dir", str(tmp_path / "dense"), "--dense", "true")
    assert {"val_loss_dense", "val_loss_dense_lora", "out_dir"} <= set(dense)
    assert dense["val_loss_dense"] == pytest.approx(dense_loss, abs=1e-6) and dense["val_loss_dense_lora"] != dense["val_loss_dense"]
    assert read_config(tmp_path / "dense")["stage1"] is None
    with pytest.raises(UserError, match="converted model without routers"):
        run("--init_from", str(tmp_path / "base"), "--out_dir", str(tmp_path / "x"))
    with pytest.raises(UserError, match="is a stage-2 run"):
        run("--init_from", str(out), "--out_dir", str(tmp_path / "y"))
    with pytest.raises(UserError, match="matches no linear layer"):
        run("--init_from", str(stage1), "--out_dir", str(tmp_path / "z"), "--lora_targets", "q_proj")


def test_eval_can_change_the_first_token_rule_of_a_run(tmp_path, project):
    # eval.py --protect_first_tokens N: routers skipping everything then skip the first token too
    import eval as ev
    from router import Routing
    stage1, _ = project
    a = ev.parse_args(["--model", str(stage1), "--data_dir", str(tmp_path / "data"), "--protect_first_tokens", "0"])
    model, _, routing, info = ev.build(a, stage1, ev.base_of(stage1), "cpu", contextlib.nullcontext())
    assert info["protect_first_tokens"] == 0
    assert all(layer.router_cfg.protect_first_tokens == 0 for layer in model.layers)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention_router.proj.bias.copy_(torch.tensor([-50.0, 50.0]))
    _, _, g = model(tokens(vocab=257), routing=Routing(mode="hard"))
    assert g[:, 0, :, 0].eq(0).all()
    with pytest.raises(UserError, match="static baseline"):
        ev.parse_args(["--shortgpt", "1", "--protect_first_tokens", "0"])


def test_shortgpt_control_trains_lora_on_the_pruned_model(tmp_path, project):
    # train_stage2.py --shortgpt N: the same LoRA budget on ShortGPT's statically pruned model
    import baselines
    import eval as ev
    stage1, run = project
    out = tmp_path / "short"
    summary = run("--init_from", str(stage1), "--out_dir", str(out), "--shortgpt", "1")
    base = load(tmp_path / "base")
    train = common.load_split(tmp_path / "data", "train", base.tokenizer)
    _, removed, _ = baselines.shortgpt(base, common.calibration_windows(train), 1)
    assert read_config(out)["removed_blocks"] == removed == summary["removed_blocks"]
    # the dense reference is the unpruned model; LoRA moved the pruned model's loss
    val = training.val_windows(common.load_split(tmp_path / "data", "val", base.tokenizer))
    assert summary["val_loss_dense"] == pytest.approx(common.evaluate(base, val)["loss"], abs=1e-6)
    assert summary["val_loss_shortgpt"] == pytest.approx(
        common.evaluate(base.without_blocks(removed), val)["loss"], abs=1e-6)
    assert summary["val_loss_shortgpt_lora"] != summary["val_loss_shortgpt"]
    # loading the run gives the pruned model with its adapters: as many blocks as are left
    model = load(out)
    assert model.args.n_layers == base.args.n_layers - 1 and model.removed_blocks == removed
    assert common.evaluate(model, val)["loss"] == pytest.approx(summary["val_loss_shortgpt_lora"], abs=1e-5)
    a = ev.parse_args(["--model", str(out), "--data_dir", str(tmp_path / "data")])
    _, _, routing, info = ev.build(a, out, ev.base_of(out), "cpu", contextlib.nullcontext())
    assert routing is None and info["kind"] == "shortgpt+lora" and info["removed_blocks"] == removed
    assert info["static_sparsity"]["param_sparsity"] == pytest.approx(1 / base.args.n_layers)
    with pytest.raises(UserError, match="remove fewer"):
        run("--init_from", str(stage1), "--out_dir", str(tmp_path / "all"), "--shortgpt", str(base.args.n_layers))


def test_cli_interrupted_run_resumes_to_the_same_weights(tmp_path, project, monkeypatch):
    stage1, run = project
    run("--init_from", str(stage1), "--out_dir", str(tmp_path / "straight"), "--max_iters", "4")
    calls, stage_loss = [0], train_stage2.Stage.loss

    def interrupt_third_step(*args):
        loss = stage_loss(*args)  # after the step drew its batch and dropout masks
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt  # Ctrl-C during step 2
        return loss

    monkeypatch.setattr(train_stage2.Stage, "loss", interrupt_third_step)
    with pytest.raises(SystemExit):
        run("--init_from", str(stage1), "--out_dir", str(tmp_path / "resumed"), "--max_iters", "4")
    assert read_config(tmp_path / "resumed")["iter"] == 2
    monkeypatch.setattr(train_stage2.Stage, "loss", stage_loss)
    run("--out_dir", str(tmp_path / "resumed"), "--resume", "true", "--max_iters", "4")
    a, b = (load_file(tmp_path / d / "lora.safetensors") for d in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
