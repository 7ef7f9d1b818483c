"""The real SmolLM2-135M-Instruct checkpoint (prepared by `python convert.py --default`): known outputs."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import assets
from checkpoint import load
from convert import ensure_default_model
from router import Routing

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smollm2():
    return load(ensure_default_model()).eval()


def greedy(model, prompt, n, routing=None):
    ids = torch.tensor([model.tokenizer.encode(prompt)])
    out = model.generate(ids, n, temperature=0, routing=routing)
    return model.tokenizer.decode(out[0, ids.shape[1]:].tolist())


def test_shape_of_the_converted_model(smollm2):
    a = smollm2.args
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.hidden_dim, a.vocab_size) == \
        (576, 30, 9, 3, 64, 1536, 49152)
    assert a.rope_theta == 100000.0 and a.tie_embeddings
    assert sum(p.numel() for p in smollm2.parameters()) == 134_515_008


def test_known_greedy_continuations(smollm2):
    assert greedy(smollm2, "The capital of France is", 8).startswith(" Paris.\n\nThe answer is:")
    assert greedy(smollm2, "Once upon a time, there was a little", 8).startswith(" girl named Emma who loved to play")


def test_chat_template_answers(smollm2):
    tok = smollm2.tokenizer
    ids = torch.tensor([tok.encode_chat("What is the capital of France?")])
    out = smollm2.generate(ids, 20, temperature=0, stop_ids=tok.stop_ids())
    assert "Paris" in tok.decode(out[0, ids.shape[1]:].tolist())


def test_sample_cli_offline():
    p = subprocess.run([sys.executable, "sample.py", "--prompt", "The capital of France is", "--max_new_tokens", "3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-1000:]
    assert p.stdout.startswith("The capital of France is Paris")
    assert "tokens/s" in p.stderr


def test_shipped_routers_give_their_known_continuations():
    # pretrained/stage1-smollm2-135m holds the learning curve's 1,600-step routers; at its trained offset
    # the routed model (masked and fast paths alike) continues this prompt as below. The default
    # 100-step routers of the corpus before its rebalancing (runs/balance) did not know the answer.
    shipped = load(ROOT / "pretrained" / "stage1-smollm2-135m").eval()
    earlier = load(ROOT / "runs" / "balance" / "routers-earlier-corpus").eval()
    for model, known in ((shipped, " Paris.\n\nThe French are known for their love of"),
                         (earlier, " the capital of the United States.\n\nThe United States")):
        assert model.router_cfg is not None and model.routing_offset != 0
        for fast in (False, True):
            routing = Routing(mode="hard", offset=model.routing_offset, fast=fast)
            assert greedy(model, "The capital of France is", 12, routing) == known


def test_dense_model_answers_every_knowledge_prompt(smollm2):
    """tasks.KNOWLEDGE is the fixed set eval.py scores pruned models on: the dense model answers all."""
    import eval as ev
    import tasks
    share, outs = ev.knowledge(smollm2, smollm2.tokenizer)
    assert len(tasks.KNOWLEDGE) >= 20
    assert share == 1.0, [(p, o) for (p, a), o in zip(tasks.KNOWLEDGE, outs) if not ev.knows(o, a)]
