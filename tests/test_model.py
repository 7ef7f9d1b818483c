"""The decoder against an independent implementation (transformers' LlamaForCausalLM) and its own invariants."""
import json

import pytest
import torch

from checkpoint import load
from convert import convert_hf
from errors import UserError
from model import ModelArgs, Transformer

transformers = pytest.importorskip("transformers")

# (name, LlamaConfig overrides, write the config in the published Llama 3.x form)
CONFIGS = [
    ("gqa_tied", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True), False),
    ("mha_untied", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False), False),
    ("theta_500k", dict(num_attention_heads=4, num_key_value_heads=1, rope_theta=500000.0), False),
    ("head_dim_24", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24), False),
    ("llama3_scaling", dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}), False),
    ("llama3_published_form", dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                                   rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16}), True),
]


def make_hf_model(tmp_path, overrides, published_form=False, seed=0):
    torch.manual_seed(seed)
    base = dict(hidden_size=64, num_hidden_layers=3, intermediate_size=96, vocab_size=211,
                max_position_embeddings=256, rms_norm_eps=1e-5)
    cfg = transformers.LlamaConfig(**{**base, **overrides})
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norm weights, so a mixed-up norm would show
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path / "hf")
    if published_form:
        # Llama 3.x config.json as published: rope_theta + rope_scaling with "rope_type"
        c = json.loads((tmp_path / "hf" / "config.json").read_text())
        rope = c.pop("rope_parameters")
        c["rope_theta"] = rope.pop("rope_theta")
        c["rope_scaling"] = rope
        (tmp_path / "hf" / "config.json").write_text(json.dumps(c))
    return hf


@pytest.mark.parametrize("name,overrides,published", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_logits_match_transformers(tmp_path, name, overrides, published):
    hf = make_hf_model(tmp_path, overrides, published)
    convert_hf(tmp_path / "hf", tmp_path / "ours")
    model = load(tmp_path / "ours").eval()
    tokens = torch.randint(0, 211, (2, 100))  # > original_max_position_embeddings: long-context scaling matters
    with torch.no_grad():
        ref = hf(tokens).logits
        ours, _, _ = model(tokens)
    assert (ours - ref).abs().max().item() < 1e-4
    if published:
        assert model.args.rope_scaling["factor"] == 32.0


def test_kv_cache_matches_full_forward(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96,
                                  vocab_size=101, max_seq_len=64)).eval()
    tokens = torch.randint(0, 101, (2, 24))
    with torch.no_grad():
        full, _, _ = model(tokens)
        for chunks in ([10, 1, 1, 1, 11], [24], [1] * 24, [5, 7, 12]):
            model.setup_cache(2, 32)
            pos, outs = 0, []
            for n in chunks:
                logits, _, _ = model(tokens[:, pos:pos + n], start_pos=pos)
                outs.append(logits)
                pos += n
            model.clear_cache()
            assert (torch.cat(outs, 1) - full).abs().max().item() < 1e-4, chunks


def test_generate_cached_equals_uncached():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96,
                                  vocab_size=101, max_seq_len=64)).eval()
    prompt = torch.randint(0, 101, (2, 7))
    a = model.generate(prompt, 12, temperature=0, use_cache=True)
    b = model.generate(prompt, 12, temperature=0, use_cache=False)
    assert torch.equal(a, b)


def test_loss_ignores_padding():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=64,
                                  vocab_size=50, max_seq_len=32)).eval()
    x = torch.randint(0, 50, (1, 8))
    y = torch.randint(0, 50, (1, 8))
    y_pad = y.clone()
    y_pad[0, 5:] = -1
    logits, _, _ = model(x)
    _, loss, _ = model(x, y_pad)
    ref = torch.nn.functional.cross_entropy(logits[0, :5], y[0, :5])
    assert torch.allclose(loss, ref, atol=1e-6)


# --- conversion errors: one message naming the problem, nothing written -----------------------

def test_non_llama_config_is_refused(tmp_path):
    make_hf_model(tmp_path, dict(num_attention_heads=4, num_key_value_heads=2))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="not a Llama config"):
        convert_hf(tmp_path / "hf", tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


def _rewrite_weights(tmp_path, edit):
    from safetensors.torch import load_file, save_file
    f = tmp_path / "hf" / "model.safetensors"
    w = load_file(f)
    edit(w)
    save_file(w, f)


def test_missing_tensor_is_named(tmp_path):
    make_hf_model(tmp_path, dict(num_attention_heads=4, num_key_value_heads=2))
    _rewrite_weights(tmp_path, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(UserError, match=r"missing tensor for layers\.1\.feed_forward\.w3\.weight"):
        convert_hf(tmp_path / "hf", tmp_path / "ours")
    assert not (tmp_path / "ours").exists()
    assert not any(p.name.startswith(".ours") for p in tmp_path.iterdir())


def test_wrong_shape_is_named(tmp_path):
    make_hf_model(tmp_path, dict(num_attention_heads=4, num_key_value_heads=2))
    _rewrite_weights(tmp_path, lambda w: w.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.zeros(3, 64)))
    with pytest.raises(UserError, match=r"layers\.0\.attention\.wk\.weight has shape \(3, 64\)"):
        convert_hf(tmp_path / "hf", tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


def test_missing_checkpoint_path():
    with pytest.raises(UserError, match="not found"):
        load("/nonexistent/model")
