"""How a run went, as people look at it: `curves.png` beside `metrics.jsonl`, TensorBoard when installed.

`metrics.jsonl` stays the record (one line per step and per dev evaluation); the picture is redrawn
from it at every evaluation, so a run killed mid-way still has its curves up to its last evaluation.
`compare` overlays the dev curves of several runs with `plot_dev_curves`.
"""
from __future__ import annotations

import json
from pathlib import Path

from shared.atomic import atomic_path

LOSS_PARTS = ("total", "audio_text", "audio_term", "hard", "reject")
DEV_KEYS = ("dev_r1", "dev_r5", "dev_r10")


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(step records, eval records) of a metrics.jsonl; a torn last line (a killed run) is skipped."""
    steps, evals = [], []
    path = Path(path)
    if not path.is_file():
        return steps, evals
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict):
            continue
        (evals if rec.get("type") == "eval" else steps).append(rec)
    return steps, evals


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` points (the first points average what they have): step losses
    are noisy at batch level, a trend is what the curve should show."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_run(run: str | Path, out: str | Path | None = None) -> Path | None:
    """Draw RUN/curves.png: loss parts (smoothed) and dev R@1/5/10 against step. None without data."""
    run = Path(run)
    steps, evals = read_metrics(run / "metrics.jsonl")
    if not steps and not evals:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_dev) = plt.subplots(1, 2, figsize=(10, 3.8))
    x = [s["step"] for s in steps]
    window = max(1, len(steps) // 50)
    for part in LOSS_PARTS:
        ys = [s.get(part) for s in steps]
        if steps and all(isinstance(y, (int, float)) for y in ys) and any(y != 0 for y in ys):
            ax_loss.plot(x, smooth(ys, window), label=part, lw=1.2 if part == "total" else 0.8)
    ax_loss.set_xlabel("step")
    ax_loss.set_title(f"training loss (mean of {window} steps)")
    if ax_loss.lines:
        ax_loss.legend(fontsize=8)
    _dev_axes(ax_dev, {run.name: evals}, keys=DEV_KEYS)
    ax_dev.set_title("dev recall")
    fig.tight_layout()
    out = Path(out) if out else run / "curves.png"
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return out


def _dev_axes(ax, runs: dict[str, list[dict]], keys=DEV_KEYS) -> None:
    styles = {"dev_r1": ":", "dev_r5": "-", "dev_r10": "--"}
    for i, (name, evals) in enumerate(runs.items()):
        if not evals:
            continue
        color = f"C{i % 10}"
        for k in keys:
            pts = [(e["step"], e[k]) for e in evals if isinstance(e.get(k), (int, float))]
            if pts:
                label = f"{name} R@{k[5:]}" if len(runs) > 1 else f"R@{k[5:]}"
                ax.plot(*zip(*pts), styles.get(k, "-"), color=color if len(runs) > 1 else None, marker=".",
                        label=label)
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    if ax.lines:
        ax.legend(fontsize=8)


def plot_dev_curves(runs: dict[str, str | Path], path: str | Path) -> Path | None:
    """Overlay the dev R@1/5/10 curves of several runs ({name: run folder}) in one picture."""
    evals = {name: read_metrics(Path(r) / "metrics.jsonl")[1] for name, r in runs.items()}
    if not any(evals.values()):
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    _dev_axes(ax, evals)
    ax.set_title("dev recall by run (R@1 dotted, R@5 solid, R@10 dashed)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


class TensorBoard:
    """Scalars to RUN/tensorboard when `train.tensorboard` is on and the package is installed; a no-op
    otherwise (said once)."""

    def __init__(self, run: str | Path, enabled: bool, log=print):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if log:
                log("train.tensorboard is on but the tensorboard package is not installed "
                    "(pip install tensorboard, or the project's [tensorboard] extra): curves.png only")
            return
        self.writer = SummaryWriter(str(Path(run) / "tensorboard"))

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
