"""The second stage measured: a run's first stage alone against first stage + second stage, on any split.

For each split: Recall@1/5/10 (all, seen and unseen terms), the first stage's recall at N (what the second
stage can reach at most), and at the accept threshold picked on the dev split of the run's own cache (the
score that keeps `eval.keep_hits` of dev's top-1 hits, each ranking with its own score): right-and-accepted
(R@1 of what passes the threshold), its share of R@1, and false alarms on no-term chunks. Plus the cost of
re-scoring: milliseconds per window one at a time and batched.

    python -m stage3_index.second_eval --run cache/runs/demo --split dev --split test \
        --split cache/features/demo-heldout:heldout [--second other/second.pt]

Reads the run and caches only (stage3_index.evaluate's loaders and scoring); writes nothing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from shared.cache import FeatureCache
from shared.cli import run_cli
from shared.errors import BadInput
from shared.glossary import normalize
from shared.heads import embed
from shared.index import build_index
from shared.metrics import false_alarm_rate, pick_threshold, recall_at_threshold
from shared.second_stage import Reranker, rerank, tower_frames
from shared.termside import embed_glossary, rows_to_terms
from stage2_train.data import SplitData
from stage3_index.evaluate import check_same_backbone, load_run, score_ranking, search_blocks, trained_keys


@dataclass
class SplitView:
    """A split as the first stage sees it: frames for the second stage, top rows and cosines per chunk."""
    name: str
    terms: list
    frames: list
    rows: np.ndarray          # (C, depth) first-stage rows, best first
    first: np.ndarray         # (C, depth) their cosines
    owner: np.ndarray
    table: dict | None        # the second stage's token table of this cache's glossary
    seen_term: object


def _forms(cache: FeatureCache, group: str) -> dict:
    import json
    return json.loads((cache.root / "forms.json").read_text(encoding="utf-8"))[group]


def padded_glossary(model, own: FeatureCache, cache: FeatureCache, gloss, split_terms, size: int, log=print):
    """(vectors, owner, forms) of a glossary of `size` terms as eval builds it: every row of the split's
    terms, then real distractor names (those that clash with the corpus dropped, as eval does)."""
    from stage3_index.evaluate import distractor_rows, kept_distractors
    vecs, owner = gloss
    forms = _forms(cache, "glossary")
    kept = kept_distractors(model, own, cache)
    if kept is None:
        raise BadInput("no distractors in the cache: no glossary size", file=own.root,
                       fix="extract with --set data.distractors=builtin")
    dist_cache, ok, _, dvecs, _ = kept
    dforms = _forms(dist_cache, "distractors")
    n_terms = len(cache.read_json("glossary.json")["keys"])
    rows, n_pad = distractor_rows(split_terms, owner, n_terms, len(ok), size)
    if len(split_terms) + n_pad < size:
        log(f"glossary size {size}: only {n_pad} distractors, {len(split_terms) + n_pad} terms")
    pick = ok[:n_pad]
    sub_forms = {k: ([forms[k][r] for r in rows] + [dforms[k][i] for i in pick]) if forms.get(k) is not None
                 else None for k in ("spell", "phones")}
    return (np.concatenate([vecs[rows], dvecs[:n_pad]]).astype(np.float32),
            np.concatenate([owner[rows], n_terms + np.arange(n_pad, dtype=np.int64)]), sub_forms)


def split_view(model, own: FeatureCache, cache: FeatureCache, split: str, depth: int, train_limit: int = 0,
               reranker: Reranker | None = None, glossary=None, size: int = 0, log=print) -> SplitView:
    """Everything the figures need from the first stage, computed once per split; with `size`, against the
    split's terms padded with distractors to `size` terms (eval's glossary-size rows)."""
    gloss = glossary if glossary is not None else embed_glossary(model, cache)
    data = SplitData(cache, split)
    forms = _forms(cache, "glossary")
    if size:
        vecs, owner, forms = padded_glossary(model, own, cache, gloss, sorted({t for ts in data.terms[:len(data)]
                                                                             for t in ts}), size, log)
    else:
        vecs, owner = gloss
    index = build_index(np.ascontiguousarray(vecs, dtype=np.float32), "Flat")
    items = data.audio.items(range(len(data)))
    audio = embed(model.audio, items)
    first, rows, _ = search_blocks(index, audio, min(depth, len(owner)))
    keys = [normalize(k) for k in cache.read_json("glossary.json")["keys"]]
    train_keys = trained_keys(own, train_limit)
    table = reranker.token_table(forms) if reranker is not None else None
    name = (split if cache is own else f"{cache.root.name}:{split}") + (f"@{len(np.unique(owner))}" if size else "")
    return SplitView(name, data.terms[:len(data)], tower_frames(model.audio, items), rows, first,
                     np.asarray(owner, dtype=np.int64), table,
                     lambda t: 0 <= t < len(keys) and keys[t] in train_keys)


def rescored(reranker: Reranker, frames: list, rows: np.ndarray, first: np.ndarray, table: dict,
             n: int | None = None, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(rows, scores) per window: the first stage's top n rows (of `rows`/`first`, best first) re-scored by
    the second stage and re-ordered, then its deeper rows (scored -inf, below every re-scored one: for R@K
    with K above what n rows give). The one ranking of the second stage: eval, second_eval, the retriever."""
    n = min(n or reranker.top_n, rows.shape[1])
    fused = np.concatenate([reranker.rescore(frames[b:b + batch], rows[b:b + batch, :n], first[b:b + batch, :n],
                                             table) for b in range(0, len(rows), batch)]) if len(rows) else \
        np.zeros((0, n), np.float32)
    top, scores = rerank(rows[:, :n], fused)
    rest = rows[:, n:]
    return np.concatenate([top, rest], 1), np.concatenate([scores, np.full(rest.shape, -np.inf, np.float32)], 1)


def second_ranking(view: SplitView, reranker: Reranker, n: int | None = None, batch: int = 256
                   ) -> tuple[np.ndarray, np.ndarray]:
    """`rescored` on a split's view."""
    return rescored(reranker, view.frames, view.rows, view.first, view.table, n, batch)


def ranked_terms(view: SplitView, rows: np.ndarray, scores: np.ndarray, k: int):
    return rows_to_terms(rows, scores, view.owner, k)


def dev_threshold_of(view: SplitView, rows: np.ndarray, scores: np.ndarray, keep_hits: float, k: int = 10):
    """The score keeping `keep_hits` of the dev chunks whose top-1 is right (as eval picks it)."""
    ids, sc = ranked_terms(view, rows, scores, k)
    right = np.array([bool(g) and int(ids[c, 0]) in set(g) for c, g in enumerate(view.terms)])
    return pick_threshold(sc[right, 0], keep_hits) if right.any() else None


def figures_of(view: SplitView, rows: np.ndarray, scores: np.ndarray, threshold, ks=(1, 5, 10)) -> dict:
    ids, sc = ranked_terms(view, rows, scores, max(ks))
    r = score_ranking(ids, sc, view.terms, view.seen_term, ks)
    out = {"r1": r["recall"]["1"], "r5": r["recall"]["5"], "r10": r["recall"]["10"],
           "seen_r1": r["recall_seen"]["1"], "unseen_r1": r["recall_unseen"]["1"], "auroc": r["auroc"],
           "queries": int(len(r["_term"])), "unseen_queries": int((~r["_seen"]).sum())}
    if threshold is not None:
        acc = recall_at_threshold(r["_hits"][:, 0], r["_max"][r["_chunk"]], threshold)
        out.update(threshold=float(threshold), accepted=acc,
                   accepted_share=acc / out["r1"] if out["r1"] else None,
                   far=false_alarm_rate(r["_max"][~r["_term_chunk"]], threshold))
    return out


def recall_at_n(view: SplitView, n: int) -> float:
    ids, _ = rows_to_terms(view.rows[:, :n], view.first[:, :n], view.owner, n)
    hit = [t in set(ids[c].tolist()) for c, g in enumerate(view.terms) for t in set(g)]
    return float(np.mean(hit)) if hit else float("nan")


def rescore_ms(view: SplitView, reranker: Reranker, n: int, windows: int = 200) -> tuple[float, float]:
    """(ms per window one at a time (median), ms per window in one batch of `windows`)."""
    w = min(windows, len(view.rows))
    if w == 0:
        return float("nan"), float("nan")
    one = []
    for i in range(w):
        t0 = time.perf_counter()
        reranker.rescore(view.frames[i:i + 1], view.rows[i:i + 1, :n], view.first[i:i + 1, :n], view.table)
        one.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    reranker.rescore(view.frames[:w], view.rows[:w, :n], view.first[:w, :n], view.table)
    return 1000 * float(np.median(one)), 1000 * (time.perf_counter() - t0) / w


def measure(run: str | Path, splits: list[str], second: str | Path | None = None, keep_hits: float | None = None,
            n: int | None = None, timing: bool = True, sizes=(), log=print) -> dict:
    """{split name: {"first": figures, "second": figures, "recall_at_n": ..., "ms_per_window": ...}}.
    A split is a split of the run's own cache ("test") or CACHE_FOLDER:SPLIT of another cache."""
    model, _, run_cfg, own, _ = load_run(run)
    reranker = Reranker.load(run, second)
    if reranker is None:
        raise BadInput("the run has no second stage (second.pt)", file=run,
                       fix="train one: python -m stage2_train.second --run RUN")
    n = n or reranker.top_n
    keep = keep_hits if keep_hits is not None else run_cfg.eval.keep_hits
    depth = max(30, n)
    own_gloss = embed_glossary(model, own)
    own_gloss = (own_gloss[0], np.asarray(own_gloss[1], dtype=np.int64))
    out = {}
    thresholds = {"first": None, "second": None}
    if "audio/dev" in own.tables:
        dev = split_view(model, own, own, "dev", depth, run_cfg.train.limit, reranker, own_gloss)
        thresholds["first"] = dev_threshold_of(dev, dev.rows, dev.first, keep)
        thresholds["second"] = dev_threshold_of(dev, *second_ranking(dev, reranker, n), keep)
    else:
        log("the run's cache has no dev split: no accept threshold")
    for spec in splits:
        if ":" in spec:
            path, split = spec.rsplit(":", 1)
            cache = FeatureCache(path)
            if cache.root.resolve() == own.root.resolve():
                cache = own
            else:
                check_same_backbone(own, cache)
        else:
            cache, split = own, spec
        if f"audio/{split}" not in cache.tables:
            raise BadInput(f"the cache has no split {split!r}", file=cache.root, fix="choose another --split")
        gloss = own_gloss if cache is own else embed_glossary(model, cache)
        for size in [0, *sizes]:
            view = split_view(model, own, cache, split, depth, run_cfg.train.limit, reranker, gloss, size, log)
            is_dev = cache is own and split == "dev"
            res = {"first": figures_of(view, view.rows, view.first, None if is_dev else thresholds["first"]),
                   "second": figures_of(view, *second_ranking(view, reranker, n),
                                        None if is_dev else thresholds["second"]),
                   "recall_at_n": recall_at_n(view, n), "n": n}
            if timing:
                res["ms_per_window"], res["ms_per_window_batched"] = rescore_ms(view, reranker, n)
            out[view.name] = res
            log(table_line(view.name, res))
    return out


def _f(x) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3f}"


HEADER = ("| split | stage | R@1 | R@5 | R@10 | seen R@1 | unseen R@1 | R@N (first) | AUROC | right+accepted "
          "(share of R@1) | FAR | ms/window |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def table_line(name: str, res: dict) -> str:
    lines = []
    for stage in ("first", "second"):
        f = res[stage]
        acc = f"{_f(f.get('accepted'))} ({_f(f.get('accepted_share'))})" if "accepted" in f else "-"
        ms = f"{res.get('ms_per_window', float('nan')):.2f}" if stage == "second" and "ms_per_window" in res else ""
        lines.append(f"| {name} | {stage} | {_f(f['r1'])} | {_f(f['r5'])} | {_f(f['r10'])} | {_f(f['seen_r1'])} | "
                     f"{_f(f['unseen_r1'])} | {_f(res['recall_at_n']) if stage == 'first' else ''} | {_f(f['auroc'])} | {acc} | "
                     f"{_f(f.get('far'))} | {ms} |")
    return "\n".join(lines)


@click.command("second-eval", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--run", "run", required=True, type=click.Path(file_okay=False), help="A trained run folder.")
@click.option("--split", "splits", multiple=True, required=True,
              help="A split of the run's cache (dev, test) or CACHE_FOLDER:SPLIT of another cache (repeatable).")
@click.option("--second", default=None, type=click.Path(dir_okay=False), help="The second stage. [RUN/second.pt]")
@click.option("--keep-hits", type=float, default=None, help="Share of dev top-1 hits the threshold keeps. "
                                                             "[the run's eval.keep_hits]")
@click.option("--top-n", "n", type=int, default=None, help="Rows re-scored per window. [second.top_n of training]")
@click.option("--glossary-size", "sizes", type=int, multiple=True,
              help="Also against the split's terms padded with distractors to this many terms (repeatable).")
def second_eval_command(run, splits, second, keep_hits, n, sizes):
    """First stage alone vs with the second stage: R@K (seen/unseen), right-and-accepted and FAR at the
    dev-picked threshold, re-scoring cost."""
    click.echo(HEADER)
    measure(run, list(splits), second, keep_hits, n, sizes=sizes, log=click.echo)


if __name__ == "__main__":
    run_cli(second_eval_command)
