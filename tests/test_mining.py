"""Hard-negative mining on hand-made embeddings: what it excludes, keeps and reports."""
import numpy as np
import pytest

from stage2_train.mining import format_stats, mine_hard_negatives


def unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def ladder(n_terms=8, dim=16, seed=0):
    """Glossary of random unit vectors; chunk i sits next to term i."""
    rng = np.random.default_rng(seed)
    glossary = unit(rng.normal(size=(n_terms, dim)))
    return rng, glossary


def brute_force(audio, glossary, positives, equivalent, k):
    group = lambda t: (equivalent or {}).get(t, t)
    out = np.full((len(audio), k), -1)
    for i, a in enumerate(unit(audio)):
        scores = unit(glossary) @ a
        banned = {group(t) for t in positives[i]}
        order = [int(t) for t in np.argsort(-scores, kind="stable") if group(int(t)) not in banned]
        out[i, :min(k, len(order))] = order[:k]
    return out


def test_never_returns_a_positive_or_an_alias_and_respects_k():
    rng, glossary = ladder()
    glossary[3] = unit(glossary[2] + 0.05 * rng.normal(size=16))    # 3 is an alias of 2, and close
    audio = unit(glossary[[2, 5, 0]] + 0.1 * rng.normal(size=(3, 16)))
    positives = [{2}, {5, 6}, set()]
    equivalent = {3: 2}
    ids, stats = mine_hard_negatives(audio, glossary, positives, equivalent, k=4)
    assert ids.shape == (3, 4) and ids.dtype == np.int64
    assert not {2, 3} & set(ids[0].tolist())
    assert not {5, 6} & set(ids[1].tolist())
    for row in ids:
        assert len(set(row.tolist())) == 4
    assert np.array_equal(ids, brute_force(audio, glossary, positives, equivalent, 4))
    assert ids[2, 0] == 0                        # a no-term chunk keeps its nearest term
    assert stats["removed"]["positive_or_alias"] == 4
    assert stats["short"] == 0


def test_matches_brute_force_on_random_data():
    rng, glossary = ladder(n_terms=50, dim=8, seed=1)
    audio = rng.normal(size=(30, 8)).astype(np.float32)
    positives = [set(rng.choice(50, size=rng.integers(0, 4), replace=False).tolist()) for _ in range(30)]
    equivalent = {int(a): int(b) for a, b in zip(range(0, 50, 5), range(1, 50, 5))}
    ids, _ = mine_hard_negatives(audio, glossary, positives, equivalent, k=6, block=7)
    assert np.array_equal(ids, brute_force(audio, glossary, positives, equivalent, 6))


def test_minus_one_fill_when_glossary_is_tiny():
    glossary = unit(np.eye(3))
    audio = unit([[1.0, 0.5, 0.1]])
    ids, stats = mine_hard_negatives(audio, glossary, [{0}], k=5)
    assert ids.tolist() == [[1, 2, -1, -1, -1]]
    assert stats["short"] == 1
    ids, _ = mine_hard_negatives(audio, glossary, [{0}], equivalent={1: 0, 2: 0}, k=2)
    assert ids.tolist() == [[-1, -1]]


def test_filters_remove_what_they_say():
    # cosines to terms 0..4 for the one chunk: 0.9 (positive), 0.8, 0.6, 0.4, 0.2
    scores = np.array([0.9, 0.8, 0.6, 0.4, 0.2])
    glossary = np.zeros((5, 6), dtype=np.float32)      # term i = (s_i, ..., sqrt(1 - s_i^2) at 1+i)
    for i, s in enumerate(scores):
        glossary[i, 0], glossary[i, 1 + i] = s, np.sqrt(1 - s * s)
    audio = np.zeros((1, 6), dtype=np.float32)
    audio[0, 0] = 1.0
    positives = [{0}]

    ids, st = mine_hard_negatives(audio, glossary, positives, k=4)
    assert ids.tolist() == [[1, 2, 3, 4]]
    assert st["positive_scores"]["mean"] == pytest.approx(0.9, abs=1e-6)

    ids, st = mine_hard_negatives(audio, glossary, positives, k=4, exclude_top=1)
    assert ids.tolist() == [[2, 3, 4, -1]] and st["removed"]["exclude_top"] == 1

    ids, st = mine_hard_negatives(audio, glossary, positives, k=4, max_score=0.5)
    assert ids.tolist() == [[3, 4, -1, -1]] and st["removed"]["max_score"] == 2

    ids, st = mine_hard_negatives(audio, glossary, positives, k=4, absolute_margin=0.2)
    assert ids.tolist() == [[2, 3, 4, -1]] and st["removed"]["margin"] == 1     # 0.8 > 0.9 - 0.2

    ids, st = mine_hard_negatives(audio, glossary, positives, k=4, relative_margin=0.5)
    assert ids.tolist() == [[3, 4, -1, -1]] and st["removed"]["margin"] == 2    # > 0.45

    # margins need a positive: a no-term chunk keeps its nearest terms
    ids, st = mine_hard_negatives(audio, glossary, [set()], k=2, absolute_margin=0.2)
    assert ids.tolist() == [[0, 1]] and st["removed"]["margin"] == 0


def test_stats_and_format():
    rng, glossary = ladder()
    audio = unit(glossary[:4] + 0.05 * rng.normal(size=(4, 16)))
    ids, stats = mine_hard_negatives(audio, glossary, [{0}, {1}, {2}, {3}], k=3)
    assert stats["positive_scores"]["mean"] > stats["negative_scores"]["mean"]
    assert stats["negative_scores"]["n"] == 12 and stats["seconds"] >= 0
    line = format_stats(stats)
    assert "\n" not in line and line.startswith("mined 3 negatives x 4 chunks")


def test_bad_positive_id_names_the_chunk():
    _, glossary = ladder()
    with pytest.raises(ValueError, match="chunk 1"):
        mine_hard_negatives(glossary[:2], glossary, [{0}, {99}], k=2)


def test_the_mining_index_is_exact_for_small_glossaries_and_ivf_for_big_ones():
    import faiss
    from shared.index import pow2_nlist
    from stage2_train.mining import ANN_MIN_ROWS, MINE_NPROBE, ListSearch, mining_index
    rng = np.random.default_rng(0)
    small = rng.standard_normal((100, 8)).astype(np.float32)
    big = rng.standard_normal((ANN_MIN_ROWS, 8)).astype(np.float32)
    assert isinstance(mining_index(small), faiss.IndexFlat)
    ivf = mining_index(big)
    assert isinstance(ivf, ListSearch) and ivf.nprobe == MINE_NPROBE and len(ivf.offsets) - 1 == pow2_nlist(ANN_MIN_ROWS)
    assert isinstance(mining_index(big, "Flat"), faiss.IndexFlat)


def test_list_search_is_exact_when_it_probes_every_cell_and_keeps_most_of_the_top_k_with_16():
    """The grouped inverted-file search: probing all cells is an exact search (same ids and scores as
    a flat index); probing 16 of 64 cells of clustered data keeps most of the exact top 10."""
    import faiss

    from stage2_train.mining import ListSearch
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((40, 16)).astype(np.float32)
    rows = centres[rng.integers(0, 40, 6000)] + 0.3 * rng.standard_normal((6000, 16)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    queries = rows[rng.choice(6000, 300, replace=False)] + 0.1 * rng.standard_normal((300, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    flat = faiss.IndexFlatIP(16)
    flat.add(rows)
    exact_s, exact_i = flat.search(queries, 10)
    full = ListSearch(rows, nlist=64, nprobe=64)
    s, i = full.search(queries, 10)
    assert np.allclose(s, exact_s, atol=1e-5)
    assert (i == exact_i).mean() > 0.99           # ties aside, the same rows
    s16, i16 = ListSearch(rows, nlist=64, nprobe=16).search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i16, exact_i)])
    assert 0.8 < recall <= 1.0
    assert np.all(np.diff(s16, axis=1) <= 1e-6)   # best first
    # more asked than the probed cells hold: -1 ids and -inf scores fill the rest, as FAISS gives
    tiny = ListSearch(rows[:50], nlist=8, nprobe=1)
    s, i = tiny.search(queries[:5], 40)
    assert (i == -1).any() and np.all(np.isneginf(s[i == -1])) and np.all(i[i >= 0] < 50)


def test_refreshes_start_from_the_last_ones_cells(monkeypatch):
    """The second mining call on a glossary skips k-means (centroids from the first, moved one Lloyd
    step) and still finds the negatives a fresh clustering finds."""
    import faiss

    import stage2_train.mining as mining
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((30, 16)).astype(np.float32)
    gloss = centres[rng.integers(0, 30, 4000)] + 0.3 * rng.standard_normal((4000, 16)).astype(np.float32)
    gloss /= np.linalg.norm(gloss, axis=1, keepdims=True)
    audio = gloss[:200] + 0.05 * rng.standard_normal((200, 16)).astype(np.float32)
    positives = [{i} for i in range(200)]
    monkeypatch.setattr(mining, "ANN_MIN_ROWS", 1000)           # this glossary takes the inverted-file path
    cells = {}
    fresh, _ = mining.mine_hard_negatives(audio, gloss, positives, k=5, cells=cells)
    first = cells["centroids"].copy()
    from shared.index import pow2_nlist
    assert first.shape == (pow2_nlist(4000), 16)
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)

    def no_kmeans(*a, **k):
        raise AssertionError("k-means ran again")
    monkeypatch.setattr(faiss, "Kmeans", no_kmeans)
    drifted = gloss + 0.01 * rng.standard_normal(gloss.shape).astype(np.float32)
    drifted /= np.linalg.norm(drifted, axis=1, keepdims=True)
    again, _ = mining.mine_hard_negatives(audio, drifted, positives, k=5, cells=cells)
    assert not np.allclose(cells["centroids"], first)          # moved with the rows
    same = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(fresh, again)])
    assert same > 0.8 and all(i not in row for i, row in enumerate(again))
