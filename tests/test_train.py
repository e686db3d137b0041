"""Stage 2 on a synthetic cache: it learns, logs, resumes exactly, and DDP equals one process."""
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from shared.config import load_config
from shared.errors import BadInput
from shared.heads import load_model
from stage2_train.data import global_batches
from stage2_train.train import Trainer, train
from tests.synthetic import build_cache


def cfg_for(**over):
    sets = {"train.epochs": 3, "train.batch_size": 32, "train.lr": 3e-3, "train.top_lr": 1e-3,
            "train.warmup_steps": 3, "train.hard_refresh": 4, "train.hard_k": 4, "train.proj_dim": 16,
            "train.in_memory": "yes", **over}
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return build_cache(tmp_path_factory.mktemp("syn"))


def test_batches_are_deterministic_and_deduplicated():
    terms = [[i % 5] for i in range(40)] + [[]] * 5
    a = global_batches(terms, len(terms), 8, seed=1, epoch=2)
    assert [b.tolist() for b in a] == [b.tolist() for b in global_batches(terms, len(terms), 8, 1, 2)]
    assert sorted(np.concatenate(a).tolist()) == list(range(len(terms)))
    for b in a:
        flat = [t for i in b for t in terms[i]]
        assert len(flat) == len(set(flat))


def test_training_learns_and_writes_the_run(features, tmp_path):
    run = tmp_path / "run"
    tr = train(cfg_for(), features, run, log=quiet)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x["type"] == "step"]
    evals = [x for x in lines if x["type"] == "eval"]
    assert len(evals) == 3 and len(steps) == tr.total_steps
    for key in ("audio_text", "audio_term", "reject", "hard", "total", "lr"):
        assert key in steps[-1]
    assert steps[-1]["hard"] > 0                       # hard negatives were mined and used
    assert evals[-1]["dev_r5"] > 0.5                   # chance is 5/40
    assert np.mean([s["audio_term"] for s in steps[-5:]]) < np.mean([s["audio_term"] for s in steps[:5]])
    ckpt = torch.load(run / "best.pt", weights_only=False)
    assert all(k.startswith(("audio.", "text.", "log_scale")) for k in ckpt["model"])
    assert any(".top.layers.0." in k for k in ckpt["model"])    # the unfrozen top layer was trained
    model, _ = load_model(run / "best.pt")
    assert model.audio.proj.out_features == 16
    assert json.loads((run / "config.json").read_text())["train"]["batch_size"] == 32
    with pytest.raises(BadInput, match="already holds a run"):
        train(cfg_for(), features, run, log=quiet)


def test_other_weights_make_a_separate_run(features, tmp_path):
    a = train(cfg_for(**{"train.epochs": 1}), features, tmp_path / "a", log=quiet)
    b = train(cfg_for(**{"train.epochs": 1, "loss.w_term": 0.9}), features, tmp_path / "b", log=quiet)
    assert (tmp_path / "a/best.pt").is_file() and (tmp_path / "b/best.pt").is_file()
    pa = a.model.state_dict()["audio.proj.weight"]
    assert not torch.equal(pa, b.model.state_dict()["audio.proj.weight"])


def test_resume_equals_uninterrupted(features, tmp_path):
    cfg = cfg_for(**{"train.epochs": 2})
    full = train(cfg, features, tmp_path / "full", log=quiet)
    part = Trainer(cfg, features, tmp_path / "part", log=quiet)
    part.fit(stop_after=part.steps_per_epoch + 2)        # killed mid-epoch 2, after the epoch-1 checkpoint
    assert not (tmp_path / "part/finished.json").exists()  # `make eval` would train it on first
    resumed = train(cfg, features, tmp_path / "part", resume=True, log=quiet)
    done = json.loads((tmp_path / "part/finished.json").read_text())
    assert done["steps"] == resumed.state["step"] == full.state["step"] and done["checkpoint"] == "best.pt"
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=0)
    a = (tmp_path / "full/metrics.jsonl").read_text()
    b = (tmp_path / "part/metrics.jsonl").read_text()
    assert a == b


def test_refuses_a_different_cache(features, tmp_path):
    cfg = cfg_for(**{"train.epochs": 1})
    train(cfg, features, tmp_path / "r", log=quiet)
    other = build_cache(tmp_path / "other", seed=1)
    with pytest.raises(BadInput, match="different feature cache"):
        train(cfg, other, tmp_path / "r", resume=True, log=quiet)


def _ddp_worker(rank, world, port, features, out, batch):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    cfg = cfg_for(**{"train.batch_size": batch, "train.epochs": 1})
    tr = Trainer(cfg, features, out / f"rank{rank}", log=quiet)
    tr.step(global_batches(tr.train_data.terms, len(tr.train_data), tr.batch_global, 0, 0)[0])
    if rank == 0:
        torch.save(tr.model.state_dict(), out / "ddp.pt")
    torch.distributed.destroy_process_group()


def test_two_ranks_of_b_equal_one_rank_of_2b(features, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, features, tmp_path, 16), nprocs=2, join=True)
    single = Trainer(cfg_for(**{"train.batch_size": 32, "train.epochs": 1}), features, tmp_path / "one", log=quiet)
    single.step(global_batches(single.train_data.terms, len(single.train_data), 32, 0, 0)[0])
    ddp = torch.load(tmp_path / "ddp.pt")
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=1e-5)


def test_hard_negatives_can_come_from_train_terms_only(features, tmp_path):
    tr = Trainer(cfg_for(**{"train.mine_from": "train", "train.epochs": 1}), features, tmp_path / "run", log=quiet)
    tr.fit(stop_after=5)
    tr.refresh_hard_negatives()
    trained = {t for ts in tr.train_data.terms for t in ts}
    mined = tr.hard[tr.seen]
    assert (mined >= 0).any()
    assert {int(tr.owner[r]) for r in mined[mined >= 0]} <= trained       # no dev/test-only term's form
    for i in np.flatnonzero(tr.seen):                                      # never a chunk's own term
        assert not set(tr.owner[tr.hard[i][tr.hard[i] >= 0]].tolist()) & set(tr.train_data.terms[i])
