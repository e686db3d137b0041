"""`eval`: a run's glossary index, Recall@K (seen/unseen, glossary sizes), rejection, speed; reports.

Everything is computed from the run's checkpoint and the cached features it was trained on: the
frozen backbone is not loaded. The glossary index is saved beside the run and reused while the
checkpoint and factory string are the same.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from shared.cache import FeatureCache, file_sha256, fingerprint_diff
from shared.cli import figures
from shared.errors import BadInput
from shared.heads import embed, load_model
from stage2_train.data import SplitData
from stage3_index.index import build_index, load_index_if, save_index, search
from stage3_index.metrics import (auroc, false_alarm_rate, pick_threshold, query_hits, recall_at_threshold,
                                  sample_glossary)


def _checkpoint(run: Path) -> Path:
    for name in ("best.pt", "last.pt"):
        if (run / name).is_file():
            return run / name
    raise BadInput("no checkpoint (best.pt or last.pt) in the run folder", file=run,
                   fix="train first: python -m stage2_train --run " + str(run))


def _retrieve(model, data: SplitData, index, k: int):
    """Embeddings, top-k ids and scores of every chunk of a split; and search time."""
    audio = embed(model.audio, data.audio.items(range(len(data))))
    t0 = time.perf_counter()
    scores, ids = search(index, audio, k)
    return audio, scores, ids, time.perf_counter() - t0


def evaluate(run: str | Path, split: str = "test", *, factory: str | None = None, ks=(1, 5, 10),
             glossary_sizes=None, keep_hits: float | None = None, log=print) -> dict:
    """Write run/eval/report.{json,md} and plots; return the report."""
    t_start = time.time()
    run = Path(run)
    ckpt_path = _checkpoint(run)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    cache = FeatureCache(ckpt["spec"]["features"])
    diff = fingerprint_diff(cache.fingerprint, ckpt["cache_fingerprint"])  # "cache has X, config (the run) gives Y"
    if diff:  # checked before the model is rebuilt from that cache's exported top layers
        raise BadInput("the feature cache changed since this run was trained: " + "; ".join(diff),
                       file=cache.root, fix="evaluate with the cache the run was trained on")
    model, ckpt = load_model(ckpt)
    cfg = ckpt["config"]
    factory = factory or cfg["eval"]["index"]
    glossary_sizes = glossary_sizes or cfg["eval"]["glossary_sizes"]
    keep_hits = keep_hits or cfg["eval"]["keep_hits"]
    if f"audio/{split}" not in cache.tables:
        raise BadInput(f"the cache has no split {split!r}", file=cache.root)
    out = run / "eval"
    out.mkdir(parents=True, exist_ok=True)
    gt = cache.table("text/glossary")
    frames, offsets = gt.load()
    gloss_vecs = embed(model.text, [frames[offsets[i]:offsets[i + 1]] for i in range(len(gt))])
    n_gloss = len(gloss_vecs)
    kmax = min(max(ks), n_gloss)
    meta = {"checkpoint_sha256": file_sha256(ckpt_path), "factory": factory, "n": n_gloss}
    index = load_index_if(out / "glossary.index", meta)
    build_seconds = 0.0
    if index is None:
        t0 = time.perf_counter()
        index = build_index(gloss_vecs, factory)
        build_seconds = time.perf_counter() - t0
        save_index(index, out / "glossary.index", meta)
    else:
        log(f"reusing the glossary index in {out / 'glossary.index'}")

    test = SplitData(cache, split)
    train_terms = set(t for ts in SplitData(cache, "train").terms for t in ts) if "audio/train" in cache.tables else set()
    audio, scores, ids, search_s = _retrieve(model, test, index, kmax)
    gold = test.terms
    chunk, term, hits = query_hits(ids, gold, ks)
    seen = np.array([t in train_terms for t in term], dtype=bool)
    recall = {str(k): float(hits[:, i].mean()) for i, k in enumerate(ks)}
    recall_seen = {str(k): float(hits[seen, i].mean()) if seen.any() else float("nan") for i, k in enumerate(ks)}
    recall_unseen = {str(k): float(hits[~seen, i].mean()) if (~seen).any() else float("nan")
                     for i, k in enumerate(ks)}

    # Glossary sizes: the split's terms plus distractors; exact search on the subset.
    split_terms = sorted({t for ts in gold for t in ts})
    by_size = {}
    for size in sorted(set(glossary_sizes)) + [n_gloss]:
        sub = sample_glossary(split_terms, range(n_gloss), size, seed=0)
        if str(len(sub)) in by_size:
            continue
        sims = audio @ gloss_vecs[sub].T
        top = sub[np.argsort(-sims, axis=1)[:, :min(kmax, len(sub))]]
        _, _, h = query_hits(_pad(top, max(ks)), gold, ks)
        by_size[str(len(sub))] = {str(k): float(h[:, i].mean()) for i, k in enumerate(ks)}

    # Rejection: the chunk's max score over the glossary; threshold from dev top-1 hits.
    max_score = scores[:, 0]
    term_chunk = np.array([bool(g) for g in gold])
    top1_right = np.zeros(len(gold), dtype=bool)
    top1_right[chunk[hits[:, 0]]] = True
    rej = {"auroc": auroc(max_score[term_chunk & top1_right], max_score[~term_chunk])}
    threshold = _dev_threshold(model, cache, index, kmax, keep_hits) if "audio/dev" in cache.tables else None
    if threshold is None:
        threshold = pick_threshold(max_score[top1_right], keep_hits)
        log("no dev split: rejection threshold picked on the evaluated split itself")
    rej["threshold"] = threshold
    rej["far"] = false_alarm_rate(max_score[~term_chunk], threshold)
    rej["recall_at_threshold"] = recall_at_threshold(hits[:, 0], max_score[chunk], threshold)

    # report.json holds exactly the promised keys; what else a reader wants goes to details.json
    report = {"recall": recall, "recall_seen": recall_seen, "recall_unseen": recall_unseen,
              "by_glossary_size": by_size, "rejection": rej, "queries": int(len(term)),
              "glossary_size": int(n_gloss), "qps": float(len(audio) / max(search_s, 1e-9))}
    details = {"index": factory, "index_build_seconds": round(build_seconds, 4), "split": split,
               "seen_queries": int(seen.sum()), "unseen_queries": int((~seen).sum()),
               "noterm_chunks": int((~term_chunk).sum()), "checkpoint": ckpt_path.name}
    full = {**report, **details}
    (out / "report.md").write_text(report_markdown(full, run.name))
    plot_report(full, max_score[term_chunk], max_score[~term_chunk], out)
    _write_json(out / "details.json", details)
    _write_json(out / "report.json", report)  # last: a report.json (what compare reads) means all is written
    report = full
    log(figures(queries=report["queries"], glossary=n_gloss, r1=recall["1"], r5=recall["5"], r10=recall["10"],
                auroc=rej["auroc"], far=rej["far"], qps=report["qps"], seconds=time.time() - t_start))
    return report


def _pad(top: np.ndarray, k: int) -> np.ndarray:
    if top.shape[1] >= k:
        return top
    return np.concatenate([top, -np.ones((len(top), k - top.shape[1]), dtype=top.dtype)], axis=1)


def _dev_threshold(model, cache, index, kmax, keep_hits) -> float | None:
    dev = SplitData(cache, "dev")
    _, scores, ids, _ = _retrieve(model, dev, index, kmax)
    chunk, _, hits = query_hits(ids, dev.terms, (1,))
    right = np.zeros(len(dev), dtype=bool)
    right[chunk[hits[:, 0]]] = True
    if not right.any():
        return None
    return pick_threshold(scores[right, 0], keep_hits)


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3f}"


def report_markdown(r: dict, name: str = "") -> str:
    ks = list(r["recall"])
    lines = [f"## {name} ({r['split']}: {r['queries']} queries, glossary {r['glossary_size']}, index {r['index']})", "",
             "| | " + " | ".join(f"R@{k}" for k in ks) + " | queries |", "|---" * (len(ks) + 2) + "|",
             "| all | " + " | ".join(_fmt(r["recall"][k]) for k in ks) + f" | {r['queries']} |",
             "| seen terms | " + " | ".join(_fmt(r["recall_seen"][k]) for k in ks) + f" | {r['seen_queries']} |",
             "| unseen terms | " + " | ".join(_fmt(r["recall_unseen"][k]) for k in ks) + f" | {r['unseen_queries']} |"]
    for size, rec in r["by_glossary_size"].items():
        lines.append(f"| glossary {size} | " + " | ".join(_fmt(rec[k]) for k in ks) + " | |")
    j = r["rejection"]
    lines += ["", "| rejection | AUROC | threshold | false alarms (no-term) | recall@1 at threshold | QPS |",
              "|---|---|---|---|---|---|",
              f"| {r['noterm_chunks']} no-term chunks | {_fmt(j['auroc'])} | {_fmt(j['threshold'])} | "
              f"{_fmt(j['far'])} | {_fmt(j['recall_at_threshold'])} | {r['qps']:.0f} |", ""]
    return "\n".join(lines)


def plot_report(r: dict, term_scores, noterm_scores, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for size, rec in r["by_glossary_size"].items():
        ks = [int(k) for k in rec]
        ax.plot(ks, [rec[str(k)] for k in ks], marker="o", label=f"glossary {size}")
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "recall_at_k.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bins = np.linspace(min(np.min(term_scores, initial=0), np.min(noterm_scores, initial=0)), 1, 40)
    ax.hist(term_scores, bins=bins, alpha=0.6, density=True, label="term chunks")
    ax.hist(noterm_scores, bins=bins, alpha=0.6, density=True, label="no-term chunks")
    ax.axvline(r["rejection"]["threshold"], color="k", linestyle="--", label="threshold (dev)")
    ax.set_xlabel("max score over the glossary")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "max_scores.png", dpi=100)
    plt.close(fig)
