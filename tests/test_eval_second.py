"""Eval with the run's second stage: the main figures come from its ranking, the first stage's stay beside.

The second stage here is built by hand (random matching, all of the mix on the match, none on the cosine),
so its order surely differs from the first stage's; what is checked is that eval reports exactly the
figures of second_eval's ranking of it (and its dev threshold on fused scores), and exactly the first-stage
eval's figures under "first_stage". (The synthetic cache has no distractors: glossary-size rows are checked
on the demo, not here.)"""
import json

import numpy as np
import pytest
import torch

from shared import second_stage as ss
from shared.heads import checkpoint_path
from stage2_train.train import train
from stage3_index.evaluate import evaluate, load_run, report_markdown
from tests.synthetic import build_cache
from tests.test_train import cfg_for

IGNORED = ("qps", "index_build_seconds", "out", "checkpoint_sha256")


def quiet(*_):
    pass


def _strip(rep):
    return {k: v for k, v in rep.items() if k not in IGNORED}


@pytest.fixture(scope="module")
def run_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalsecond")
    features = build_cache(root, n_terms=60, audio_top=False)
    train(cfg_for(**{"train.epochs": 2}), features, root / "run", log=quiet)
    run = root / "run"
    first_only = evaluate(run, "test", log=quiet)            # no second.pt yet: the first stage alone
    model, _, _, cache, _ = load_run(run)
    forms = json.loads((cache.root / "forms.json").read_text())
    vocab = ss.build_vocab({"phones": forms["glossary"]["phones"]})
    from stage2_train.data import SplitData
    data = SplitData(cache, "dev")
    audio_dim = ss.tower_frames(model.audio, data.audio.items([0]))[0].shape[1]
    spec = ss.spec_of(audio_dim, vocab, 16, "monotonic", 32, 8)
    torch.manual_seed(0)
    module = ss.build(spec)
    with torch.no_grad():
        module.mix.copy_(torch.tensor([0.0, 1.0]))        # the match alone: another order than the cosine's
    ss.save(module, spec, run / ss.CHECKPOINT, {"first_stage": ss.first_stage_id(checkpoint_path(run))})
    return run, first_only


def test_second_stage_ranks_and_first_stage_figures_stay_beside(run_pair):
    run, first_only = run_pair
    from stage3_index.second_eval import dev_threshold_of, figures_of, second_ranking, split_view
    rep = evaluate(run, "test", log=quiet)
    assert rep["second_stage"] is True and first_only["second_stage"] is False
    fs = rep["first_stage"]
    # the first stage's figures are the first-stage-only eval's, exactly
    assert fs["recall"] == first_only["recall"] and fs["recall_unseen"] == first_only["recall_unseen"]
    assert fs["rejection"] == first_only["rejection"]
    # the main figures are second_eval's ranking of the same second stage, threshold on dev's fused scores
    model, _, run_cfg, own, _ = load_run(run)
    rr = ss.Reranker.load(run)
    dev = split_view(model, own, own, "dev", 30, run_cfg.train.limit, rr)
    threshold = dev_threshold_of(dev, *second_ranking(dev, rr), run_cfg.eval.keep_hits)
    view = split_view(model, own, own, "test", 30, run_cfg.train.limit, rr)
    want = figures_of(view, *second_ranking(view, rr), threshold)
    assert rep["recall"]["1"] == pytest.approx(want["r1"]) and rep["recall"]["10"] == pytest.approx(want["r10"])
    assert rep["recall_unseen"]["1"] == pytest.approx(want["unseen_r1"])
    assert rep["rejection"]["threshold"] == pytest.approx(threshold)
    assert rep["rejection"]["far"] == pytest.approx(want["far"])
    assert rep["rejection"]["recall_at_threshold"] == pytest.approx(want["accepted"])
    # and they are not the first stage's: a match-only mix re-orders
    assert rep["recall"] != first_only["recall"] or rep["rejection"]["threshold"] != first_only["rejection"]["threshold"]
    md = report_markdown(rep, "run")
    assert "first stage alone: all" in md and "| first stage alone |" in md


def test_no_second_gives_the_first_stage_alone(run_pair):
    run, first_only = run_pair
    off = evaluate(run, "test", second=False, log=quiet)
    also_off = evaluate(run, "test", overrides=["second.enabled=false"], log=quiet)
    assert _strip(off) == _strip(first_only) == _strip(also_off)
