"""PNG plots for runs and benchmarks, written atomically; matplotlib is imported only when one is drawn.

    plot_training(log, path, title)   # a run's training loss and validation metrics against step
"""
import io
from pathlib import Path


def plot_training(log: list[dict], path: Path, metric: str, title: str) -> None:
    """Training loss (left axis) and the validation metric (right axis) against optimizer step,
    from the Trainer's log history."""
    losses = [(row["step"], row["loss"]) for row in log if "loss" in row and "step" in row]
    scores = [(row["step"], row[f"eval_{metric}"]) for row in log if f"eval_{metric}" in row]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if losses:
        ax.plot(*zip(*losses), color="tab:blue", linewidth=1.4, label="training loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss", color="tab:blue")
    ax.grid(alpha=0.3)
    if scores:
        right = ax.twinx()
        right.plot(*zip(*scores), color="tab:green", marker="o", linewidth=1.4, label=f"validation {metric}")
        right.set_ylabel(f"validation {metric}", color="tab:green")
        best = max(scores, key=lambda s: s[1])
        right.annotate(f"best {best[1]:.4f} @ {best[0]}", best, textcoords="offset points", xytext=(0, 8),
                       ha="center", fontsize=8)
    ax.set_title(title, fontsize=9)
    save(fig, path)


def smooth(values: list[float]) -> list[float]:
    """A moving average over a 25th of the points: a readable curve from a noisy loss log."""
    window = max(1, len(values) // 25)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: Path) -> None:
    from .saving import atomic_write

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    pyplot().close(fig)
    atomic_write(path, buffer.getvalue())
