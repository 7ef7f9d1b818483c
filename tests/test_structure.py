"""The shape of the code: module imports form no cycle, the model file is the reference (small, no speed
machinery: that is the engine's, fast.py), LoRA knows only nn.Linear, no tool imports a training
script, and every command-line tool answers a bad flag in one line."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = {p.stem: p for p in ROOT.glob("*.py")}
SCRIPTS = {f"data/{p.parent.name}/prepare.py": p for p in ROOT.glob("data/*/prepare.py")}


def project_imports(path):
    """Every project module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(MODULES)


def test_project_imports_form_no_cycle():
    graph = {name: project_imports(path) for name, path in MODULES.items()}
    state = {}

    def visit(name, stack):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", f"import cycle: {' -> '.join(stack + [name])}"
        state[name] = "open"
        for dep in sorted(graph[name]):
            visit(dep, stack + [name])
        state[name] = "done"

    for name in sorted(graph):
        visit(name, [])


def test_the_model_file_is_only_the_model():
    assert project_imports(MODULES["model"]) <= {"router", "errors"}
    assert project_imports(MODULES["router"]) == set()


def test_the_model_file_is_the_reference_and_the_engine_stands_beside_it():
    """model.py reads top to bottom in one sitting: at most 450 lines, none of the engine's machinery
    (compilation, in-graph branches, timing, private torch state); fast.py holds it and builds on
    model.py, which never imports it; lora.py knows only nn.Linear."""
    source = MODULES["model"].read_text()
    assert len(source.splitlines()) <= 450
    for word in ("torch.compile", "torch.cond", "perf_counter", "_version", "_parameters", "_dynamo"):
        assert word not in source, word
    engine = MODULES["fast"].read_text()
    assert all(word in engine for word in ("torch.compile", "torch.cond", "perf_counter", "_version", "_parameters"))
    assert "model" in project_imports(MODULES["fast"])
    assert all("fast" not in project_imports(path) for name, path in MODULES.items()
               if name in ("model", "router", "lora", "train_stage1", "train_stage2", "training", "common"))
    assert project_imports(MODULES["lora"]) <= {"errors"}


def test_no_tool_imports_a_training_script():
    for name in ("eval", "analyze", "bench", "sample", "experiments", "baselines", "checkpoint", "common"):
        assert not project_imports(MODULES[name]) & {"train_stage1", "train_stage2", "training"}, name
    for path in SCRIPTS.values():
        assert not project_imports(path) & {"train_stage1", "train_stage2", "training"}, path


@pytest.mark.parametrize("script", ["convert.py", "train_stage1.py", "train_stage2.py", "sample.py", "bench.py",
                                    "eval.py", "analyze.py", "experiments.py", *sorted(SCRIPTS)])
def test_a_bad_flag_is_one_line(script):
    p = subprocess.run([sys.executable, script, "--no_such_flag", "1"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0, p.stderr
    assert p.stderr.startswith("error:") and "usage:" not in p.stderr


def test_one_place_for_each_piece_of_logic():
    """A module's shallow copy is written once (model.shallow_copy, for pruned models); baselines.py
    measures the blocks through the model's own forward (hooks): no private attribute of the model, no
    sublayer called by hand (a second block forward to keep in step with the first)."""
    sources = {name: path.read_text() for name, path in MODULES.items()}
    assert [name for name, text in sources.items() if "nn.Module.__init__(" in text] == ["model"]
    assert not any(word in sources["baselines"] for word in ("model._", ".attention(", ".feed_forward(", "rope"))
