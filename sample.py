"""Generate text from a converted model, dense or routed, with a KV cache.

    python sample.py --prompt "The capital of France is"              # greedy (temperature 0) by default
    python sample.py --prompt "Once upon a time" --num_samples 3 --temperature 0.8 --top_k 50
    python sample.py --chat --prompt "What is the capital of France?"  # the Instruct model's chat template
    python sample.py --routers out/stage1 --prompt "To be, or not to be" --routing_map out/map.png
    python sample.py --prompt_file prompt.txt --max_new_tokens 200
    python sample.py --compile --max_new_tokens 200 --prompt "..."     # compiled decoding steps (see --help)

--routers takes a stage-1 or stage-2 run: the model routes every sublayer of every generated token
(deterministic gates unless --gate sample), prints how much it skipped, and can save a PNG map of
which sublayers each token executed.
"""
import sys
import time
from pathlib import Path

import torch

import fast
from checkpoint import load
from convert import ensure_default_model
from errors import ArgumentParser, UserError, cli
from lora import merge_lora
from router import Routing, routing_stats


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    p.add_argument("--model", default=None, help="converted model, stage-1 or stage-2 run (default: the bundled SmolLM2-135M)")
    p.add_argument("--routers", default=None, help="a stage-1 or stage-2 run: generate with its routing")
    p.add_argument("--prompt", default=None, help="prompt text")
    p.add_argument("--prompt_file", default=None, help="read the prompt from this file")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message for --chat (default: the model's own)")
    p.add_argument("--num_samples", type=int, default=1, help="independent samples to draw")
    p.add_argument("--max_new_tokens", type=int, default=60, help="tokens to generate per sample")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    p.add_argument("--top_k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--seed", type=int, default=1337, help="random seed")
    p.add_argument("--gate", choices=["hard", "sample"], default="hard",
                   help="routing gates: deterministic (hard) or sampled as in the authors' code")
    p.add_argument("--routing_map", default=None, help="save a PNG map of executed sublayers per token")
    p.add_argument("--masked", action="store_true",
                   help="route the way training does (every sublayer runs, skipped outputs x 0) instead of really skipping")
    p.add_argument("--no_cache", action="store_true", help="recompute the whole prefix every step (slow reference)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoding steps: faster tokens after ~20-90 s of compiling (fast.py)")
    p.add_argument("--engine", choices=fast.ENGINES, default="fast",
                   help="fast: fused, compiled-ready inference (fast.py) | reference: model.py's simple path")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.prompt is None and a.prompt_file is None:
        raise UserError("give a prompt: --prompt TEXT or --prompt_file FILE")
    if a.prompt_file is not None:
        if not Path(a.prompt_file).exists():
            raise UserError(f"prompt file not found: {a.prompt_file}")
        a.prompt = Path(a.prompt_file).read_text()
    if a.num_samples < 1 or a.max_new_tokens < 1:
        raise UserError("--num_samples and --max_new_tokens must be >= 1")
    if a.temperature < 0:
        raise UserError("--temperature must be >= 0")
    device = "cuda" if a.device == "auto" and torch.cuda.is_available() else ("cpu" if a.device == "auto" else a.device)
    source = a.routers or a.model or ensure_default_model()
    # inference: LoRA folded in; the engine's fused matmuls (and compiled decoding steps with --compile)
    model = fast.engine(merge_lora(load(source, device=device)), a.engine, a.compile)
    tok = model.tokenizer
    if tok is None:
        raise UserError(f"{source} has no tokenizer; convert the model together with its tokenizer files")
    routing = None
    if a.routers:
        if model.router_cfg is None:
            raise UserError(f"{a.routers} holds no routers (it is a plain converted model); pass it as --model")
        routing = Routing(mode=a.gate, offset=model.routing_offset, fast=not a.masked)
    elif model.router_cfg is not None:  # a run given as --model routes too
        routing = Routing(mode=a.gate, offset=model.routing_offset, fast=not a.masked)
    ids = tok.encode_chat(a.prompt, system=a.system) if a.chat else tok.encode(a.prompt, bos=False)
    if not ids:
        raise UserError("the prompt is empty")
    prompt = torch.tensor([ids], device=device)
    torch.manual_seed(a.seed)
    stop = tok.stop_ids() if a.chat else set()

    for i in range(a.num_samples):
        gates = []
        times = []

        def on_token(nxt, step_gates):
            times.append(time.perf_counter())
            if step_gates is not None:
                gates.append(step_gates[:, :, 0].cpu())  # (L, 2, T_step) for the one sequence

        t0 = time.perf_counter()
        out = model.generate(prompt, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                             routing=routing, stop_ids=stop, use_cache=not a.no_cache, on_token=on_token)
        new = out[0, prompt.shape[1]:].tolist()
        text = tok.decode([t for t in new if t not in stop])
        print(("" if a.chat else a.prompt) + text)
        prefill = prompt.shape[1] / (times[0] - t0)
        decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
        print(f"--- sample {i + 1}: {len(new)} tokens | prefill {prompt.shape[1]} tokens at {prefill:.0f} tokens/s | "
              f"decode {decode:.1f} tokens/s", file=sys.stderr)
        if routing is not None and gates:
            # with the cache each step routes only its new token, so concatenate along time
            g = torch.cat(gates, dim=-1) if not a.no_cache else gates[-1]
            st = routing_stats(g[:, :, None, :], model.args, model.router_cfg.kv)
            print(f"--- routing: skipped {st['param_sparsity']:.1%} of block parameters "
                  f"(attention {st['attn_skip']:.1%}, MLP {st['mlp_skip']:.1%} of sublayers)", file=sys.stderr)
            if a.routing_map and i == 0:
                import plots
                seq = out[0, :g.shape[-1]].tolist()
                plots.routing_map(g.numpy(), [tok.decode([t]) for t in seq], a.routing_map,
                                  f"routing of {len(seq)} tokens ({st['param_sparsity']:.0%} of block params skipped)")
                print(f"--- routing map: {a.routing_map}", file=sys.stderr)


if __name__ == "__main__":
    cli(main)
