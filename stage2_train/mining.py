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
    """Unit rows, float32, C order. Rows that already are (the text side's and the audio side's outputs)
    are used as they are: a copy of a 100,000-row glossary costs more in fresh pages than the search."""
    if isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.c_contiguous and x.ndim == 2 and \
            np.allclose(np.einsum("ij,ij->i", x, x), 1.0, atol=1e-4):
        return x
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(x)
    return x


ANN_MIN_ROWS = 20_000     # "auto": exact search below this many glossary rows, IVF above
# cells each chunk scans (of ~sqrt(G)): negatives need to be hard, not the exact top k; make bench
# measures the share of the exact top k kept (0.81 at 16 cells, 0.77 at 12, on the demo's run)
MINE_NPROBE = 12


class ListSearch:
    """An inverted-file (IVF) search made for many queries at once, as mining asks (every train chunk
    against the glossary): the glossary is cut into `nlist` k-means cells and each query scans the
    `nprobe` cells nearest to it, as in a FAISS IVF index, but the work is grouped by cell, so each
    cell is one matrix product of the queries probing it with its rows. FAISS's IVF scans cell by cell
    for each query on its own (suited to few queries); for 3,630 chunks x 100,000 rows the grouped
    products took 0.15 s where FAISS took 1.2 s for the same cells (measured by hand). `search` returns what a FAISS
    index returns: (scores, ids) best first, -1 ids where fewer than k rows were scanned.

    Vectors are L2-normalised by the caller (cosine = inner product).

    `centroids` (nlist, D) from an earlier search of the same glossary (`next_centroids()`) replace the
    k-means: training refreshes its negatives every few hundred steps while the embeddings drift a
    little, so each refresh starts from the last one's cells moved one Lloyd step (the mean of the rows
    each cell got), which tracks the drift for the price of the assignment the search needs anyway."""

    def __init__(self, vectors: np.ndarray, nlist: int, nprobe: int = 16, *, train_per_list: int = 32,
                 niter: int = 10, seed: int = 0, block: int = 16384, centroids: np.ndarray | None = None):
        import torch
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        self.nprobe = min(nprobe, nlist)
        if centroids is None or centroids.shape != (nlist, x.shape[1]):
            rng = np.random.default_rng(seed)
            sample = x[rng.choice(len(x), min(len(x), train_per_list * nlist), replace=False)]
            kmeans = faiss.Kmeans(x.shape[1], nlist, niter=niter, spherical=True, seed=seed,
                                  min_points_per_centroid=1, max_points_per_centroid=train_per_list)
            kmeans.train(sample)
            centroids = kmeans.centroids
        self.centroids = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32))
        rows = torch.from_numpy(x)
        cell = torch.cat([(rows[lo:lo + block] @ self.centroids.T).argmax(1) for lo in range(0, len(x), block)])
        self.rows = rows                                          # not copied: gathered cell by cell
        self.ids = torch.argsort(cell, stable=True).numpy()      # row ids, cell by cell
        self._cell = cell
        self.offsets = np.concatenate([[0], np.cumsum(np.bincount(cell.numpy(), minlength=nlist))])

    def next_centroids(self) -> np.ndarray:
        """The centroids moved one Lloyd step (the mean of the rows each cell got), for the next search
        of this glossary; an empty cell keeps its centroid."""
        import torch
        sums = torch.zeros_like(self.centroids).index_add_(0, self._cell, self.rows)
        moved = torch.nn.functional.normalize(sums, dim=1)
        filled = torch.from_numpy(np.diff(self.offsets) > 0)[:, None]
        return torch.where(filled, moved, self.centroids).numpy()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        n, p = len(q), self.nprobe
        probes = (q @ self.centroids.T).topk(p, dim=1).indices.reshape(-1).numpy()   # (query, slot) -> cell
        scores = torch.full((n * p, k), -np.inf)
        where = torch.zeros((n * p, k), dtype=torch.int64)
        pairs = np.argsort(probes, kind="stable")
        bounds = np.searchsorted(probes[pairs], np.arange(len(self.offsets)))
        for c in range(len(self.offsets) - 1):
            lo, hi = self.offsets[c], self.offsets[c + 1]
            mine = torch.from_numpy(pairs[bounds[c]:bounds[c + 1]])
            if hi == lo or len(mine) == 0:
                continue
            kk = min(k, hi - lo)
            members = torch.from_numpy(self.ids[lo:hi])
            s, j = (q[mine // p] @ self.rows[members].T).topk(kk, dim=1)
            scores[mine, :kk], where[mine, :kk] = s, members[j]
        best, pick = scores.view(n, p * k).topk(min(k, p * k), dim=1)
        ids = where.view(n, p * k).gather(1, pick).numpy()
        found = torch.isfinite(best).numpy()
        return np.where(found, best.numpy(), -np.inf).astype(np.float32), np.where(found, ids, -1)


def mining_index(glossary: np.ndarray, factory: str = "auto", centroids: np.ndarray | None = None):
    """The index negatives are searched in. Negatives need not be the exact top-k, only hard ones, so a
    big glossary gets an inverted-file search (`auto`: `ListSearch` with ~sqrt(G) cells, MINE_NPROBE, above
    ANN_MIN_ROWS rows; its recall of the exact negatives is measured by `make bench`); any FAISS
    factory string otherwise."""
    from shared.index import build_index, pow2_nlist
    if factory == "auto":
        if len(glossary) < ANN_MIN_ROWS:
            return build_index(glossary, "Flat")
        return ListSearch(glossary, pow2_nlist(len(glossary)), nprobe=MINE_NPROBE, centroids=centroids)
    return build_index(glossary, factory)


def _summary(x: np.ndarray) -> dict:
    if x.size == 0:
        return {"n": 0, "mean": float("nan"), "p10": float("nan"), "p50": float("nan"),
                "p90": float("nan")}
    p10, p50, p90 = np.percentile(x, [10, 50, 90])
    return {"n": int(x.size), "mean": float(x.mean()), "p10": float(p10), "p50": float(p50),
            "p90": float(p90)}


def mine_hard_negatives(audio_emb: np.ndarray, glossary_emb: np.ndarray,
                        positives: Sequence[set[int]], equivalent: Mapping[int, int] | np.ndarray | None = None,
                        k: int = 8, exclude_top: int = 0, absolute_margin: float | None = None,
                        relative_margin: float | None = None, max_score: float | None = None,
                        depth: int | None = None, block: int = 65536, index_factory: str = "auto",
                        cells: dict | None = None) -> tuple[np.ndarray, dict]:
    """Top-k glossary terms per chunk that are neither its terms nor aliases of them.

    audio_emb (N, D) chunk embeddings, glossary_emb (G, D) term embeddings (both L2-normalised
    here, so scores are cosines), positives[i] the term ids of chunk i (empty for no-term chunks),
    equivalent: term id -> group id (its main term's id), or an array of G group ids; ids of a
    positive's group are excluded.

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

    `cells`, a dict the caller keeps between calls on the same glossary (the trainer's refreshes),
    carries the inverted-file search's centroids from one call to the next (ListSearch).

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
    if isinstance(equivalent, np.ndarray):          # one group id per row, as the trainer has them
        labels = np.asarray(equivalent, dtype=np.int64)
        if labels.shape != (g,):
            raise ValueError(f"equivalent has {labels.shape} group ids for {g} glossary rows; give one per row")
    else:
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
    index = mining_index(glossary, index_factory, (cells or {}).get("centroids")) if g and k else None
    if cells is not None and isinstance(index, ListSearch):
        cells["centroids"] = index.next_centroids()    # where the next search of this glossary starts

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
