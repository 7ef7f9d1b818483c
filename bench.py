"""Measure what skipping really saves: tokens/s, FLOPs and bytes, dense vs routed vs statically pruned.

    python bench.py                                  # default model, random routing at 0 / 25 / 40 / 50% sparsity
    python bench.py --routers out/stage1             # trained routers, offsets calibrated to each sparsity
    python bench.py --threads 1 --repeats 7          # thread count and repetitions are reported
    python bench.py --quick                          # a fast smoke run (small shapes, 2 repeats)

Variants, timed interleaved (each repetition runs every variant once, in rotating order, so drifts of
this shared machine hit all alike; the median is reported; prefill 128 repeats 4x as often, so that
every prefill median spans as many tokens as prefill 512's):
    dense    the plain model, on the inference engine (fast.py)
    masked   routing the way training does it: every sublayer runs, skipped outputs are x 0 (saves nothing)
    fast     only executing rows run each sublayer, on the engine (fast.py): the real saving
    ref-dense, ref-fast  model.py as written, dense and with its simple skipping path (gather the
             executing rows, run the sublayer on them, add the result back) at the masked row's
             sparsity: what skipping saves without any engineering, beside what the engine adds
             (--engine reference runs every row on model.py instead, and drops these two)
    shortgpt the same parameter sparsity by removing whole blocks (baselines.py): the static reference
    transformers  LlamaForCausalLM on the same weights (where installed): what one would use instead
    floor    batch-1 decode only: one pass of one-row products over all the weights, as the model
             multiplies (fast.linear: per matrix, the faster of F.linear and split_linear as timed on
             this machine, fast.choose_products), and with F.linear only (floor_flinear): the least
             any decoder that multiplies that way spends per token
Regimes: prefill of 128 and 512 tokens; decode of batch 1 after 128 and 512 tokens of context (32
tokens per measurement); decode of batch 8 after 128 (16 steps of 8 tokens per measurement).
"sparsity" is the share of block parameters skipped per token.
Ideal speedups: prefill is FLOP-bound, so ideal = dense FLOPs / variant FLOPs; decode is bound by
reading weights, so ideal = dense weight bytes / variant weight bytes per step (a module's weights
are read if any sequence of the batch executes it). efficiency = the share of the ideal time
saving achieved, (t_dense - t) / (t_dense - t_dense / ideal) = (1 - 1 / speedup) / (1 - 1 / ideal).
A speedup is the median of the repetitions' dense time / variant time (each pair from one repetition);
tokens/s, the median of each variant's own times.
Each speedup comes with a 95% confidence interval for that median, distribution-free (it assumes only
that the repetitions' ratios are independent draws of one distribution): the order statistics
[r(j), r(n+1-j)] of the n sorted ratios, with j the largest for which a Binomial(n, 1/2) count puts
the median between them with probability >= 95% (median_interval). That needs n >= 6: with fewer
repetitions (the default 5 for prefill 512 and decoding) the interval is the whole range of the
ratios, and its confidence only 1 - 2^(1-n) (5: 94%, 3: 75%, 2: 50%); the table says so under each
such regime, and the JSON gives each row's speedup_lo, speedup_hi and speedup_conf (the interval's
actual confidence). efficiency rises with the speedup, so its interval (efficiency_lo, efficiency_hi)
is the formula at the speedup's endpoints.
Random routing (no --routers) protects what trained routers protect (RouterConfig's defaults): the
first protect_first blocks and the first protect_first_tokens tokens of every sequence always execute;
every other (block, sublayer, token) skips independently, with the probability that skips the named
share of block parameters over the timed positions (random_routing).
The last stdout line is one JSON object.
"""
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

import fast
from baselines import blocks_for_param_sparsity
from checkpoint import load, read_config
from common import ensure_data, load_split, parse_bool, sync, val_windows
from convert import ensure_default_model
from errors import ArgumentParser, UserError, cli
from fast import ENGINES, FASTER_SPLIT, linear
from lora import merge_lora
from router import RouterConfig, Routing, block_params, calibrate_offset, module_params, routing_stats


# torch counts no FLOPs for the CPU attention kernel; count 2 matmuls of (Tq x S x head_dim) per head
@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    b, h, tq, d = query_shape
    return 2 * 2 * b * h * tq * key_shape[-2] * d


def analytic_flops(args, exec_attn, exec_mlp, n_queries, n_keys, routers=True, kv_mode="keep", packed_keys=False,
                   protected=0):
    """Forward FLOPs per token given the executed fractions (per layer lists) of attention and MLP.

    K/V projections run for every token under "keep", for executing tokens only under "evict"; wq,
    scores and wo for executing queries; scores counted as the kernel computes them (n_queries x
    n_keys per sequence, masked entries included). packed_keys: evict without a KV cache (prefill),
    where the keys are the executing tokens only, so a block's scores shrink with its execution rate twice.
    routers: whether the blocks from `protected` on run their two routers (the first protect_first
    blocks always execute and run none).
    """
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    per_token = 2 * args.dim * args.vocab_size                                 # the head
    for i, (fa, fm) in enumerate(zip(exec_attn, exec_mlp)):
        per_token += (1 if kv_mode == "keep" else fa) * 2 * 2 * args.dim * kv   # wk, wv
        keys = n_keys * (fa if packed_keys else 1)
        per_token += fa * (2 * 2 * args.dim * q + 2 * 2 * q * keys)             # wq + wo, QK^T + AV
        per_token += fm * 2 * 3 * args.dim * args.hidden_dim
        if routers and i >= protected:
            per_token += 2 * 2 * args.dim * 2
    return per_token


def weight_bytes(args, attn_read, mlp_read, bytes_per_param, routers=True, kv_mode="keep", protected=0):
    """Weight bytes read per decode step; attn_read/mlp_read: per layer, whether any row executes it;
    routers: read in the blocks from `protected` on (as analytic_flops)."""
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    total = args.dim * args.vocab_size + args.dim                              # head (tied embedding) + final norm
    for i, (a, m) in enumerate(zip(attn_read, mlp_read)):
        kv_read = 1 if kv_mode == "keep" else a                                 # evict: no K/V for a skipping token
        total += 2 * args.dim + kv_read * 2 * args.dim * kv + a * 2 * args.dim * q + m * 3 * args.dim * args.hidden_dim
        if routers and i >= protected:
            total += 2 * (2 * args.dim + 2)
    return total * bytes_per_param


def random_decisions(args, skip_prob, batch, length, generator):
    """(L, 2, B, T) 0/1: each (layer, module, token) executes with probability 1 - skip_prob."""
    return (torch.rand(args.n_layers, 2, batch, length, generator=generator) >= skip_prob).float()


def skip_prob_for(args, param_sparsity, kv="keep", protected_blocks=0, protected_share=0.0):
    """Skip probability (same for attention and MLP) that skips param_sparsity of block parameters,
    when the first protected_blocks blocks and protected_share of the tokens never skip (the others
    skip more to make up for them)."""
    wa, wm = module_params(args, kv)
    routable = ((wa + wm) / block_params(args) * (args.n_layers - protected_blocks) / args.n_layers
                * (1 - protected_share))  # the largest reachable sparsity
    if param_sparsity > routable:
        raise UserError(f"sparsity {param_sparsity} is out of reach with K/V {kv}, {protected_blocks} blocks and "
                        f"{protected_share:.1%} of the tokens protected (max {routable:.3f})")
    return param_sparsity / routable if param_sparsity > 0 else 0.0


def random_routing(args, cfg, param_sparsity, batch, length, generator, timed_from=0):
    """Random decisions (L, 2, B, length) that skip param_sparsity of block parameters over positions
    timed_from.. length-1 (a decode measurement times only the tokens after its context) and, like
    trained routers, never skip the first cfg.protect_first blocks or the first cfg.protect_first_tokens
    tokens of a sequence. Decisions given (Routing mode "force") are run as given, protected positions
    included (model.py _protect_tokens), so the protection is written into them here: skipping the
    first token would time work that real routing never does (every later token attends to it), and
    the sparsity measured from these decisions is the one the forward passes run."""
    first = min(cfg.protect_first_tokens, length)
    share = max(0, first - timed_from) / max(1, length - timed_from)  # protected among the timed positions
    p = skip_prob_for(args, param_sparsity, cfg.kv, min(cfg.protect_first, args.n_layers), share)
    decisions = random_decisions(args, p, batch, length, generator)
    decisions[:cfg.protect_first] = 1
    decisions[..., :first] = 1
    return decisions


@torch.no_grad()
def run_prefill(model, tokens, routing_fn):
    model(tokens, routing=routing_fn())


@torch.no_grad()
def prefill_context(model, context, steps, routing_fn, cache_len=None):
    """Prefill the context once, untimed -> (the layers' KV caches, sized for `steps` more tokens or
    cache_len, the first token to decode, the context length C). Every repetition of a decode
    measurement starts from them: a repetition writes the same cache slots (C .. C+steps-1) and
    reads only what it wrote or the context, so reusing the prefill changes no result, and saves
    re-running it each time. (bench sizes every batch-1 cache alike, cache_len: the compiled decoding
    graphs, specialized to the cache's shape, then serve every context length without recompiling.)"""
    B, C = context.shape
    model.setup_cache(B, max(C + steps, cache_len or 0))
    try:
        logits, _, _ = model(context, routing=routing_fn())
        return [layer.attention.cache for layer in model.layers], logits[:, -1:].argmax(-1), C
    finally:
        model.clear_cache()


@torch.no_grad()
def run_decode(model, prefilled, steps, routing_fn, device):
    """`steps` one-token forwards after a prefilled context (prefill_context) -> seconds."""
    caches, nxt, C = prefilled
    for layer, cache in zip(model.layers, caches):
        layer.attention.cache = cache
    try:
        sync(device)
        t0 = time.perf_counter()
        for i in range(steps):
            logits, _, _ = model(nxt, routing=routing_fn(), start_pos=C + i)
            nxt = logits[:, -1:].argmax(-1)
        sync(device)
        return time.perf_counter() - t0
    finally:
        model.clear_cache()


@torch.no_grad()
def prefill_speedups(models, tokens, repeats=5, threads=2):
    """Prefill time of whole models, each with its own routing, timed interleaved (each repetition
    runs every model once, in rotating order) -> {name: (tokens/s, speedup vs the first model)}.

    models: {name: (model, routing factory or None)}, the reference first; tokens (B, T).
    experiments.py uses it for the measured speedup of every trained model it evaluates.
    """
    torch.set_num_threads(threads)
    names = list(models)
    times = {n: [] for n in names}
    for rep in range(repeats + 1):  # repetition 0 warms up
        for n in names[rep % len(names):] + names[:rep % len(names)]:
            model, factory = models[n]
            t0 = time.perf_counter()
            run_prefill(model, tokens, factory or (lambda: None))
            if rep:
                times[n].append(time.perf_counter() - t0)
    return {n: (tokens.numel() / statistics.median(times[n]), paired_ratio(times[names[0]], times[n])) for n in names}


DEFAULT_SPARSITIES = "0,0.25,0.4,0.5"
COST_STEPS = 8  # decode steps under the FLOP counter (the counter is slow; FLOPs per token vary little)


def parse(argv=None):
    p = ArgumentParser(__doc__)
    p.add_argument("--model", default=None, help="converted model (default: the bundled SmolLM2-135M)")
    p.add_argument("--routers", default=None, help="stage-1/2 run: trained routers instead of random decisions")
    p.add_argument("--sparsities", default=None,
                   help=f"parameter sparsities to measure (default: {DEFAULT_SPARSITIES} with random routing; "
                        f"with --routers, the routers' own offset on held-out text)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per variant (median reported)")
    p.add_argument("--decode_steps", type=int, default=32, help="decoded tokens per batch-1 decode measurement")
    p.add_argument("--batched_decode_steps", type=int, default=16,
                   help="decoded steps per measurement with several sequences (each step decodes one token of "
                        "every sequence: 16 steps x 8 sequences are 128 tokens)")
    p.add_argument("--regimes", default="prefill128,prefill512,decode128,decode512,decode128x8",
                   help="comma list of prefillT, decodeC (batch 1) and decodeCxB")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16")
    p.add_argument("--quick", action="store_true", help="small shapes and 2 repeats: a smoke test")
    p.add_argument("--plot", default="out/bench.png", help="PNG of measured vs ideal speedup")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=ENGINES, default="fast",
                   help="fast: every row on the inference engine (fast.py), with model.py's reference rows beside "
                        "(default) | reference: every row on model.py as written")
    p.add_argument("--compile", default="auto", choices=["auto", "true", "false"],
                   help="torch.compile the block steps of one-token forwards (decode regimes; fast.py's "
                        "compile_decoding): auto = where torch.compile works here (default)")
    p.add_argument("--transformers", type=parse_bool, default=True, metavar="BOOL",
                   help="also time transformers' LlamaForCausalLM on the same weights, where it is installed (default: true)")
    a = p.parse_args(argv)
    if a.engine == "reference" and a.compile == "true":
        raise UserError("--compile true needs the engine: model.py runs as written (--engine fast)")
    if a.quick:
        a.repeats, a.decode_steps, a.batched_decode_steps, a.regimes = 2, 4, 4, "prefill64,decode64,decode32x4"
    if a.repeats < 1:
        raise UserError("--repeats must be >= 1")
    if a.decode_steps < 1 or a.batched_decode_steps < 1:
        raise UserError("--decode_steps and --batched_decode_steps must be >= 1")
    return a


def paired_ratio(times_a, times_b):
    """Median over the repetitions of time a / time b, each pair from the same repetition (run within
    seconds of each other): a drift of this shared machine between repetitions cancels in each pair."""
    return statistics.median(a / b for a, b in zip(times_a, times_b))


CONFIDENCE = 0.95


def median_interval(values, level=CONFIDENCE):
    """Distribution-free confidence interval for the median of the distribution `values` are drawn
    from (independently) -> (lo, hi, confidence).

    The median lies below exactly k of n draws with the probability of k under Binomial(n, 1/2), so
    it lies between the j-th smallest and the j-th largest value with probability
    1 - 2 P(Binomial(n, 1/2) <= j - 1), whatever the distribution. j is the largest for which that
    reaches `level`; confidence is that probability (>= level, conservative: the binomial is discrete).
    Where even the whole range does not reach `level` (n < 6 for 95%) the interval is the whole range
    and confidence its own, 1 - 2^(1-n), below `level`: few repetitions cannot give more."""
    x = sorted(values)
    n = len(x)
    if n == 0:
        raise ValueError("no values")
    coverage = lambda j: 1 - 2 * sum(math.comb(n, i) for i in range(j)) / 2 ** n  # noqa: E731
    j = 1
    while j < (n + 1) // 2 and coverage(j + 1) >= level:
        j += 1
    return x[j - 1], x[n - j], coverage(j)


def paired_speedup(times_ref, times):
    """The speedup of `times` over times_ref: the median of the repetitions' paired ratios (paired_ratio)
    and median_interval of those ratios -> (speedup, lo, hi, confidence)."""
    ratios = [a / b for a, b in zip(times_ref, times)]
    return (statistics.median(ratios), *median_interval(ratios))


def efficiency(speedup, ideal):
    """The share of the ideal time saving achieved; NaN where the ideal saves nothing."""
    return (1 - 1 / speedup) / (1 - 1 / ideal) if ideal > 1.0001 else float("nan")


def decode_steps(reg, a):
    """Decoded steps per measurement of a regime: 0 for prefill."""
    if reg["kind"] != "decode":
        return 0
    return a.decode_steps if reg["batch"] == 1 else a.batched_decode_steps


PREFILL_TOKENS_PER_MEDIAN = 512  # prefill: a short regime repeats more (one forward of 128 tokens is ~0.3 s here)


def repeats_for(reg, a):
    """Timed repetitions of a regime: --repeats, and for a short prefill as many more as make every
    variant's median span PREFILL_TOKENS_PER_MEDIAN tokens per repeat asked (prefill 128: 4x), so its
    figures are no noisier than prefill 512's."""
    if reg["kind"] != "prefill":
        return a.repeats
    return a.repeats * max(1, PREFILL_TOKENS_PER_MEDIAN // (reg["batch"] * reg["length"]))


def parse_regime(name):
    if name.startswith("prefill"):
        return {"name": name, "kind": "prefill", "length": int(name[7:]), "batch": 1}
    if name.startswith("decode"):
        ctx, _, batch = name[6:].partition("x")
        return {"name": name, "kind": "decode", "length": int(ctx), "batch": int(batch or 1)}
    raise UserError(f"unknown regime {name!r}: use prefillT, decodeC or decodeCxB")


def transformers_twin(model):
    """transformers' LlamaForCausalLM holding this model's weights, or None where transformers is
    not installed: what a user would run instead, timed in the same interleaved run."""
    try:
        import transformers
    except ImportError:
        return None
    from convert import HF_NAMES
    a = model.args
    rope = ({"rope_type": "llama3", **a.rope_scaling} if a.rope_scaling else {"rope_type": "default"})
    cfg = transformers.LlamaConfig(
        hidden_size=a.dim, num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
        head_dim=a.head_dim, intermediate_size=a.hidden_dim, vocab_size=a.vocab_size, rms_norm_eps=a.norm_eps,
        max_position_embeddings=a.max_seq_len, tie_word_embeddings=a.tie_embeddings,
        rope_parameters={"rope_theta": a.rope_theta, **rope})
    to_hf = {}
    for hf_name, name in HF_NAMES.items():
        for i in (range(a.n_layers) if "{}" in name else [None]):
            to_hf[name.format(i)] = hf_name.format(i)
    state = {to_hf[k]: v for k, v in model.state_dict().items() if k in to_hf}
    hf = transformers.LlamaForCausalLM(cfg).to(model.tok_embeddings.weight.dtype)
    result = hf.load_state_dict(state, strict=False)
    if a.tie_embeddings:
        hf.tie_weights()
    missing = [k for k in result.missing_keys if not (a.tie_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise UserError(f"transformers' model does not take these weights (missing {missing[:3]}, "
                        f"unexpected {result.unexpected_keys[:3]})")
    return hf.to(model.tok_embeddings.weight.device).eval()


@torch.no_grad()
def run_hf_prefill(hf, tokens):
    hf(tokens, use_cache=False)


@torch.no_grad()
def prefill_hf_context(hf, context):
    """transformers' prefill, once, untimed -> (its cache, the first token to decode)."""
    out = hf(context, use_cache=True)
    return out.cache, out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def run_hf_decode(hf, prefilled, context_len, steps, device):
    """transformers' own generation loop by hand: `steps` cached one-token steps after the context
    (its cache cut back to the context first, as each repetition appends to it)."""
    cache, nxt = prefilled
    appended = cache.get_seq_length() - context_len
    if appended:
        cache.crop(-appended)  # a negative count removes that many tokens (in every transformers version)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = hf(nxt, cache=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
    sync(device)
    return time.perf_counter() - t0


def decode_weights(model):
    """The matrices a dense decoding step multiplies by, as the dense path holds them (fused where it
    fuses), and the head: one pass of one-row products over them is the floor of a decoder that
    multiplies as this one does (fast.linear); with F.linear, that of a plain-PyTorch one."""
    mats = []
    for layer in model.layers:
        att, ffn = layer.attention, layer.feed_forward
        fused = getattr(att, "fused", None)  # (the engine's; model.py's layers run one by one)
        mats += [fused[att.router_rows:]] if fused is not None else [att.wq.weight, att.wk.weight, att.wv.weight]
        mats += [att.wo.weight]
        mats += [ffn.fused] if getattr(ffn, "fused", None) is not None else [ffn.w1.weight, ffn.w3.weight]
        mats += [ffn.w2.weight]
    return mats + [model.output.weight]


@torch.no_grad()
def run_floor(mats, steps, device, product=linear):
    """`steps` passes of one-row products over `mats`: the time a decoder must spend reading its weights."""
    rows = {m.shape[1]: torch.randn(1, m.shape[1], dtype=m.dtype, device=m.device) for m in mats}
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        for m in mats:
            product(rows[m.shape[1]], m)
    sync(device)
    return time.perf_counter() - t0


def held_out_text(run_dir, model, n, length):
    """n windows of `length` tokens of the held-out text of the data the routers were trained on."""
    settings = read_config(run_dir).get("settings", {})
    data_dir = ensure_data(settings.get("data_dir", "data/general"), model.tokenizer)
    return val_windows(load_split(data_dir, "val", model.tokenizer), n=n, block=length)[:, :length]


def main(argv=None):
    started = time.perf_counter()
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}.get(a.dtype)
    if dtype is None:
        raise UserError(f"--dtype must be auto, float32 or bfloat16, got {a.dtype!r}")
    regimes = [parse_regime(r) for r in a.regimes.split(",")]
    model = load(a.routers or a.model or ensure_default_model(), device=device)
    model = model.to(dtype).eval()
    args = model.args
    trained = model.router_cfg is not None
    if not trained:  # random decisions need routers to exist (they cost what trained ones cost)
        # with trained routers' defaults, protect_first included: the protected blocks then run as they
        # do under real routing, as plain blocks without routers (batch-1 decoding runs them as one
        # compiled group), where protect_first 0 charged them routing overheads real routing never
        # pays there; the other blocks skip more, so each row still skips its named share (random_routing)
        model.add_routers(RouterConfig())
        model.to(dtype)
    merge_lora(model)  # inference: LoRA folded in
    reference = copy.deepcopy(model) if a.engine == "fast" else None  # model.py as written, timed beside the engine
    model = fast.engine(model, a.engine)  # wq|wk|wv, w1|w3 and the routers one matmul each
    compiled = a.engine == "fast" and a.compile != "false" and model.compile_decoding()
    if a.compile == "true" and not compiled:
        raise UserError("torch.compile does not run here (see above); run with --compile false")
    kv = model.router_cfg.kv
    split = [k for k, faster in FASTER_SPLIT.items() if faster and k[3]]
    products = (f"one-row products: split_linear for {len(split)} of {sum(k[3] for k in FASTER_SPLIT)} matrix shapes"
                if device == "cpu" else "products: F.linear")
    bpp = torch.finfo(dtype).bits // 8
    gen = torch.Generator().manual_seed(a.seed)
    hf = transformers_twin(model) if a.transformers else None
    floor_mats = decode_weights(model)
    # trained routers: held-out text at their own offset (or offsets calibrated on that text); random: ids
    longest = max(r["length"] + decode_steps(r, a) for r in regimes)
    run_dir = a.routers or a.model
    text = held_out_text(run_dir, model, max(r["batch"] for r in regimes), longest).to(device) if trained else None
    if trained and a.sparsities is None:
        offsets = {"own": model.routing_offset}
    else:
        sparsities = [float(s) for s in (a.sparsities or DEFAULT_SPARSITIES).split(",")]
        offsets = calibrate_offsets(model, sparsities, text[:2, :256]) if trained else {s: None for s in sparsities}

    print(f"bench: {model.source.get('path')} | "
          f"{'trained routers ' + str(run_dir) + ' on held-out text' if trained else 'random routing on random ids'} | "
          f"{device} {str(dtype).replace('torch.', '')} | {torch.get_num_threads()} threads | "
          f"engine {a.engine} | decoding {'compiled' if compiled else 'eager'} | {products} | "
          f"{a.repeats} repeats (short prefills more), median{' | transformers ' + sys.modules['transformers'].__version__ if hf else ''}",
          file=sys.stderr)

    results, checks = [], {}
    check_intervals = {}  # check -> [lo, hi, confidence] of the ratios that are speedups (median_interval)
    # decode caches: one length per batch size, the longest its regimes need (see prefill_context)
    # (one slot to spare: at the last slot the keys read are the whole cache, a contiguous view, which
    # torch.compile specializes on: every compiled graph would compile again for the last step)
    cache_len = {}
    for r in regimes:
        if r["kind"] == "decode":
            cache_len[r["batch"]] = max(cache_len.get(r["batch"], 0), r["length"] + decode_steps(r, a) + 1)
    for reg in regimes:
        regime_start = time.perf_counter()
        B, T = reg["batch"], reg["length"]
        steps = decode_steps(reg, a)
        tokens = (text[:B, :T] if trained else torch.randint(0, args.vocab_size, (B, T), generator=gen)).to(device)
        # variants: name -> (what runs, routing factory, sparsity); what runs: our model, "hf" or "floor"
        variants = {"dense": (model, lambda: None, 0.0)}
        for s, off in offsets.items():
            if trained:
                mk = lambda fast, o=off: (lambda: Routing(mode="hard", offset=o, fast=fast))
            else:
                dec = random_routing(args, model.router_cfg, s, B, T + steps, gen,
                                     timed_from=T if reg["kind"] == "decode" else 0).to(device)
                mk = lambda fast, d=dec: (lambda: Routing(mode="force", force=d, fast=fast))
            variants[f"fast@{s}"] = (model, mk(True), s)
            if s == list(offsets)[min(1, len(offsets) - 1)]:  # masked once: it saves nothing at any sparsity
                variants[f"masked@{s}"] = (model, mk(False), s)
                if reference is not None:  # model.py as written: dense, and its simple skipping path
                    variants["ref-dense"] = (reference, lambda: None, 0.0)
                    variants[f"ref-fast@{s}"] = (reference, mk(True), s)
                if reg["kind"] == "prefill":  # the same decisions on both paths give the same logits
                    with torch.no_grad():
                        diff = (model(tokens, routing=mk(True)())[0].float() - model(tokens, routing=mk(False)())[0].float())
                    checks[f"{reg['name']} fast vs masked max |logit diff|"] = diff.abs().max().item()
            if not trained:
                n = blocks_for_param_sparsity(args.n_layers, s)
                if n > 0:  # ShortGPT at the nearest block count (which blocks does not change the speed)
                    drop = list(range(args.n_layers // 2 - n // 2, args.n_layers // 2 - n // 2 + n))
                    variants[f"shortgpt@{s}"] = (model.without_blocks(drop), lambda: None, n / args.n_layers)
        if hf is not None:
            variants["transformers"] = ("hf", None, 0.0)
        if reg["kind"] == "decode" and B == 1:
            variants["floor"] = ("floor", None, 0.0)                  # one-row products as the model's (linear)
            variants["floor_flinear"] = ("floor_flinear", None, 0.0)  # as plain PyTorch's F.linear

        times = {name: [] for name in variants}
        names = list(variants)
        prefilled = {}  # decode: each variant's context, prefilled once (its own routing writes its own cache)
        if reg["kind"] == "decode":
            for name, (m, routing_fn, _) in variants.items():
                if m == "hf":
                    prefilled[name] = prefill_hf_context(hf, tokens)
                elif not isinstance(m, str):
                    prefilled[name] = prefill_context(m, tokens, steps, routing_fn, cache_len.get(B))
        timing_start = time.perf_counter()
        for rep in range(repeats_for(reg, a) + 1):  # repetition 0 warms up
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                m, routing_fn, _ = variants[name]
                if m in ("floor", "floor_flinear"):
                    dt = run_floor(floor_mats, steps, device, linear if m == "floor" else F.linear)
                elif reg["kind"] == "prefill":
                    sync(device)
                    t0 = time.perf_counter()
                    run_hf_prefill(hf, tokens) if m == "hf" else run_prefill(m, tokens, routing_fn)
                    sync(device)
                    dt = time.perf_counter() - t0
                else:
                    dt = (run_hf_decode(hf, prefilled[name], T, steps, device) if m == "hf"
                          else run_decode(m, prefilled[name], steps, routing_fn, device))
                if rep > 0:
                    times[name].append(dt)
            if rep == 0:
                warmed_up = time.perf_counter()
        warm_up, timed = warmed_up - timing_start, time.perf_counter() - warmed_up
        n_tok = B * T if reg["kind"] == "prefill" else B * steps
        for name, (m, routing_fn, s) in variants.items():
            speedup, lo, hi, conf = paired_speedup(times["dense"], times[name])
            row = {"variant": name.split("@")[0], "regime": reg["name"], "sparsity": s,
                   "tokens_per_s": n_tok / statistics.median(times[name]), "speedup": speedup,
                   "speedup_lo": lo, "speedup_hi": hi, "speedup_conf": conf, "repetitions": len(times[name])}
            if isinstance(m, str):  # transformers, or the floor: no FLOP accounting of ours
                row |= {"ideal_speedup": float("nan"), "efficiency": float("nan"), "efficiency_lo": float("nan"),
                        "efficiency_hi": float("nan")}
            else:
                row |= measure_costs(reg, name, m, routing_fn, tokens, min(steps, COST_STEPS), device, bpp, kv, model,
                                     prefilled.get(name))
                if s == "own":  # what the routers skip on this text, measured from each row's own gates
                    row["sparsity"] = 1 - row["gated_param_fraction"]
                ideal = row["ideal_speedup"]  # (efficiency rises with the speedup: its interval is the endpoints')
                row |= {"efficiency": efficiency(speedup, ideal), "efficiency_lo": efficiency(lo, ideal),
                        "efficiency_hi": efficiency(hi, ideal)}
            results.append(row)
        if "floor" in variants:
            for check, (ref, other) in ((f"{reg['name']} dense / floor", ("dense", "floor")),
                                        (f"{reg['name']} F.linear floor / floor", ("floor_flinear", "floor"))):
                ratio, lo, hi, conf = paired_speedup(times[ref], times[other])
                checks[check], check_intervals[check] = ratio, [lo, hi, conf]
        print_table([r for r in results if r["regime"] == reg["name"]])
        print(f"{reg['name']}: {time.perf_counter() - regime_start:.0f} s (warm-up {warm_up:.0f} s, timed repeats "
              f"{timed:.0f} s)", file=sys.stderr)

    for name, value in checks.items():
        lo, hi, conf = check_intervals.get(name, (None, None, None))
        print(f"{name}: {value:.4g}" + (f" [{lo:.4g}, {hi:.4g}] ({conf:.0%} interval)" if lo is not None else ""),
              file=sys.stderr)
    if a.plot:
        plot(results, a.plot)
        print(f"figure: {a.plot}", file=sys.stderr)
    summary = {"results": results, "checks": checks, "check_intervals": check_intervals, "device": device,
               "dtype": str(dtype).replace("torch.", ""),
               "compiled_decoding": compiled, "one_row_products_split": len(split),
               "threads": torch.get_num_threads(), "repeats": a.repeats, "routers": a.routers,
               "model": model.source.get("path"), "seconds": round(time.perf_counter() - started, 1)}
    for r in results:  # JSON has no NaN: an undefined efficiency (no ideal saving) becomes null
        r.update({k: None for k, v in r.items() if isinstance(v, float) and math.isnan(v)})
    print(f"bench: {summary['seconds']:.0f} s in all", file=sys.stderr)
    print(json.dumps(summary))


@torch.no_grad()
def measure_costs(reg, name, m, routing_fn, tokens, steps, device, bpp, kv, dense_model, prefilled=None):
    """FLOPs (counted and analytic), executed parameters, weight bytes and KV bytes for one variant.
    Decode: `steps` steps after the context, from `prefilled` (prefill_context) where given."""
    B, T = tokens.shape
    counter = FlopCounterMode(display=False)
    gates = []  # per step: (L, 2, rows, 1) decisions; a module's weights are read if any row executes it
    if reg["kind"] == "prefill":  # one step: all B x T tokens
        with counter:
            _, _, g = m(tokens, routing=routing_fn())
        if g is not None:
            gates.append(g.float().flatten(2)[..., None])
        n_tok, n_q, n_k = B * T, T, T
    else:  # every decode step after the context, averaged (the decisions differ from step to step)
        caches, nxt, _ = prefilled or prefill_context(m, tokens, steps, routing_fn)
        for layer, cache in zip(m.layers, caches):
            layer.attention.cache = cache
        try:  # (eager: a FLOP counter sees the compiled graphs' torch.cond branches both; eager runs only one)
            with counter, torch.compiler.set_stance("force_eager"):
                for i in range(steps):
                    logits, _, g = m(nxt, routing=routing_fn(), start_pos=T + i)
                    nxt = logits[:, -1:].argmax(-1)
                    if g is not None:
                        gates.append(g.float())                                 # (L, 2, B, 1)
        finally:
            m.clear_cache()
        n_tok, n_q, n_k = B * steps, 1, T + (steps + 1) / 2
    L = m.args.n_layers
    if gates:
        g = torch.cat(gates, dim=3)                                             # (L, 2, rows, steps)
        executed, reads = g.mean((2, 3)), g.amax(dim=2).mean(-1)                # (L, 2) each
        exec_attn, exec_mlp = executed[:, 0].tolist(), executed[:, 1].tolist()
        read_attn, read_mlp = reads[:, 0].tolist(), reads[:, 1].tolist()
    else:
        exec_attn = exec_mlp = read_attn = read_mlp = [1.0] * L
    cfg = getattr(m, "router_cfg", None)
    protected = min(cfg.protect_first, L) if cfg is not None else 0
    return _costs(reg, name.split("@")[0], m.args, exec_attn, exec_mlp, read_attn, read_mlp, n_q, n_k, counter,
                  n_tok, T, steps, B, bpp, kv, device, dense_model, protected, isinstance(m, fast.FastTransformer))


def _costs(reg, variant, args, exec_attn, exec_mlp, read_attn, read_mlp, n_q, n_k, counter, n_tok, T, steps, B,
           bpp, kv, device, dense_model, protected=0, engine=True):
    """protected: the first blocks, which always execute and run no routers; engine: the model runs on
    fast.py (which packs an evicting prefill's keys; model.py attends to every position, masked)."""
    L = args.n_layers
    routed = variant in ("fast", "masked", "ref-fast")
    counts_as_run = variant in ("fast", "ref-fast")  # masked runs everything whatever the gates say
    fa, fm = (exec_attn, exec_mlp) if counts_as_run else ([1.0] * L, [1.0] * L)
    ra, rm = (read_attn, read_mlp) if counts_as_run else ([1.0] * L, [1.0] * L)
    evict = kv == "evict" and counts_as_run
    flops = analytic_flops(args, fa, fm, n_q, n_k, routers=routed, kv_mode="evict" if evict else "keep",
                           packed_keys=evict and reg["kind"] == "prefill" and engine, protected=protected)
    dense_flops = analytic_flops(dense_model.args, [1.0] * dense_model.args.n_layers,
                                 [1.0] * dense_model.args.n_layers, n_q, n_k, routers=False)
    wbytes = weight_bytes(args, ra, rm, bpp, routers=routed, kv_mode="evict" if evict else "keep", protected=protected)
    dense_wbytes = weight_bytes(dense_model.args, [1.0] * dense_model.args.n_layers,
                                [1.0] * dense_model.args.n_layers, bpp, routers=False)
    wa, wm = module_params(args, kv)
    dense_params = block_params(dense_model.args) * dense_model.args.n_layers

    def param_fraction(attn, mlp):  # block parameters run at these per-layer execution rates, / dense's
        return (sum(wa * a + wm * b for a, b in zip(attn, mlp)) + (block_params(args) - wa - wm) * L) / dense_params
    # batch-1 decoding reads every weight for one token: bound by weight bytes; prefill and batched
    # decoding do enough arithmetic per weight to be bound by FLOPs
    decode_one = reg["kind"] == "decode" and B == 1
    kv_bytes = 2 * L * args.n_kv_heads * args.head_dim * (T + steps) * B * bpp
    return {"flops_per_token": flops, "flops_counted_per_token": counter.get_total_flops() / n_tok,
            "executed_param_fraction": param_fraction(fa, fm),
            # what the gates decided (the masked path decides alike, then runs everything anyway)
            "gated_param_fraction": param_fraction(exec_attn, exec_mlp),
            "weight_bytes_per_step": wbytes, "kv_cache_bytes": kv_bytes,
            "kv_bytes_needed": kv_bytes * (statistics.mean(exec_attn) if kv == "evict" and variant == "fast" else 1),
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else None,
            "ideal_basis": "weight_bytes" if decode_one else "flops",
            "ideal_speedup": dense_wbytes / wbytes if decode_one else dense_flops / flops}


def calibrate_offsets(model, sparsities, windows):
    """Offsets that make the trained routers skip each requested parameter sparsity on windows (B, T)."""

    @torch.no_grad()
    def measure(offset):
        _, _, gates = model(windows, routing=Routing(mode="hard", offset=offset, fast=True))  # (random ids or text)
        return routing_stats(gates, model.args, model.router_cfg.kv)["param_sparsity"]
    return {s: calibrate_offset(measure, s, -10, 10, 14) for s in sparsities}


def print_table(rows):
    """One line per variant; every speedup with its interval (median_interval), and a note under the
    table where the repetitions were too few for a 95% one."""
    print(f"\n{'regime':<12} {'variant':<13} {'sparsity':>8} {'tok/s':>9} {'speedup [95% interval]':<22} {'ideal':>7} "
          f"{'effic. [interval]':<18} {'GFLOP/tok':>10} {'counted':>8} {'params':>7} {'MB/step':>8}")
    for r in rows:
        interval = f"[{r['speedup_lo']:.2f}, {r['speedup_hi']:.2f}]"
        line = (f"{r['regime']:<12} {r['variant']:<13} {r['sparsity']:>8.2f} {r['tokens_per_s']:>9.1f} "
                f"{r['speedup']:>6.2f}x {interval:<14}")
        if "flops_per_token" in r:
            eff = ""
            if not math.isnan(r["efficiency"]):
                eff_interval = f"[{100 * r['efficiency_lo']:.0f}, {100 * r['efficiency_hi']:.0f}]"
                eff = f"{r['efficiency']:>5.0%} {eff_interval:<12}"
            line += (f" {r['ideal_speedup']:>6.2f}x {eff:<18} {r['flops_per_token'] / 1e9:>10.3f} "
                     f"{r['flops_counted_per_token'] / 1e9:>8.3f} {r['executed_param_fraction']:>7.2f} "
                     f"{r['weight_bytes_per_step'] / 1e6:>8.1f}")
        print(line.rstrip())
    for n, conf in sorted({(r["repetitions"], r["speedup_conf"]) for r in rows if r["speedup_conf"] < CONFIDENCE}):
        print(f"({n} repetitions are too few for a {CONFIDENCE:.0%} interval: each [lo, hi] above is the whole range "
              f"of the paired ratios, a {conf:.0%} confidence interval for the median)")


def plot(results, path):
    import plots  # noqa: F401  (sets the Agg backend)
    import matplotlib.pyplot as plt
    regimes = list(dict.fromkeys(r["regime"] for r in results))
    fig, axes = plt.subplots(1, len(regimes), figsize=(4 * len(regimes), 3.6), squeeze=False)
    for ax, reg in zip(axes[0], regimes):
        for variant, style in (("fast", "o-"), ("masked", "s"), ("shortgpt", "^--")):
            rows = sorted((r for r in results if r["regime"] == reg and r["variant"] == variant), key=lambda r: r["sparsity"])
            if rows:  # bars: each speedup's interval (median_interval)
                ys = [r["speedup"] for r in rows]
                ax.errorbar([r["sparsity"] for r in rows], ys, fmt=style, capsize=3, label=f"{variant} measured",
                            yerr=[[y - r["speedup_lo"] for y, r in zip(ys, rows)],
                                  [r["speedup_hi"] - y for y, r in zip(ys, rows)]])
                if variant == "fast":
                    ax.plot([r["sparsity"] for r in rows], [r["ideal_speedup"] for r in rows], ":", color="gray", label="fast ideal")
        ax.axhline(1.0, color="black", lw=0.5)
        ax.set_title(reg), ax.set_xlabel("parameter sparsity"), ax.set_ylabel("speedup vs dense"), ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    cli(main)
