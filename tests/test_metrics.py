"""Stage 3 metrics on hand-made ids and scores with known answers."""
import itertools

import numpy as np
import pytest

from shared.metrics import (auroc, false_alarm_rate, pick_threshold, query_hits, recall_at_k,
                                  recall_at_threshold)


def test_recall_counts_chunk_term_pairs():
    ranked = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    gold = [{2}, {6, 9}, set()]               # the last chunk has no term: not a query
    assert recall_at_k(ranked, gold, ks=(1, 2, 3)) == pytest.approx({1: 0.0, 2: 1 / 3, 3: 2 / 3})
    chunk, term, hits = query_hits(ranked, gold, ks=(1, 3))
    assert chunk.tolist() == [0, 1, 1] and term.tolist() == [2, 6, 9]
    assert hits.tolist() == [[False, True], [False, True], [False, False]]


def test_recall_with_aliases():
    ranked = np.array([[4, 5, 6]])
    gold = [{9}]
    assert recall_at_k(ranked, gold, ks=(1,)) == {1: 0.0}
    assert recall_at_k(ranked, gold, ks=(1,), equivalent={9: 4}) == {1: 1.0}     # 9 is an alias of 4
    assert recall_at_k(ranked, gold, ks=(1, 3), equivalent={4: 9}) == {1: 1.0, 3: 1.0}
    assert recall_at_k(np.array([[-1, -1]]), gold, ks=(2,), equivalent={-1: 9}) == {2: 0.0}


def test_recall_edge_cases():
    with pytest.raises(ValueError, match="Recall@10"):
        recall_at_k(np.zeros((1, 5), dtype=int), [{0}], ks=(1, 10))
    out = recall_at_k(np.zeros((1, 1), dtype=int), [set()], ks=(1,))
    assert np.isnan(out[1])


def brute_auroc(pos, neg):
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_known_values():
    x = np.array([0.1, 0.4, 0.4, 0.7])
    assert auroc(x, x) == 0.5
    assert auroc([0.8, 0.9], [0.1, 0.2, 0.3]) == 1.0
    assert auroc([0.1], [0.8, 0.9]) == 0.0
    assert auroc([0.5], [0.5]) == 0.5
    assert np.isnan(auroc([], [0.1]))


def test_auroc_matches_pair_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        pos = rng.integers(0, 6, size=rng.integers(1, 30)).astype(float)
        neg = rng.integers(0, 5, size=rng.integers(1, 30)).astype(float)
        assert auroc(pos, neg) == pytest.approx(brute_auroc(pos, neg))


def test_threshold_rule():
    scores = np.arange(1, 11) / 10                      # 0.1 .. 1.0, ten dev top-1 hits
    t = pick_threshold(scores, keep=0.9)
    assert t == pytest.approx(0.2)                      # keeps 9 of 10
    assert (scores >= t).mean() >= 0.9
    assert (scores >= t + 1e-9).mean() < 0.9            # any higher keeps fewer
    thirty = np.linspace(0, 1, 30)
    t = pick_threshold(thirty, keep=0.9)                # 0.9 * 30 must count as 27, not 28
    assert (thirty >= t).sum() == 27
    assert pick_threshold([0.3, 0.3, 0.3], keep=0.5) == 0.3
    with pytest.raises(ValueError):
        pick_threshold([], keep=0.9)


def test_false_alarms_and_recall_at_threshold():
    assert false_alarm_rate([0.1, 0.5, 0.6, 0.2], threshold=0.5) == 0.5
    hits = [True, True, False, True]
    top1 = [0.9, 0.4, 0.8, 0.6]
    assert recall_at_threshold(hits, top1, threshold=0.5) == 0.5
    with pytest.raises(ValueError):
        recall_at_threshold([True], [0.1, 0.2], 0.5)
