"""CUDA checks (bf16 autocast, fast == masked, cached == uncached, a bench pass); skipped without a GPU.

Run on a GPU machine with:  python -m pytest -q tests/test_cuda.py
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fast

from model import ModelArgs, Transformer
from router import RouterConfig, Routing

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = Path(__file__).resolve().parents[1]
ARGS = dict(dim=128, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=16, hidden_dim=256, vocab_size=300, max_seq_len=256)


def routed(kv="keep"):
    torch.manual_seed(0)
    return Transformer(ModelArgs(**ARGS)).cuda().eval().add_routers(RouterConfig(kv=kv, protect_first=0))


@pytest.mark.parametrize("engine", ["reference", "fast"])
@pytest.mark.parametrize("kv", ["keep", "evict"])
def test_fast_equals_masked_on_cuda(kv, engine):
    model = routed(kv)
    if engine == "fast":
        fast.accelerate(model)
    x = torch.randint(0, 300, (3, 64), device="cuda")
    force = (torch.rand(4, 2, 3, 64, device="cuda") > 0.4).float()
    with torch.no_grad():
        a, _, _ = model(x, routing=Routing(mode="force", force=force))
        b, _, _ = model(x, routing=Routing(mode="force", force=force, fast=True))
    assert (a - b).abs().max() < 1e-3
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a, _, _ = model(x, routing=Routing(mode="force", force=force))
        b, _, _ = model(x, routing=Routing(mode="force", force=force, fast=True))
    assert torch.isfinite(a).all() and (a.float() - b.float()).abs().max() < 0.1


def test_cached_equals_uncached_on_cuda():
    model = routed()
    prompt = torch.randint(0, 300, (2, 8), device="cuda")
    for fast in (False, True):
        a = model.generate(prompt, 16, temperature=0, routing=Routing(fast=fast), use_cache=True)
        b = model.generate(prompt, 16, temperature=0, routing=Routing(fast=fast), use_cache=False)
        assert torch.equal(a, b)


def test_bf16_training_step_on_cuda():
    model = routed()
    for n, p in model.named_parameters():
        p.requires_grad_("_router." in n)
    x = torch.randint(0, 300, (2, 32), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        r = Routing(mode="gumbel", tau=2.0)
        _, loss, _ = model(x, x, routing=r)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_bench_pass_on_cuda():
    p = subprocess.run([sys.executable, "bench.py", "--quick", "--device", "cuda", "--plot", ""],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["device"] == "cuda"
