"""Retrieval metrics as pure functions on ids and scores (training's dev evaluation and stage 3's report).

Owns what the report's numbers mean:
- Recall@K: one query per (term chunk, gold term) pair; a hit when the gold term, or any id of its
  alias group, is among the chunk's top K retrieved ids. No-term chunks are not queries.
- Rejection: AUROC of per-chunk max scores (term chunks vs no-term chunks), a threshold picked on
  dev, and on test the false-alarm rate and the recall at that threshold. A chunk is accepted when
  its score >= threshold.
- Glossary sizes: stage3_index/evaluate.py pads the split's terms with real distractor names (not
  those that clash with the corpus: shared/distractors.clashes).
- Seen / unseen / strictly unseen: which queries count is stage3_index/evaluate.py's (SeenTerms).

`equivalent` everywhere maps a term id to its group id (its main term's id); ids not in it are
their own group.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np


def _groups(ids: np.ndarray, equivalent: Mapping[int, int] | None) -> np.ndarray:
    if not equivalent:
        return ids
    distinct, inverse = np.unique(ids, return_inverse=True)
    mapped = np.asarray([equivalent.get(int(t), int(t)) for t in distinct], dtype=np.int64)
    return mapped[inverse.reshape(-1)].reshape(ids.shape)


def query_hits(ranked_ids: np.ndarray, gold: Sequence[Iterable[int]], ks: Sequence[int] = (1, 5, 10),
               equivalent: Mapping[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expand per-chunk rankings into (chunk, gold term) queries and say which are hits.

    ranked_ids (C, Kmax): each chunk's retrieved term ids, best first (-1 for none);
    gold[c]: the chunk's gold term ids (empty for a no-term chunk).
    Returns (chunk (Q,), term (Q,), hits (Q, len(ks)) bool); filter by `term` for seen/unseen.
    """
    ranked = np.asarray(ranked_ids, dtype=np.int64).reshape(len(gold), -1)
    if ks and max(ks) > ranked.shape[1]:
        raise ValueError(f"Recall@{max(ks)} needs at least {max(ks)} ranked ids per chunk, got "
                         f"{ranked.shape[1]}; search deeper")
    pairs = [(c, int(t)) for c, terms in enumerate(gold) for t in sorted(set(terms))]
    chunk = np.asarray([c for c, _ in pairs], dtype=np.int64)
    term = np.asarray([t for _, t in pairs], dtype=np.int64)
    ranked_groups = _groups(ranked, equivalent)
    found = ranked_groups[chunk] == _groups(term, equivalent)[:, None]          # (Q, Kmax)
    found &= ranked[chunk] >= 0
    # rank of the first hit (Kmax when none); a hit at K when that rank < K
    first = np.where(found.any(axis=1), found.argmax(axis=1), ranked.shape[1])
    hits = first[:, None] < np.asarray(ks, dtype=np.int64)[None, :]
    return chunk, term, hits.reshape(len(pairs), len(ks))


def recall_at_k(ranked_ids: np.ndarray, gold: Sequence[Iterable[int]], ks: Sequence[int] = (1, 5, 10),
                equivalent: Mapping[int, int] | None = None) -> dict[int, float]:
    """{K: fraction of (chunk, gold term) queries whose gold term (or an alias) is in the top K}.

    NaN for every K when there is no query.
    """
    _, _, hits = query_hits(ranked_ids, gold, ks, equivalent)
    if len(hits) == 0:
        return {k: float("nan") for k in ks}
    return {k: float(hits[:, i].mean()) for i, k in enumerate(ks)}


def auroc(pos_scores, neg_scores) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting 1/2.

    Computed from ranks (Mann-Whitney U with average ranks for ties), O(n log n). NaN when either
    side is empty.
    """
    pos = np.asarray(pos_scores, dtype=np.float64).reshape(-1)
    neg = np.asarray(neg_scores, dtype=np.float64).reshape(-1)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    both = np.concatenate([pos, neg])
    values, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    # average 1-based rank of each distinct value: the ranks it spans are start+1 .. start+count
    starts = np.cumsum(counts) - counts
    average_rank = starts + (counts + 1) / 2.0
    rank_sum = average_rank[inverse.reshape(-1)[:pos.size]].sum()
    u = rank_sum - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def pick_threshold(scores_of_top1_hits, keep: float = 0.9) -> float:
    """The highest threshold that still accepts at least `keep` of the dev top-1 hits.

    Accepting means score >= threshold, so the answer is the ceil(keep * n)-th highest score:
    any higher value accepts fewer than that many hits.
    """
    scores = np.sort(np.asarray(scores_of_top1_hits, dtype=np.float64).reshape(-1))[::-1]
    if scores.size == 0:
        raise ValueError("no dev top-1 hits to pick a rejection threshold from; the model finds no "
                         "term at rank 1 on dev (train longer or check the dev split)")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    needed = max(1, math.ceil(keep * scores.size - 1e-9))   # 0.9 * 30 is 27.000000000000004
    return float(scores[needed - 1])


def false_alarm_rate(noterm_max_scores, threshold: float) -> float:
    """Fraction of no-term chunks accepted (max score >= threshold); NaN without any."""
    scores = np.asarray(noterm_max_scores, dtype=np.float64).reshape(-1)
    return float((scores >= threshold).mean()) if scores.size else float("nan")


def recall_at_threshold(hits_at_1, top1_scores, threshold: float) -> float:
    """Fraction of queries whose top-1 is right AND accepted (its score >= threshold).

    Pass the queries of `query_hits` (hits[:, 0] for K=1) with each query's chunk's top-1 score,
    so this is Recall@1 restricted to what the threshold lets through. NaN without any query.
    """
    hits = np.asarray(hits_at_1, dtype=bool).reshape(-1)
    scores = np.asarray(top1_scores, dtype=np.float64).reshape(-1)
    if hits.shape != scores.shape:
        raise ValueError(f"{hits.size} hits but {scores.size} scores; give one score per query")
    return float((hits & (scores >= threshold)).mean()) if hits.size else float("nan")
