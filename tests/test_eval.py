"""Stage 3 on a run trained on the synthetic cache: report keys, reuse, compare; metric answers."""
import json

import numpy as np
import pytest

from stage2_train.train import train
from stage3_index.compare import compare
from stage3_index.evaluate import evaluate
from shared.index import build_index, search
from tests.synthetic import build_cache
from tests.test_train import cfg_for


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    features = build_cache(root, n_terms=60)
    a = train(cfg_for(**{"train.epochs": 5, "eval.glossary_sizes": "20,40"}), features, root / "a", log=quiet)
    b = train(cfg_for(**{"train.epochs": 1, "loss.w_term": 0.9}), features, root / "b", log=quiet)
    return root / "a", root / "b"


def test_report_has_the_promised_keys_and_sane_values(runs):
    run, _ = runs
    rep = evaluate(run, log=quiet)
    on_disk = json.loads((run / "eval/test/report.json").read_text())
    assert set(on_disk) == {"recall", "recall_seen", "recall_unseen", "recall_unseen_strict", "by_glossary_size",
                            "rejection", "queries", "glossary_size", "qps", "baseline", "fused",
                            "second_stage", "first_stage"}
    assert json.loads(json.dumps({k: rep[k] for k in on_disk})) == on_disk
    assert set(rep["recall"]) == {"1", "5", "10"}
    assert set(rep["rejection"]) >= {"auroc", "auroc_top1_correct", "threshold", "far", "recall_at_threshold"}
    assert rep["glossary_size"] == 60 and rep["unseen_queries"] > 0 and rep["seen_queries"] > 0
    assert rep["recall"]["1"] <= rep["recall"]["5"] <= rep["recall"]["10"]
    assert rep["recall"]["5"] > 0.3                        # chance is 5/60
    # the synthetic cache has neither distractors nor transcripts: no size rows, no baseline
    assert rep["by_glossary_size"] == {} and rep["baseline"] is None and rep["fused"] is None
    for name in ("report.md", "recall_at_k.png", "max_scores.png", "glossary.index"):
        assert (run / "eval/test" / name).is_file()
    assert "| seen terms |" in (run / "eval/test/report.md").read_text()


def test_rerun_reuses_the_index_and_gives_the_same_report(runs):
    run, _ = runs
    first = evaluate(run, log=quiet)
    logs = []
    again = evaluate(run, log=logs.append)
    assert any("reusing the glossary index" in m for m in logs)
    assert {k: v for k, v in again.items() if k not in ("qps", "index_build_seconds")} == \
        {k: v for k, v in first.items() if k not in ("qps", "index_build_seconds")}


def test_compare_shows_config_differences(runs, tmp_path):
    a, b = runs
    evaluate(b, "dev", log=quiet)                          # compare reads dev reports unless told otherwise
    table = compare([a, b], tmp_path, log=quiet)
    assert "loss.w_term" in table and "train.epochs" in table and "recall.5" in table
    assert (tmp_path / "compare.png").is_file()


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF16,Flat"])
def test_index_factories_find_exact_neighbours(factory):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = build_index(x, factory)
    scores, ids = search(index, x[:50], 3)
    assert (ids[:, 0] == np.arange(50)).mean() >= 0.95
    np.testing.assert_allclose(scores[ids[:, 0] == np.arange(50), 0], 1.0, atol=1e-4)
