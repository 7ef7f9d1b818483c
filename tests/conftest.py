import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))



# The quick loop (python -m pytest -q tests -m "not slow", about a minute) leaves out what takes seconds
# per test: the real model, subprocesses (command lines, torchrun), torch.compile, whole studies.
SLOW_FILES = {"test_real_model.py", "test_exercises.py", "test_experiments.py", "test_data.py", "test_general_data.py",
              "test_tokenizer.py"}
SLOW_TESTS = ("compiled", "test_bench_quick_on_a_tiny_model", "test_bench_with_trained_routers", "test_random_routing",
              "torchrun", "test_ddp", "damaged", "bad_flag", "cli", "resume", "test_ctrl_c", "test_joint_run",
              "test_short_run", "test_calibrated_run", "end_to_end", "test_shortgpt_control", "test_stage2_run")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: left out of the quick loop (-m 'not slow'); the full suite runs it")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_FILES or any(word in item.name for word in SLOW_TESTS):
            item.add_marker("slow")
