"""`compare`: several runs side by side: what differs in their configs, and their metrics."""
from __future__ import annotations

import json
from pathlib import Path

from shared.config import diff_configs, flatten
from shared.errors import BadInput


def compare(runs: list[str | Path], out: str | Path | None = None, log=print, split: str = "dev") -> str:
    """Markdown table: config keys that differ between the runs, then the headline metrics of each
    run's report on `split` of its own cache (RUN/eval/SPLIT/report.json). Dev by default: runs are
    compared to choose between them, and choices are made on dev; test only reports."""
    rows = []
    for r in runs:
        r = Path(r)
        cfg_path, rep_path = r / "config.json", r / "eval" / split / "report.json"
        if not cfg_path.is_file():
            raise BadInput("not a run folder (config.json missing)", file=r)
        rep = json.loads(rep_path.read_text()) if rep_path.is_file() else None
        if rep is None:
            log(f"{r}: no eval/{split}/report.json yet (run `python -m stage3_index eval --run {r} --split {split}`)")
        rows.append((r.name, json.loads(cfg_path.read_text()), rep))
    base = rows[0][1]
    keys = sorted({k for _, c, _ in rows[1:] for k in diff_configs(base, c)})
    keys = [k for k in keys if not k.startswith("cache.root")]
    metrics = ["recall.1", "recall.5", "recall.10", "recall_seen.5", "recall_unseen.5", "recall_unseen.10",
               "rejection.auroc", "rejection.far", "qps", "baseline.recall.5"]
    head = ["run"] + keys + metrics
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, cfg, rep in rows:
        fc, fr = flatten(cfg), flatten(rep or {})
        vals = [str(fc.get(k)) for k in keys] + [
            ("-" if fr.get(m) is None else f"{fr[m]:.3f}" if m != "qps" else f"{fr[m]:.0f}") for m in metrics]
        lines.append("| " + " | ".join([name] + vals) + " |")
    table = f"Split {split} of each run's own cache.\n\n" + "\n".join(lines) + "\n"
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(table)
        _plot(rows, out / "compare.png")
        from stage2_train.curves import plot_dev_curves
        plot_dev_curves({Path(r).name: r for r in runs}, out / "dev_curves.png")
    return table


def _plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    have = [(n, r) for n, _, r in rows if r]
    if not have:
        return
    ks = list(have[0][1]["recall"])
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(have), 3.5))
    w = 0.8 / len(ks)
    for i, k in enumerate(ks):
        ax.bar(np.arange(len(have)) + i * w, [r["recall"][k] or 0.0 for _, r in have], w, label=f"R@{k}")
    ax.set_xticks(np.arange(len(have)) + w * (len(ks) - 1) / 2, [n for n, _ in have], rotation=20)
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
