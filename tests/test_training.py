"""The settings machinery (common.py) both stages share: every setting declares the values it allows,
and they are checked in one place."""
import dataclasses
import inspect
import re
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


def test_router_docstring_names_real_code_and_the_default_budget():
    refs = re.findall(r"model\.py, (\w+)\.(\w+)", router.__doc__)
    assert refs and all(hasattr(getattr(model, cls, None), name) for cls, name in refs), refs
    assert inspect.signature(router.sparsity_loss).parameters["weighting"].default == "params"
    assert "share of the block parameters" in " ".join(router.__doc__.split())
