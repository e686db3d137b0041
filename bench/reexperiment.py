"""reexperiment: one idea (a loss-weight change) trained and evaluated on the demo cache, wall seconds."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from shared.config import Config


# ---------------------------------------------------------------- reexperiment: an idea in a minute

def bench_reexperiment(cfg: Config, features: Path, out: Path, quick: bool, log,
                       change: str = "loss.w_term=0.9") -> tuple[dict, dict]:
    """What caching is for: one idea (a loss-weight change) trained on the demo cache with the config's
    own epochs, early stopping and threads, then evaluated on dev, in a fresh run folder; wall seconds."""
    import torch
    from shared.config import load_config
    from stage2_train.train import train
    from stage3_index.evaluate import evaluate
    sets = [change] + (["train.epochs=1", "train.limit=256"] if quick else [])
    run_cfg = load_config(None, sets, base=cfg)
    run = out / "reexperiment_run"
    shutil.rmtree(run, ignore_errors=True)
    threads = torch.get_num_threads()
    try:
        t0 = time.perf_counter()
        tr = train(run_cfg, features, run, log=lambda *_: None)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        rep = evaluate(run, "dev", log=lambda *_: None)
        eval_s = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    r10 = rep["recall"].get("10")
    report = {"train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1),
              "dev_r10": float("nan") if r10 is None else round(float(r10), 4)}
    details = {"change": change, "steps": tr.state["step"], "epochs": tr.state["epoch"],
               "threads": run_cfg.train.threads, "run": str(run),
               "what": "stage2_train.train() on the demo cache with the config plus the change (its epochs, "
                       "early stopping and train.threads), then stage3_index.evaluate() on dev (the full report: "
                       "glossary sizes with distractors, rejection, cascade baseline); wall seconds in-process"}
    log(f"reexperiment: {change}: train {train_s:.1f} s ({tr.state['step']} steps), eval {eval_s:.1f} s, "
        f"dev R@10 {report['dev_r10']:.3f}")
    return report, details
