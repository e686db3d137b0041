"""The ablation: variants read from TOML, rows from dev/test/held-out reports, the pick made on dev only,
the seeds of the pick and the base, --only keeping the other rows; and one tiny real run end to end."""
import json
import shutil

import pytest

import stage1_extract.extract as extract_mod
import stage2_train.train as train_mod
import stage3_index.evaluate as evaluate_mod
from shared.config import save_config
from shared.errors import BadInput
from stage3_index.ablation import (Variant, ablation, make_row, pick, read_variants, seed_summary,
                                   split_figures, table_markdown)
from stage3_index.compare import compare


def quiet(*_):
    pass


def test_variants_are_read_in_file_order_and_checked(tmp_path):
    p = tmp_path / "v.toml"
    p.write_text('[b]\nset = ["text.encoders=lm"]\n["a+c"]\nset = []\npick = false\n')
    assert read_variants(p) == {"b": Variant(["text.encoders=lm"], True), "a+c": Variant([], False)}
    for text, msg in (('[b]\nset = ["no equals sign"]\n', "variant 'b'"),
                      ('[b]\nset = []\npick = "no"\n', "give true or false"),
                      ('[b]\nset = []\nseeds = 3\n', "unknown key 'seeds'"),
                      ('["a/b"]\nset = []\n', "no slashes")):
        p.write_text(text)
        with pytest.raises(BadInput, match=msg):
            read_variants(p)
    with pytest.raises(BadInput, match="does not exist"):
        read_variants(tmp_path / "missing.toml")


def test_the_shipped_variants_mine_from_train_terms_but_the_one_row_that_shows_the_leak():
    variants = read_variants("configs/ablation/variants.toml")
    leaky = [n for n, v in variants.items() if any(s.replace(" ", "") == "train.mine_from=all" for s in v.sets)]
    assert len(leaky) <= 1 and all(not variants[n].candidate and "mine-all" in n for n in leaky)
    assert any(not v.sets for v in variants.values())                  # the base: the config as it is


def report(r1, r10, unseen_r1, unseen_r10, big_r10, fused=None):
    """An eval report (the keys evaluate writes) with the figures the table reads."""
    return {"recall": {"1": r1, "5": (r1 + r10) / 2, "10": r10}, "recall_seen": {"10": 0.99},
            "recall_unseen": {"1": unseen_r1, "10": unseen_r10}, "rejection": {"auroc": 0.95, "threshold": None},
            "by_glossary_size": {"1000": {"recall": {"10": 0.9}}, "10000": {"recall": {"10": big_r10}}},
            "baseline": {"recall": {"10": 0.4}}, "fused": fused, "queries": 30, "unseen_queries": 9}


def test_pick_reads_dev_only_and_breaks_ties_in_rule_order():
    def row(name, dev, test, candidate=True):
        return {"variant": name, "seed": 0, "candidate": candidate, "dev": split_figures(dev),
                "test": split_figures(test)}
    a = row("a", report(0.5, 0.80, 0.3, 0.6, 0.7), report(0.9, 0.99, 0.9, 0.99, 0.9))
    b = row("b", report(0.4, 0.85, 0.2, 0.5, 0.6), report(0.1, 0.20, 0.1, 0.20, 0.1))
    assert pick([a, b]) == "b"                                   # test would say a
    c = row("c", report(0.1, 0.85, 0.2, 0.7, 0.6), None)
    assert pick([a, b, c]) == "c"                                # dev R@10 ties: dev unseen R@10 decides
    d = row("d", report(0.1, 0.85, 0.2, 0.7, 0.6), None)
    assert pick([a, b, c, d]) == "c"                             # an exact tie keeps the earlier row
    leak = row("leak", report(0.9, 0.99, 0.9, 0.99, 0.9), None, candidate=False)
    no_dev = row("no_dev", None, report(1.0, 1.0, 1.0, 1.0, 1.0))
    assert pick([a, leak, no_dev]) == "a" and pick([leak, no_dev]) is None


def test_seed_summary_is_mean_min_max_over_the_runs():
    rows = [{"seed": s, "dev": {"r10": v, "r1": None}, "test": {"r10": 1 - v}}
            for s, v in ((0, 0.8), (1, 0.9), (2, 0.7))]
    s = seed_summary(rows, splits=("dev", "test"), figs=("r10", "r1"))
    assert s["seeds"] == [0, 1, 2] and s["dev"]["r1"] is None
    assert s["dev"]["r10"] == pytest.approx({"mean": 0.8, "min": 0.7, "max": 0.9, "n": 3})
    assert s["test"]["r10"] == pytest.approx({"mean": 0.2, "min": 0.1, "max": 0.3, "n": 3})


# the stubbed ablation: dev says b, test and held-out say a; c (the leak) is best of all on dev, not a candidate
FIGS = {   # (variant, seed) -> split -> (R@1, R@10, unseen R@1, unseen R@10, 10k R@10)
    ("a", 0): {"dev": (0.50, 0.80, 0.30, 0.60, 0.70), "test": (0.70, 0.95, 0.60, 0.90, 0.85),
               "heldout": (0.6, 0.93, 0.5, 0.9, 0.8)},
    ("b", 0): {"dev": (0.55, 0.85, 0.35, 0.65, 0.75), "test": (0.40, 0.70, 0.30, 0.50, 0.60),
               "heldout": (0.3, 0.60, 0.2, 0.4, 0.5)},
    ("c", 0): {"dev": (0.90, 0.99, 0.90, 0.99, 0.99), "test": (0.10, 0.20, 0.10, 0.20, 0.10),
               "heldout": (0.1, 0.20, 0.1, 0.2, 0.1)},
    ("a", 1): {"dev": (0.52, 0.78, 0.31, 0.58, 0.71), "test": (0.71, 0.94, 0.61, 0.89, 0.84),
               "heldout": (0.6, 0.92, 0.5, 0.9, 0.8)},
    ("a", 2): {"dev": (0.48, 0.82, 0.29, 0.62, 0.69), "test": (0.69, 0.96, 0.59, 0.91, 0.86),
               "heldout": (0.6, 0.94, 0.5, 0.9, 0.8)},
    ("b", 1): {"dev": (0.57, 0.80, 0.37, 0.61, 0.77), "test": (0.42, 0.72, 0.32, 0.52, 0.62),
               "heldout": (0.3, 0.62, 0.2, 0.4, 0.5)},
    ("b", 2): {"dev": (0.53, 0.90, 0.33, 0.69, 0.73), "test": (0.38, 0.68, 0.28, 0.48, 0.58),
               "heldout": (0.3, 0.58, 0.2, 0.4, 0.5)},
}


@pytest.fixture
def stubbed(tmp_path, monkeypatch):
    """train writes the run's config and nothing else; evaluate answers FIGS by run folder and split."""
    trained, evaluated = [], []

    def fake_train(cfg, features=None, run=None, resume=False, log=print, stop_after=None):
        run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / "config.json")
        trained.append((run.name, cfg.train.seed))

    def fake_evaluate(run, split=None, *, features=None, log=print, **_):
        name, _, seed = run.name.partition(".seed")
        evaluated.append((run.name, split, features))
        return report(*FIGS[(name, int(seed or 0))][split])

    monkeypatch.setattr(train_mod, "train", fake_train)
    monkeypatch.setattr(evaluate_mod, "evaluate", fake_evaluate)
    monkeypatch.setattr(extract_mod, "extract", lambda cfg, log=print, **_: None)
    monkeypatch.setattr(extract_mod, "features_dir", lambda cfg: tmp_path / "features")
    variants = {"a": Variant([]), "b": Variant(["train.lr=0.002"]), "c": Variant(["train.mine_from=all"], False)}
    kw = dict(runs=tmp_path / "runs", out=tmp_path / "out", heldout=[(str(tmp_path / "other"), "heldout")], log=quiet)
    return variants, kw, trained, evaluated


def test_the_pick_follows_dev_and_the_pick_and_base_get_their_seeds(stubbed, tmp_path):
    variants, kw, trained, evaluated = stubbed
    rows = ablation(None, variants, ["train.epochs=1"], seeds=3, **kw)
    # seed 0 of every variant, then seeds 1 and 2 of the pick (b, by dev) and the base (a, no overrides)
    assert trained == [("a", 0), ("b", 0), ("c", 0), ("b.seed1", 1), ("b.seed2", 2), ("a.seed1", 1), ("a.seed2", 2)]
    assert {(r, s) for r, s, _ in evaluated} >= {(r, s) for r, _ in trained for s in ("dev", "test", "heldout")}
    data = json.loads((tmp_path / "out/ablation.json").read_text())
    assert data["picked"] == "b" and data["base"] == "a" and len(data["rows"]) == len(rows) == 7
    row_b = next(r for r in rows if r["variant"] == "b" and r["seed"] == 0)
    assert row_b["dev"]["r10"] == 0.85 and row_b["test"]["r10"] == 0.70 and row_b["heldout"]["r10"] == 0.60
    assert row_b["dev"]["unseen_r1"] == 0.35 and row_b["dev"]["glossary_r10"] == 0.75
    b = data["summary"]["b"]
    assert b["seeds"] == [0, 1, 2]
    assert b["dev"]["r10"] == pytest.approx({"mean": 0.85, "min": 0.80, "max": 0.90, "n": 3})
    assert b["test"]["r1"] == pytest.approx({"mean": 0.40, "min": 0.38, "max": 0.42, "n": 3})
    assert data["summary"]["a"]["dev"]["r10"] == pytest.approx({"mean": 0.80, "min": 0.78, "max": 0.82, "n": 3})
    md = (tmp_path / "out/ablation.md").read_text()
    lines = md.splitlines()
    row = next(ln for ln in lines if ln.startswith("| **b** (picked) |"))
    assert row.split(" | ")[1:6] == ["0.550", "0.850", "0.350", "0.650", "0.750"]    # dev, read from dev
    assert any(ln.startswith("| c (shown only) |") for ln in lines)
    assert "glossary 10k R@10" in md
    assert "| b (picked) | 0,1,2 | 0.550 (0.530-0.570) | 0.850 (0.800-0.900) |" in md
    assert "| a (base) | 0,1,2 |" in md and "Dev R@10, b minus a: +0.050" in md and "within seed noise" in md
    first_table = [ln for ln in lines if ln.startswith("|")][:6]
    assert len({ln.count("|") for ln in first_table}) == 1                            # every row fills every column


def test_only_reruns_its_rows_keeps_the_others_and_refuses_a_stale_run(stubbed, tmp_path):
    variants, kw, trained, evaluated = stubbed
    ablation(None, variants, ["train.epochs=1"], seeds=1, **kw)
    assert trained == [("a", 0), ("b", 0), ("c", 0)]                  # --seeds 1: no seed runs
    assert "fewer than 2 seeds" in (tmp_path / "out/ablation.md").read_text()
    trained.clear()
    evaluated.clear()
    rows = ablation(None, variants, ["train.epochs=1"], seeds=1, only=["c"], **kw)
    assert trained == [] and {r for r, _, _ in evaluated} == {"c"}      # finished: only re-evaluated
    assert [r["variant"] for r in rows] == ["a", "b", "c"]
    assert json.loads((tmp_path / "out/ablation.json").read_text())["picked"] == "b"
    # b redefined: its stored row is dropped and its old run is refused rather than reused
    redefined = {**variants, "b": Variant(["train.lr=0.003"])}
    rows = ablation(None, redefined, ["train.epochs=1"], seeds=1, only=["a"], **kw)
    assert [r["variant"] for r in rows] == ["a", "c"]
    with pytest.raises(BadInput, match="train.lr"):
        ablation(None, redefined, ["train.epochs=1"], seeds=1, only=["b"], **kw)
    with pytest.raises(BadInput, match="no variant 'z'"):
        ablation(None, variants, seeds=1, only=["z"], **kw)


def test_table_without_dev_figures_picks_nothing():
    row = make_row("a", Variant([]), [], 0, None, report(0.7, 0.9, 0.6, 0.8, 0.8), None, 12.0)
    md = table_markdown([row], 1, "a")
    assert "No variant picked" in md and "| a | - | - | - | - | - |" in md


def test_compare_reads_dev_by_default(tmp_path):
    for name, (dev_r1, test_r1) in {"x": (0.25, 0.75), "y": (0.5, 0.125)}.items():
        run = tmp_path / name
        for split, r1 in (("dev", dev_r1), ("test", test_r1)):
            (run / "eval" / split).mkdir(parents=True)
            (run / "eval" / split / "report.json").write_text(json.dumps(report(r1, 0.9, 0.1, 0.5, 0.8)))
        (run / "config.json").write_text(json.dumps({"train": {"lr": 0.001 if name == "x" else 0.002}}))
    dev = compare([tmp_path / "x", tmp_path / "y"], None, log=quiet)
    assert dev.startswith("Split dev") and "| x | 0.001 | 0.250 |" in dev and "| y | 0.002 | 0.500 |" in dev
    test = compare([tmp_path / "x", tmp_path / "y"], None, log=quiet, split="test")
    assert "| x | 0.001 | 0.750 |" in test


def test_a_tiny_real_ablation(tmp_path):
    """Real training and evaluation on the synthetic cache (one variant, two seeds: the stubs above test
    the pick): the dev figures come from RUN/eval/dev, which has no threshold; seed 1 trains beside seed 0."""
    from tests.synthetic import build_cache
    built = build_cache(tmp_path / "syn", n_terms=30, n_train=96, n_dev=24, n_test=24, audio_top=False)
    shutil.move(str(built), str(tmp_path / "features" / "syn"))
    base = ["cache.root=" + str(tmp_path), "cache.name=syn", "train.epochs=1", "train.batch_size=32",
            "train.proj_dim=16", "train.hard_k=4", "train.hard_refresh=2", "train.in_memory=yes",
            "eval.glossary_sizes=20"]
    rows = ablation(None, {"base": Variant([])}, base, runs=tmp_path / "runs", out=tmp_path / "out", seeds=2,
                    log=quiet)
    assert [(r["variant"], r["seed"]) for r in rows] == [("base", 0), ("base", 1)]
    for r, run in zip(rows, ("base", "base.seed1")):
        run = tmp_path / "runs" / run
        dev = json.loads((run / "eval/dev/report.json").read_text())
        test = json.loads((run / "eval/test/report.json").read_text())
        assert r["dev"]["r10"] == dev["recall"]["10"] and r["test"]["r10"] == test["recall"]["10"]
        assert dev["rejection"]["threshold"] is None
        assert json.loads((run / "config.json").read_text())["train"]["seed"] == r["seed"]
    s = json.loads((tmp_path / "out/ablation.json").read_text())["summary"]["base"]
    assert s["dev"]["r1"]["mean"] == pytest.approx((rows[0]["dev"]["r1"] + rows[1]["dev"]["r1"]) / 2)
