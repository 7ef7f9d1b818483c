"""Tiny on-disk fixtures: a byte-level tokenizer, a random model directory, a small text dataset.

Everything the command-line tools need, built in a second so tests never touch the real assets.
"""
import torch

import assets
from checkpoint import save_model_dir
from model import ModelArgs, Transformer
from tokenizer import GPT2_PATTERN, Tokenizer

TINY = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, vocab_size=260,
            max_seq_len=512, rope_theta=10000.0)


def byte_tokenizer():
    ranks = {bytes([b]): b for b in range(256)}
    return Tokenizer(ranks, {"<|endoftext|>": 256}, GPT2_PATTERN, name="bytes", eos_id=256)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**{**TINY, **overrides}))
    with torch.no_grad():
        model.tok_embeddings.weight.normal_(0, 0.3)  # logits of a sensible size with tied embeddings
    return model


def save_tiny_model(path, seed=0, **overrides):
    model = tiny_model(seed, **overrides)
    state = {k: v for k, v in model.state_dict().items() if not (model.args.tie_embeddings and k == "output.weight")}
    save_model_dir(path, state, model.args, byte_tokenizer(), {"tiny": True})
    return path


def save_tiny_data(path, n_docs=12):
    words = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()
    g = torch.Generator().manual_seed(0)
    docs = {f"doc{i}": " ".join(words[j] for j in torch.randint(len(words), (300,), generator=g).tolist())
            for i in range(n_docs)}
    names = sorted(docs)
    assets.write_dataset(path, byte_tokenizer(), {n: docs[n] for n in names[:-2]}, {n: docs[n] for n in names[-2:]})
    return path
