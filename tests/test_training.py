"""The loop both stages share (training.py) and the settings machinery (common.py): every setting
declares the values it allows and they are checked in one place; the loop knows no stage by name."""
import dataclasses
import inspect
import re
import sys
from dataclasses import dataclass

import pytest

import common
import model
import router
import train_stage1
import train_stage2
import training
from common import parse_settings, setting
from errors import UserError
from router import RouterConfig
from tiny import save_tiny_data, save_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    return save_tiny_model(d / "base"), save_tiny_data(d / "data")


def test_a_setting_declares_its_choices_or_range_and_one_check_enforces_them():
    @dataclass
    class S(training.TrainSettings):
        kind: str = setting("a", "a or b", choices=("a", "b"))
        share: float = setting(0.5, "a share", must_be="in [0, 1)")

    s, given = parse_settings(S, "", ["--kind", "b", "--share", "0"])
    assert (s.kind, s.share, given) == ("b", 0.0, {"kind", "share"})
    with pytest.raises(UserError, match=r"^--kind must be one of a, b, got 'c'$"):
        parse_settings(S, "", ["--kind", "c"])
    with pytest.raises(UserError, match=r"^--share must be in \[0, 1\), got 1\.0$"):
        S(share=1.0)  # built directly, or restored on resume: the same check
    for cls in (train_stage1.Settings, train_stage2.Settings):  # no second place
        assert "__post_init__" not in vars(cls)


def test_help_shows_a_percent_sign_as_written(capsys):
    with pytest.raises(SystemExit):
        parse_settings(train_stage1.Settings, "", ["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "so ~2% skip at start" in out and "option_strings" not in out  # not argparse's %-formatting of it


def test_router_choices_are_declared_once_and_checked_with_the_settings():
    fields = {f.name: f for f in dataclasses.fields(train_stage1.Settings)}
    assert fields["router_kind"].metadata["choices"] == ("linear", "mlp")
    with pytest.raises(UserError, match=r"^--router_kind must be one of linear, mlp, got 'conv'$"):
        train_stage1.Settings(router_kind="conv")
    assert RouterConfig(kind="conv").kind == "conv"  # plain data: no second check of the same choices


def test_common_has_no_linear_beside_the_models_matrix_product():
    assert not hasattr(common, "linear")
    s = train_stage1.Settings(max_iters=5, tau_start=5.0, tau_end=1.0)
    assert [train_stage1.tau_at(i, s) for i in range(5)] == pytest.approx([5.0, 4.0, 3.0, 2.0, 1.0])


def test_build_returns_what_its_docstring_says(tiny):
    base, data = tiny
    s = train_stage1.Settings(init_from=str(base), data_dir=str(data))
    model_, groups, init_dir = train_stage1.Stage().build(s, "cpu", None)
    assert init_dir == str(base) and groups[0]["params"]
    for stage in (train_stage1.Stage, train_stage2.Stage):
        assert "-> (model, param groups, init_dir" in stage.build.__doc__
    assert "build(s, device, resume_cfg) -> (model, param groups, init_dir)" in training.__doc__


def test_the_resume_hint_names_the_script_that_ran(tiny, tmp_path, monkeypatch, capsys):
    base, data = tiny
    monkeypatch.setattr(sys, "argv", ["tools/train_stage1.py"])

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(training, "get_batch", interrupt)
    with pytest.raises(SystemExit):
        train_stage1.main(["--init_from", str(base), "--data_dir", str(data), "--out_dir", str(tmp_path / "run"),
                           "--max_iters", "2", "--threads", "1"])
    assert (f"Continue with: python tools/train_stage1.py --out_dir {tmp_path / 'run'} --resume true"
            in capsys.readouterr().err)


def test_router_docstring_names_real_code_and_the_default_budget():
    refs = re.findall(r"model\.py, (\w+)\.(\w+)", router.__doc__)
    assert refs and all(hasattr(getattr(model, cls, None), name) for cls, name in refs), refs
    assert inspect.signature(router.sparsity_loss).parameters["weighting"].default == "params"
    assert "share of the block parameters" in " ".join(router.__doc__.split())
