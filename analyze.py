"""Where do trained routers skip? Per-layer execution rates, execution against token position, and a
token x layer map, on held-out general text, held-out plays and LAMBADA passages.

    python analyze.py                                   # out/stage1 (or the committed routers), its own offset
    python analyze.py --model out/stage1 --sparsity 0.4 --out_dir out/analysis-0.40

Writes three PNGs to --out_dir and ends with one JSON line:
    per_layer.png   execution rate of every attention and MLP sublayer, one line per text
    position.png    execution rate against token position (mean over the routed blocks), the paper's
                    Figure: it found attention use rising and MLP use falling along the sequence
    routing_map.png which sublayers each token of a sample text executed
Texts: the fixed validation windows of each --data_dir's held-out text (general English and the
plays by default, 256 tokens each), and the first LAMBADA passages (the ones eval.py scores), joined and cut into windows of 256 tokens. Gates are
deterministic, the fast execution path runs, every position of every window counts.
"""
import json
from pathlib import Path

import numpy as np
import torch

import assets
import fast
from checkpoint import load, rel_to_root
import tasks
from common import ensure_data, load_split, setup_device, val_windows
from errors import ArgumentParser, UserError, cli
from lora import merge_lora
from eval import calibrate, calibration_sequences
from router import Routing, routing_stats

SAMPLE_TEXT = ("The Eiffel Tower was built for the 1889 World's Fair in Paris. At 330 metres it was the tallest "
               "structure in the world for forty years, and today it is the most visited monument in France.")


def general_windows(tok, n_passages=200, block=256):
    """The first LAMBADA passages joined by end-of-text tokens, as windows of block + 1 tokens."""
    ids = []
    for context, word in tasks.load_lambada(n_passages):
        ids += tok.encode(context + word) + [tok.eos_id]
    n = len(ids) // (block + 1)
    return torch.tensor(ids[:n * (block + 1)]).view(n, block + 1)


@torch.no_grad()
def gates_on(model, windows, offset, batch_size=8):
    """Deterministic gates of every window: (L, 2, N, T) 0/1."""
    device = model.tok_embeddings.weight.device
    out = []
    for i in range(0, len(windows), batch_size):
        _, _, gates = model(windows[i:i + batch_size, :-1].to(device), routing=Routing(mode="hard", offset=offset, fast=True))
        out.append(gates.float().cpu())
    return torch.cat(out, dim=2)


def position_profile(gates, first_routed, bin_size=16):
    """Execution rate per position bin, mean over routed blocks and windows. -> (attn (n_bins,), mlp (n_bins,))."""
    g = gates[first_routed:].mean(dim=(0, 2))                                   # (2, T)
    T = g.shape[1] // bin_size * bin_size
    binned = g[:, :T].reshape(2, -1, bin_size).mean(-1)                          # (2, n_bins)
    return binned[0].numpy(), binned[1].numpy()


def plot_per_layer(rates, path, title):
    import plots  # noqa: F401  (Agg backend)
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), sharey=True)
    for ax, m, name in zip(axes, (0, 1), ("attention", "MLP")):
        for (text, r), style in zip(rates.items(), ("o-", "s--", "^:", "d-.")):
            ax.plot(range(len(r[m])), r[m], style, ms=4, label=text)
        ax.set_title(f"{name}: execution rate per block"), ax.set_xlabel("block"), ax.grid(alpha=0.3)
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("share of tokens executing")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_position(profiles, bin_size, path, title):
    import plots  # noqa: F401
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for (text, (attn, mlp)), color in zip(profiles.items(), ("C0", "C1", "C2", "C3")):
        x = (np.arange(len(attn)) + 0.5) * bin_size
        ax.plot(x, attn, "o-", color=color, ms=4, label=f"attention, {text}")
        ax.plot(x, mlp, "s--", color=color, ms=4, label=f"MLP, {text}")
    ax.set_xlabel("token position in the window"), ax.set_ylabel("execution rate (routed blocks)")
    ax.grid(alpha=0.3), ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    p.add_argument("--model", default=None,
                   help="stage-1 or stage-2 run (default: out/stage1, else the committed pretrained/stage1-smollm2-135m)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="recalibrate the offset to skip this share of block parameters on task text (as eval.py)")
    p.add_argument("--text", default=SAMPLE_TEXT, help="the sample text of the routing map")
    p.add_argument("--data_dir", nargs="+", default=["data/general", "data/shakespeare"],
                   help="held-out text of each (val.bin), a line per directory in the figures")
    p.add_argument("--out_dir", default="out/analysis", help="where the PNGs go")
    p.add_argument("--bin", type=int, default=16, help="token positions per bin of the position profile")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    a = p.parse_args(argv)
    if a.sparsity is not None and not 0 <= a.sparsity < 1:
        raise UserError(f"--sparsity must be in [0, 1), got {a.sparsity}")
    if a.bin < 1:
        raise UserError("--bin must be >= 1")
    return a


def main(argv=None):
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device, _, ctx = setup_device(a.device, "float32")
    path = Path(a.model) if a.model else next(p for p in (Path("out/stage1"), assets.ROOT / "pretrained/stage1-smollm2-135m")
                                              if (p / "config.json").exists())
    model = fast.accelerate(merge_lora(load(path, device=device)))
    if model.router_cfg is None:
        raise UserError(f"{path} has no routers; give a stage-1 or stage-2 run: --model out/stage1")
    tok = model.tokenizer
    offset = model.routing_offset
    if a.sparsity is not None:
        print(f"calibrating the offset to skip {a.sparsity} of block parameters on general text ...")
        offset = calibrate(model, calibration_sequences(tok, model.args.max_seq_len), a.sparsity, ctx)
    texts = {f"held-out {Path(d).name}": val_windows(load_split(ensure_data(d, tok), "val", tok)) for d in a.data_dir}
    texts["LAMBADA"] = general_windows(tok)
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    first = model.router_cfg.protect_first
    rates, profiles, result = {}, {}, {"model": rel_to_root(path), "offset": offset, "texts": {}}
    for name, windows in texts.items():
        g = gates_on(model, windows, offset)                                      # (L, 2, N, T)
        st = routing_stats(g, model.args, model.router_cfg.kv)
        rates[name] = (1 - np.array(st["attn_skip_per_layer"]), 1 - np.array(st["mlp_skip_per_layer"]))
        profiles[name] = position_profile(g, first, a.bin)
        attn, mlp = profiles[name]
        result["texts"][name] = {"windows": list(windows.shape), "param_sparsity": st["param_sparsity"],
                                 "attn_exec_per_layer": rates[name][0].round(3).tolist(),
                                 "mlp_exec_per_layer": rates[name][1].round(3).tolist(),
                                 "attn_exec": 1 - st["attn_skip"], "mlp_exec": 1 - st["mlp_skip"],
                                 "attn_exec_first_bin": float(attn[0]), "attn_exec_last_bin": float(attn[-1]),
                                 "mlp_exec_first_bin": float(mlp[0]), "mlp_exec_last_bin": float(mlp[-1]),
                                 "attn_exec_by_position": attn.round(4).tolist(), "mlp_exec_by_position": mlp.round(4).tolist()}
        print(f"{name:<18} param sparsity {st['param_sparsity']:.3f} | execution rate of routed blocks, "
              f"positions 0-{a.bin - 1} -> last {a.bin}: attention {attn[0]:.3f} -> {attn[-1]:.3f}, "
              f"MLP {mlp[0]:.3f} -> {mlp[-1]:.3f}")
    label = f"{result['model']}, offset {offset:+.2f}"
    plot_per_layer(rates, out_dir / "per_layer.png", f"execution rate per block ({label})")
    plot_position(profiles, a.bin, out_dir / "position.png", f"execution rate vs position, blocks {first}+ ({label})")

    # -- one sample text, token by token
    import plots
    ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(a.text)
    if len(ids) > model.args.max_seq_len:
        raise UserError(f"--text is {len(ids)} tokens, more than the model's {model.args.max_seq_len}")
    with torch.no_grad():
        _, _, gates = model(torch.tensor([ids], device=device), routing=Routing(mode="hard", offset=offset, fast=True))
    g = gates.float().cpu()[:, :, 0]                                              # (L, 2, T)
    st = routing_stats(g[:, :, None], model.args, model.router_cfg.kv)
    plots.routing_map(g.numpy(), [tok.decode([t]) for t in ids], out_dir / "routing_map.png",
                      f"{label}: {st['param_sparsity']:.0%} of block params skipped on this text")
    result["sample"] = {"tokens": len(ids), "param_sparsity": st["param_sparsity"]}
    result["figures"] = [str(out_dir / f) for f in ("per_layer.png", "position.png", "routing_map.png")]
    print("figures: " + ", ".join(result["figures"]))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    cli(main)
