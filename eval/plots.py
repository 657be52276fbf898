"""Figures of the evaluations: a passkey accuracy heat map, loss-by-position curves and
accuracy against memory size."""
import matplotlib

matplotlib.use("Agg")  # files only; evaluations run on headless machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def accuracy_heatmap(path, accuracy, lengths, depths, title):
    """``accuracy[i][j]`` of ``lengths[i]`` (x axis) and ``depths[j]`` (y axis), 0..1."""
    grid = np.asarray(accuracy, dtype=float).T
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 + 0.9 * len(lengths)),
                                    max(3.0, 1.2 + 0.6 * len(depths))))
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("passkey depth")
    for (row, col), value in np.ndenumerate(grid):
        ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # path may be a temporary name
    plt.close(fig)


def loss_curves(path, positions, curves, title, window=None):
    """One line per ``curves`` entry (label -> mean loss per bucket starting at ``positions``;
    a curve of shorter documents has fewer buckets and stops early); dotted lines mark
    multiples of the local ``window`` (when there are few enough)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, values in curves.items():
        ax.plot(positions[:len(values)], values, marker=".", label=label)
    if window and max(positions) <= 32 * window:
        for x in range(window, int(max(positions)) + 1, window):
            ax.axvline(x, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("token position")
    ax.set_ylabel("mean next-token loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # path may be a temporary name
    plt.close(fig)


def token_curves(path, tokens, curves, references, title):
    """Loss against training tokens: one line per ``curves`` entry (label -> loss at each of
    ``tokens``), and a dashed horizontal line per ``references`` entry (label -> loss, e.g.
    the base model's), in the colour of the curve of the same index."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, (label, values) in enumerate(curves.items()):
        ax.plot(tokens, values, marker="o", label=label, color=f"C{index}")
    for index, (label, value) in enumerate(references.items()):
        ax.axhline(value, color=f"C{index}", linestyle="--", linewidth=0.9, label=label)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("mean next-token loss")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def accuracy_curves(path, memory_windows, curves, title, chance=None):
    """Accuracy (0..1) against memory size in windows (log-2 x axis), one line per ``curves``
    entry (label -> accuracy per size); a dashed line marks ``chance``."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, values in curves.items():
        ax.plot(memory_windows, values, marker="o", label=label)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=0.8, label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xticks(memory_windows, [str(m) for m in memory_windows])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("memory (windows; all but one hold distractors)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # path may be a temporary name
    plt.close(fig)
