"""The bench's pure helpers: synthetic data, recall, scaling, shares, the FLOPs calculation, the table."""
import math

import numpy as np
import pytest

from bench.common import (QWEN2_AUDIO_LM, QWEN2_AUDIO_TOWER, clustered_vectors, flops_table, lm_flops,
                          perturbed_queries, pooled_cosines, recall_vs_exact, refresh_share, scaled_seconds,
                          tower_flops)
from bench.mining import synthetic_glossary
from bench.report import format_table, target_met


def test_clustered_vectors_are_clustered_and_normalised():
    x, labels = clustered_vectors(2000, 64, n_clusters=20, spread=1.0, seed=0, block=300)
    assert x.shape == (2000, 64) and x.dtype == np.float32
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    same = labels[:, None] == labels[None, :]
    sims = x @ x.T
    assert sims[same & ~np.eye(2000, dtype=bool)].mean() > 0.4 > 0.1 > abs(sims[~same].mean())
    again, _ = clustered_vectors(2000, 64, n_clusters=20, spread=1.0, seed=0, block=2000)
    assert np.array_equal(x, again)  # the block size does not change the data


def test_queries_stay_near_their_source():
    x, _ = clustered_vectors(500, 32, 5, 1.0, seed=1)
    q = perturbed_queries(x, 50, noise=0.5, seed=2)
    assert np.allclose(np.linalg.norm(q, axis=1), 1, atol=1e-5)
    assert (q @ x.T).max(axis=1).min() > 0.8


def test_recall_vs_exact():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    assert recall_vs_exact(exact, exact) == 1.0
    assert recall_vs_exact(np.array([[3, 9, 1], [7, 8, 9]]), exact) == pytest.approx(2 / 6)
    assert recall_vs_exact(np.array([[1, -1, -1], [4, 5, 6]]), np.array([[1, -1, -1], [4, 5, 6]])) == 1.0


def test_pooled_cosines():
    a = [np.array([[1.0, 0.0], [1.0, 2.0]]), np.array([[0.0, 1.0]])]
    b = [np.array([[2.0, 2.0]]), np.array([[1.0, 0.0], [1.0, 0.0]])]
    assert pooled_cosines(a, b) == pytest.approx([1.0, 0.0])
    with pytest.raises(ValueError):
        pooled_cosines(a, b[:1])


def test_scaling_and_shares():
    assert scaled_seconds(10.0, 128, 3840) == pytest.approx(300.0)
    with pytest.raises(ValueError):
        scaled_seconds(1.0, 0, 10)
    assert refresh_share(5.0, 0.5, 100) == pytest.approx(5 / 55)
    from shared.index import pow2_nlist
    assert pow2_nlist(100_000) == 256 and pow2_nlist(1_000_000) == 1024 and pow2_nlist(100) == 16


def test_synthetic_glossary():
    g = synthetic_glossary(100, 384, seed=0)
    assert len(g) == 100 and all(x.dtype == np.float16 and x.shape[1] == 384 and 3 <= len(x) <= 8 for x in g)


def test_tower_flops_by_hand():
    # one layer, d=2, ffn=4, 1 mel bin, 2 positions (padded = 4 mel frames, 2 frames after conv2)
    cfg = dict(layers=1, d_model=2, ffn=4, mels=1, positions=2)
    conv = 2 * 4 * 1 * 2 * 3 + 2 * 2 * 2 * 2 * 3
    assert tower_flops(0.01, True, **cfg) == conv + 2 * (8 * 4 + 4 * 2 * 4 + 4 * 2 * 2)
    # true length 0.01 s = 1 mel frame -> 1 frame after conv2
    assert tower_flops(0.01, False, **cfg) == 2 * 1 * 1 * 2 * 3 + 2 * 1 * 2 * 2 * 3 + (8 * 4 + 4 * 2 * 4 + 4 * 1 * 2)
    assert lm_flops(1, layers=1, hidden=2, ffn=3) == 8 * 4 + 6 * 2 * 3 + 4 * 2


def test_qwen2_audio_padding_costs():
    padded = tower_flops(1.0, True, **QWEN2_AUDIO_TOWER)
    assert 2.2e12 < padded < 2.4e12                                   # ~2.3 TFLOP per 30 s window
    assert tower_flops(3.0, True, **QWEN2_AUDIO_TOWER) == padded      # whatever the chunk's length
    rows = {r["seconds"]: r for r in flops_table()}
    assert rows[1.0]["tower_ratio"] > 30 and 10 < rows[3.0]["tower_ratio"] < 13
    assert math.isclose(rows[2.0]["tower_true_gflop_per_audio_s"], rows[1.0]["tower_true_gflop_per_audio_s"],
                        rel_tol=0.05)                                 # true length: ~constant per second
    assert lm_flops(25, **QWEN2_AUDIO_LM) > 5 * tower_flops(1.0, False, **QWEN2_AUDIO_TOWER)


def test_targets_and_table():
    report = {
        "extract": {"seed_seconds": 60.0, "ours_seconds": 3.0, "speedup": 20.0, "min_cosine": 0.999},
        "train": {"online_seconds": 1000.0, "cached_seconds": 30.0, "speedup": 33.3},
        "loader": {"zarr": {"raw_mb_s": 3000.0, "loader_mb_s": 2000.0, "fraction": 0.67},
                   "hdf5": {"raw_mb_s": 3000.0, "loader_mb_s": 1000.0, "fraction": 0.33}},
        "mining": {"glossary_size": 100000, "refresh_seconds": 4.0, "fraction_of_train": 0.07},
        "index": {"100000": {"flat_qps": 900.0, "ann_qps": 9000.0, "ann_recall_at_10_vs_flat": 0.99,
                             "build_seconds": 3.0},
                  "1000000": {"flat_qps": 90.0, "ann_qps": 4000.0, "ann_recall_at_10_vs_flat": 0.96,
                              "build_seconds": 60.0}},
        "memory": {"peak_rss_mb_n": 900.0, "peak_rss_mb_4n": 980.0},
        "stream": {"window_ms_p50": 60.0, "window_ms_p95": 300.0, "real_time_factor": 0.07},
    }
    met = {p: target_met(p, r) for p, r in report.items()}
    assert met == {"extract": True, "train": False, "loader": False, "mining": True, "index": True, "memory": True,
                   "stream": False}
    table = format_table(report, {"train": {"online_estimated": True, "online_batches": 1},
                                  "stream": {"glossary_terms": 10914, "audio_seconds": 60.0, "block_ms": 20}})
    assert "estimated from 1 batches" in table and table.count("NO") == 3
    assert "10,914 terms" in table and "p95 300 ms" in table
    assert target_met("stream", {"window_ms_p50": 30.0, "window_ms_p95": 200.0, "real_time_factor": 0.05})
    assert not target_met("memory", {"peak_rss_mb_n": 600.0, "peak_rss_mb_4n": 700.0})
