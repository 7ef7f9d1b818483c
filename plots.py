"""PNG figures: training curves, per-layer skip rates, token x layer routing maps."""
import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import numpy as np


def training_curves(records, path, title=""):
    """records: the JSONL log (dicts with "iter" and "loss"/"task"/"sparsity", or "val_loss")."""
    steps = [r for r in records if r.get("kind") == "train"]
    vals = [r for r in records if r.get("kind") == "val"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    if steps:
        it = [r["iter"] for r in steps]
        a.plot(it, [r["task"] for r in steps], label="train task loss", alpha=0.6)
        if "ce" in steps[0]:
            a.plot(it, [r["ce"] for r in steps], label="train CE (Gumbel gates)", alpha=0.6)
        if "sparsity" in steps[0]:
            b.plot(it, [r["sparsity"] for r in steps], label="train sparsity (Gumbel)", alpha=0.7)
            b.plot(it, [r["target"] for r in steps], "--", label="target")
    if vals:
        a.plot([r["iter"] for r in vals], [r["val_loss"] for r in vals], "o-", label="val loss (deterministic)")
        if "val_param_sparsity" in vals[0]:
            b.plot([r["iter"] for r in vals], [r["val_param_sparsity"] for r in vals], "o-",
                   label="val param sparsity (deterministic)")
    for ax, ylabel in ((a, "loss"), (b, "sparsity")):
        ax.set_xlabel("iteration"), ax.set_ylabel(ylabel), ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def skip_heatmap(stats, path, title=""):
    """Layer x {attention, MLP} skip-rate heat map from router.routing_stats."""
    data = np.array([stats["attn_skip_per_layer"], stats["mlp_skip_per_layer"]])  # (2, L)
    fig, ax = plt.subplots(figsize=(12, 2.6))
    im = ax.imshow(data, aspect="auto", cmap="magma_r", vmin=0, vmax=1)
    ax.set_yticks([0, 1], ["attention", "MLP"])
    ax.set_xticks(range(data.shape[1]))
    ax.set_xlabel("block")
    for (i, j), v in np.ndenumerate(data):
        ax.text(j, i, f"{v:.2f}".lstrip("0") if v < 1 else "1", ha="center", va="center", fontsize=7,
                color="white" if v > 0.5 else "black")
    fig.colorbar(im, ax=ax, label="skip rate")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def routing_map(gates, tokens_text, path, title=""):
    """Token x layer map of executed sublayers. gates (L, 2, T) 0/1 for one sequence."""
    gates = np.asarray(gates)
    L, _, T = gates.shape
    fig, axes = plt.subplots(1, 2, figsize=(12, max(3, 0.22 * T + 1)), sharey=True)
    for ax, m, name in zip(axes, range(2), ["attention", "MLP"]):
        ax.imshow(gates[:, m, :].T, aspect="auto", cmap="Greys", vmin=0, vmax=1.6, interpolation="nearest")
        ax.set_title(f"{name} (dark = executed)")
        ax.set_xlabel("block")
    axes[0].set_yticks(range(T), [repr(t)[1:-1][:14] for t in tokens_text], fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
