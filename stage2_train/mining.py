"""Hard-negative mining: for each chunk, the glossary terms it scores highest that are not its own.

One function with a few knobs, in the manner of sentence-transformers' hard-negative mining, and
one line that says what it did. Pure computation on arrays: the training loop re-embeds the
glossary with the current text side, calls `mine_hard_negatives`, prints `format_stats`.

Term ids are row indices of `glossary_emb` (the glossary's term ids). For a no-term chunk nothing
is excluded, so its list is just its nearest glossary terms: what the rejection loss pushes down.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import faiss
import numpy as np


def _normalised(x: np.ndarray) -> np.ndarray:
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(x)
    return x


ANN_MIN_ROWS = 20_000     # "auto": exact search below this many glossary rows, IVF above


def mining_index(glossary: np.ndarray, factory: str = "auto"):
    """The index negatives are searched in. Negatives need not be the exact top-k, only hard ones, so a
    big glossary gets an IVF index (`auto`: IVF{~sqrt(G)},Flat, nprobe 16, above ANN_MIN_ROWS rows; its
    recall of the exact negatives is measured by `make bench`); any FAISS factory string otherwise."""
    from shared.index import build_index, pow2_nlist
    if factory == "auto":
        if len(glossary) < ANN_MIN_ROWS:
            return build_index(glossary, "Flat")
        return build_index(glossary, f"IVF{pow2_nlist(len(glossary))},Flat", nprobe=16, train_per_list=64)
    return build_index(glossary, factory)


def _summary(x: np.ndarray) -> dict:
    if x.size == 0:
        return {"n": 0, "mean": float("nan"), "p10": float("nan"), "p50": float("nan"),
                "p90": float("nan")}
    p10, p50, p90 = np.percentile(x, [10, 50, 90])
    return {"n": int(x.size), "mean": float(x.mean()), "p10": float(p10), "p50": float(p50),
            "p90": float(p90)}


def mine_hard_negatives(audio_emb: np.ndarray, glossary_emb: np.ndarray,
                        positives: Sequence[set[int]], equivalent: Mapping[int, int] | None = None,
                        k: int = 8, exclude_top: int = 0, absolute_margin: float | None = None,
                        relative_margin: float | None = None, max_score: float | None = None,
                        depth: int | None = None, block: int = 65536, index_factory: str = "auto"
                        ) -> tuple[np.ndarray, dict]:
    """Top-k glossary terms per chunk that are neither its terms nor aliases of them.

    audio_emb (N, D) chunk embeddings, glossary_emb (G, D) term embeddings (both L2-normalised
    here, so scores are cosines), positives[i] the term ids of chunk i (empty for no-term chunks),
    equivalent: term id -> group id (its main term's id); ids of a positive's group are excluded.

    Candidates come from an inner-product search (`mining_index`: exact below ANN_MIN_ROWS glossary
    rows, IVF above; on every GPU faiss sees) of `depth` terms per chunk, default k + exclude_top +
    (most ids any chunk must exclude) + k, and pass these filters in order, each counted in the stats:
      positive_or_alias  a term of the chunk or of its group;
      exclude_top        the `exclude_top` best remaining candidates, the likeliest unlabelled
                         synonyms;
      max_score          candidates scoring above `max_score`;
      margin             candidates too close to the chunk's best positive score p (only chunks
                         with positives): dropped when s > p - absolute_margin, or when
                         s > p * (1 - relative_margin). The reference is the best positive, not
                         the worst, so a chunk with one poorly placed term still keeps hard
                         negatives for its others.
    The first k survivors, best first, are returned; -1 fills the rest.

    Returns (ids (N, k) int64, stats) with stats: seconds, chunks, k, depth, removed by each filter
    (counted over the searched depth), short (chunks with fewer than k), positive and negative
    score summaries (mean, p10, p50, p90 of cosines of positive pairs and of kept negatives).
    """
    start = time.perf_counter()
    audio = _normalised(audio_emb)
    glossary = _normalised(glossary_emb)
    n, g = len(audio), len(glossary)
    if len(positives) != n:
        raise ValueError(f"{len(positives)} positive sets for {n} chunk embeddings; give one set per "
                         f"chunk (empty for a no-term chunk)")
    for i, terms in enumerate(positives):
        bad = [t for t in terms if not 0 <= t < g]
        if bad:
            raise ValueError(f"chunk {i}: positive term ids {bad} are outside the glossary "
                             f"(0..{g - 1}); embed the whole glossary in term-id order")

    # Dense group index per glossary row: two rows are aliases when their groups are equal.
    labels = np.arange(g, dtype=np.int64)
    for term, group in (equivalent or {}).items():
        if 0 <= term < g:
            labels[term] = group
    _, group_of, group_size = np.unique(labels, return_inverse=True, return_counts=True)
    group_of = group_of.reshape(-1)
    pos_terms = [sorted({int(t) for t in terms}) for terms in positives]
    pos_groups = [sorted({int(group_of[t]) for t in terms}) for terms in pos_terms]
    most_excluded = max((int(group_size[gr].sum()) for gr in pos_groups if gr), default=0)
    group_width = max(1, max((len(gr) for gr in pos_groups), default=0))
    term_width = max(1, max((len(t) for t in pos_terms), default=0))
    if depth is None:
        depth = k + exclude_top + most_excluded + k
    depth = max(1, min(depth, g))

    removed = {"positive_or_alias": 0, "exclude_top": 0, "max_score": 0, "margin": 0}
    out = np.full((n, k), -1, dtype=np.int64)
    pos_scores, neg_scores = [], []
    index = mining_index(glossary, index_factory) if g and k else None

    for lo in range(0, n if index is not None else 0, block):
        hi = min(lo + block, n)
        scores, ids = index.search(audio[lo:hi], depth)
        valid = ids >= 0
        cand_group = np.where(valid, group_of[np.clip(ids, 0, None)], -1)

        # Positives of this block, padded: group ids (-2 never matches) and term rows (-1).
        pg = np.full((hi - lo, group_width), -2, dtype=np.int64)
        pid = np.full((hi - lo, term_width), -1, dtype=np.int64)
        for r, i in enumerate(range(lo, hi)):
            pg[r, :len(pos_groups[i])] = pos_groups[i]
            pid[r, :len(pos_terms[i])] = pos_terms[i]

        keep = valid.copy()
        is_pos = (cand_group[:, :, None] == pg[:, None, :]).any(axis=2) & keep
        removed["positive_or_alias"] += int(is_pos.sum())
        keep &= ~is_pos

        if exclude_top > 0:
            top = keep & (np.cumsum(keep, axis=1) <= exclude_top)
            removed["exclude_top"] += int(top.sum())
            keep &= ~top

        if max_score is not None:
            high = keep & (scores > max_score)
            removed["max_score"] += int(high.sum())
            keep &= ~high

        has_pos = pid >= 0
        ps = np.einsum("rd,rpd->rp", audio[lo:hi], glossary[np.clip(pid, 0, None)])
        pos_scores.append(ps[has_pos])
        if absolute_margin is not None or relative_margin is not None:
            best = np.where(has_pos, ps, -np.inf).max(axis=1)[:, None]
            close = np.zeros_like(keep)
            if absolute_margin is not None:
                close |= scores > best - absolute_margin
            if relative_margin is not None:
                close |= scores > best * (1.0 - relative_margin)
            close &= keep & np.isfinite(best)
            removed["margin"] += int(close.sum())
            keep &= ~close

        rank = np.cumsum(keep, axis=1)
        chosen = keep & (rank <= k)
        rows, cols = np.nonzero(chosen)
        out[lo + rows, rank[rows, cols] - 1] = ids[rows, cols]
        neg_scores.append(scores[rows, cols])

    def joined(parts):
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    seconds = time.perf_counter() - start
    stats = {
        "seconds": seconds, "chunks": n, "glossary": g, "k": k, "depth": depth,
        "removed": removed, "short": int(((out >= 0).sum(axis=1) < k).sum()) if k else 0,
        "positive_scores": _summary(joined(pos_scores)),
        "negative_scores": _summary(joined(neg_scores)),
    }
    return out, stats


def format_stats(stats: dict) -> str:
    """One line: what mining did, for the training log."""
    r, p, q = stats["removed"], stats["positive_scores"], stats["negative_scores"]
    rate = stats["chunks"] / stats["seconds"] if stats["seconds"] > 0 else float("inf")
    return (f"mined {stats['k']} negatives x {stats['chunks']} chunks from {stats['glossary']} terms "
            f"(depth {stats['depth']}) in {stats['seconds']:.2f}s ({rate:.0f} chunks/s); removed "
            f"positive/alias {r['positive_or_alias']}, exclude_top {r['exclude_top']}, "
            f"max_score {r['max_score']}, margin {r['margin']}; short {stats['short']}; "
            f"cos pos mean {p['mean']:.3f} p50 {p['p50']:.3f} | neg mean {q['mean']:.3f} "
            f"p50 {q['p50']:.3f} p90 {q['p90']:.3f}")
