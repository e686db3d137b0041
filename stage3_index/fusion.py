"""The transcript as evidence: our audio scores fused with the cascade's fuzzy match.

The backbone can also transcribe (stage 1 caches a transcript per chunk for the cascade baseline).
The two sources fail differently: the audio retriever reads sound and finds terms Whisper mangles
(synthetic, accented or fast speech), while on clean natural speech the transcript spells the term
out and fuzzy matching is near exact. Fusing them is a late, score-level sum per term:

    fused(chunk, term) = cos(audio, term) + weight * fuzzy(transcript, term forms)

over the candidates either side proposes (our top `depth` terms and the cascade's top k), so it
costs one fuzzy pass per chunk and never a dense chunks x glossary matrix. `weight` is picked on the
run's own dev split (`pick_weight`), never on the evaluated one. Pure functions: no files.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def rows_by_term(owner: np.ndarray) -> dict[int, np.ndarray]:
    out: dict[int, list[int]] = {}
    for r, t in enumerate(np.asarray(owner)):
        out.setdefault(int(t), []).append(r)
    return {t: np.asarray(r, dtype=np.int64) for t, r in out.items()}


def fuse(our_ids: np.ndarray, our_scores: np.ndarray, audio: np.ndarray, vecs: np.ndarray, owner: np.ndarray,
         fuzzy: Sequence[np.ndarray], weight: float, k: int, cascade_k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Fused rankings (C, k) of term ids (-1 padded) and scores.

    our_ids/our_scores (C, D): our best D distinct terms per chunk (cosines); audio (C, P) and vecs
    (R, P) with owner (R,) to score the cascade's candidates we did not rank; fuzzy[c] (G,) the
    cascade's term scores of chunk c (0 for terms it does not match at all).
    """
    rows_of = rows_by_term(owner)
    C = len(our_ids)
    ids = np.full((C, k), -1, dtype=np.int64)
    out = np.full((C, k), -np.inf, dtype=np.float32)
    for c in range(C):
        cand = {int(t): float(s) for t, s in zip(our_ids[c], our_scores[c]) if t >= 0}
        f = np.asarray(fuzzy[c])
        if weight > 0 and f.size:
            top = np.argsort(-f, kind="stable")[:cascade_k]
            for t in top[f[top] > 0]:
                t = int(t)
                if t not in cand and t in rows_of:
                    cand[t] = float((vecs[rows_of[t]] @ audio[c]).max())
        if not cand:
            continue
        terms = np.fromiter(cand, dtype=np.int64)
        score = np.fromiter(cand.values(), dtype=np.float32) + weight * (f[terms] if f.size else 0.0)
        order = np.lexsort((terms, -score))[:k]
        ids[c, :len(order)] = terms[order]
        out[c, :len(order)] = score[order]
    return ids, out


def pick_weight(evaluate_weight, weights: Sequence[float]) -> tuple[float, dict]:
    """The weight with the best mean of R@1/5/10 on dev (`evaluate_weight(w) -> {K: recall}`); ties go
    to the smaller weight (less reliance on the ASR)."""
    results = {float(w): evaluate_weight(float(w)) for w in sorted(set(weights))}
    best = max(results, key=lambda w: (round(float(np.mean(list(results[w].values()))), 6), -w))
    return best, results
