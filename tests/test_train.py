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


def test_batches_are_deterministic_full_and_capped():
    terms = [[i % 9] for i in range(40)] + [[]] * 5 + [[1, 2]] * 3        # 48 items, 6 batches of 8
    a = global_batches(terms, len(terms), 8, seed=1, epoch=2)
    assert [b.tolist() for b in a] == [b.tolist() for b in global_batches(terms, len(terms), 8, 1, 2)]
    assert [b.tolist() for b in a] != [b.tolist() for b in global_batches(terms, len(terms), 8, 1, 3)]
    assert sorted(np.concatenate(a).tolist()) == list(range(len(terms)))
    assert [len(b) for b in a] == [8] * 6
    for b in a:                                   # terms 3..8 have 4-5 items <= 6 batches: never repeated
        flat = [t for i in b for t in terms[i] if t >= 3]
        assert len(flat) == len(set(flat))
    assert [len(b) for b in global_batches(terms, 45, 8, 1, 2)] == [8] * 5 + [5]   # only the last is short
    assert [len(b) for b in global_batches(terms, 45, 8, 1, 2, term_cap=0)] == [8] * 5 + [5]


def test_sampler_on_zipf_terms_makes_full_batches_and_keeps_the_cap_where_possible():
    """20,000 chunks over 2,000 Zipf-distributed terms (10% no-term, some with two terms), batch 128."""
    from collections import Counter
    rng = np.random.default_rng(0)
    n, n_terms, B = 20000, 2000, 128
    p = 1 / np.arange(1, n_terms + 1)
    p /= p.sum()
    terms = [[int(rng.choice(n_terms, p=p))] if rng.random() > 0.1 else [] for _ in range(n)]
    for i in range(0, n, 7):
        if terms[i]:
            terms[i].append(int(rng.integers(n_terms)))
    for cap in (1, 2):
        stats = {}
        batches = global_batches(terms, n, B, seed=0, epoch=0, term_cap=cap, stats=stats)
        assert abs(len(batches) - -(-n // B)) <= 0.05 * -(-n // B)
        assert all(len(b) == B for b in batches[:-1]) and 0 < len(batches[-1]) <= B
        assert sorted(np.concatenate(batches).tolist()) == list(range(n))
        freq = Counter(t for ts in terms for t in ts)
        for b in batches:
            for t, k in Counter(t for i in b for t in terms[i]).items():
                if freq[t] <= len(batches) * cap:          # the cap is possible for this term: kept
                    assert k <= cap, (t, k, freq[t])
        assert stats["overflow"] > 0                      # the head terms cannot keep it


def test_the_trainer_says_once_when_the_term_cap_cannot_be_kept(features, tmp_path):
    said = []
    Trainer(cfg_for(**{"train.batch_size": 80}), features, tmp_path / "a", log=said.append)   # 2 batches
    assert len([m for m in said if "train.term_cap 1 not kept for" in m]) == 1, said
    said.clear()
    Trainer(cfg_for(**{"train.batch_size": 8}), features, tmp_path / "b", log=said.append)    # 20 batches
    assert not [m for m in said if "term_cap" in m], said


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Global batches of 32 (2 ranks x 16). 70 train chunks: 32, 32, 6 -> in the last step rank 0 has 6 items
# and rank 1 none. 86 chunks: 32, 32, 22 -> rank 0 a full slice, rank 1 a short one (6).
RAGGED = {"train.batch_size": 16, "train.epochs": 1}
LAST_SLICES = {70: [6, 0], 86: [16, 6]}


def _ddp_worker(rank, world, port, features, out, over):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from stage2_train.distributed import slice_sizes
    for limit, last in LAST_SLICES.items():
        tr = Trainer(cfg_for(**over, **{"train.limit": limit}), features, out / f"rank{rank}-{limit}", log=quiet)
        batches = tr.batches(0)
        assert [len(b) for b in batches] == [32, 32, limit - 64]
        assert slice_sizes(len(batches[-1]), 16, world) == last
        for b in batches:
            tr.step(b)
        if rank == 0:
            torch.save(tr.model.state_dict(), out / f"ddp-{limit}.pt")
    torch.distributed.destroy_process_group()


def test_two_ranks_over_a_ragged_epoch_equal_one_rank_of_2b(features, tmp_path):
    """Whole epochs whose last batch leaves rank 1 nothing, or less than rank 0: the same parameters as one
    process with the global batch."""
    mp.spawn(_ddp_worker, args=(2, _free_port(), features, tmp_path, RAGGED), nprocs=2, join=True)
    for limit in LAST_SLICES:
        single = Trainer(cfg_for(**{**RAGGED, "train.limit": limit, "train.batch_size": 32}), features,
                         tmp_path / f"one-{limit}", log=quiet)
        for b in single.batches(0):
            single.step(b)
        ddp = torch.load(tmp_path / f"ddp-{limit}.pt")
        for k, v in single.model.state_dict().items():
            torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"limit {limit}, {k}: {m}")


def test_slice_sizes_and_single_process_gather():
    from stage2_train.distributed import gather_rows, slice_sizes
    assert slice_sizes(70, 16, 2) == [16, 16] and slice_sizes(6, 16, 2) == [6, 0] and slice_sizes(0, 4, 3) == [0, 0, 0]
    x = torch.randn(5, 3)
    assert gather_rows(x, [5], 8) is x


def test_hard_negatives_come_from_the_trained_chunks_terms_only(features, tmp_path):
    """mine_from=train with train.limit 60: negatives are terms of the first 60 train chunks (read from the
    manifest here), never a term that only later train chunks, dev or test hold: what eval calls seen."""
    from shared.manifest import read_chunks
    from stage3_index.evaluate import trained_keys
    limit = 60
    chunks = read_chunks(features.parent / "corpus" / "train.jsonl")
    first = {int(k[len("term"):]) for c in chunks[:limit] for k in c.terms}    # "term007" is term id 7
    later = {int(k[len("term"):]) for c in chunks[limit:] for k in c.terms} - first
    assert len(later) >= 3                                                 # the limit matters on this cache
    tr = Trainer(cfg_for(**{"train.mine_from": "train", "train.epochs": 1, "train.limit": limit}), features,
                 tmp_path / "run", log=quiet)
    tr.fit(stop_after=5)
    tr.refresh_hard_negatives()
    mined = tr.hard[tr.seen]
    assert tr.seen.sum() == limit and (mined >= 0).sum() >= 2 * limit
    assert {int(tr.owner[r]) for r in mined[mined >= 0]} <= first        # nothing after the limit, dev or test
    assert trained_keys(tr.cache, limit) == {f"term{t:03d}" for t in first}   # eval's "seen": the same chunks
    for i in np.flatnonzero(tr.seen):                                      # never a chunk's own term
        assert not set(tr.owner[tr.hard[i][tr.hard[i] >= 0]].tolist()) & set(tr.train_data.terms[i])


def test_the_readmes_torchrun_training_command_runs(tmp_path):
    """The cluster command exactly as the README writes it (2 CPU processes, gloo, a tiny cache), over an
    epoch whose last step leaves rank 1 nothing, with a hard-negative refresh on the way."""
    import re
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (cmd,) = [ln.strip() for ln in readme.splitlines() if ln.strip().startswith("torchrun") and "stage2_train" in ln]
    features = build_cache(tmp_path / "b", n_terms=12, n_train=50, n_dev=16, n_test=8)
    shutil.move(str(features), str(tmp_path / "cache" / "features" / "syn"))
    (tmp_path / "tiny.toml").write_text(
        f'[cache]\nroot = "{tmp_path / "cache"}"\nname = "syn"\n'
        '[train]\nepochs = 1\nbatch_size = 8\nproj_dim = 16\nhard_refresh = 2\nhard_k = 4\nin_memory = "yes"\n')
    config = re.search(r"--config (\S+)", cmd).group(1)
    run = re.search(r"--run-dir (\S+)", cmd).group(1)
    args = cmd.replace("--nproc-per-node 8", "--nproc-per-node 2").replace(config, str(tmp_path / "tiny.toml")) \
        .replace(run, str(tmp_path / "runs" / "base")).split()
    args[0] = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step 2 hard negatives" in res.stdout
    done = json.loads((tmp_path / "runs" / "base" / "finished.json").read_text())
    assert done["steps"] == 4                          # 50 chunks in global batches of 2 x 8: 16, 16, 16, 2


def test_resume_tolerates_a_torn_metrics_line_and_free_keys_but_not_other_changes(features, tmp_path):
    cfg = cfg_for(**{"train.epochs": 2})
    full = train(cfg, features, tmp_path / "full", log=quiet)
    part = Trainer(cfg, features, tmp_path / "part", log=quiet)
    part.fit(stop_after=part.steps_per_epoch + 2)
    with open(tmp_path / "part/metrics.jsonl", "a") as f:
        f.write('{"type": "step", "step": 9')                 # killed mid-write
    with pytest.raises(BadInput, match=r"another config: loss.w_term"):
        train(cfg_for(**{"train.epochs": 2, "loss.w_term": 0.5}), features, tmp_path / "part", resume=True, log=quiet)
    free = cfg_for(**{"train.epochs": 2, "eval.ks": "1,5", "train.threads": 1, "eval.glossary_sizes": "50"})
    resumed = train(free, features, tmp_path / "part", resume=True, log=quiet)
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=0)
    assert (tmp_path / "full/metrics.jsonl").read_text() == (tmp_path / "part/metrics.jsonl").read_text()


def test_resume_refuses_another_process_layout(features, tmp_path):
    cfg = cfg_for(**{"train.epochs": 2})
    part = Trainer(cfg, features, tmp_path / "r", log=quiet)
    part.fit(stop_after=part.steps_per_epoch + 1)          # after the epoch-1 checkpoint
    ckpt = torch.load(tmp_path / "r/last.pt", weights_only=False)
    assert ckpt["layout"] == {"world": 1, "batch_size": 32, "global_batch": 32}
    ckpt["layout"] = {"world": 2, "batch_size": 32, "global_batch": 64}     # as if started on 2 processes
    torch.save(ckpt, tmp_path / "r/last.pt")
    with pytest.raises(BadInput, match=r"trained as 2 process\(es\) x batch 32.*--nproc-per-node 2"):
        train(cfg, features, tmp_path / "r", resume=True, log=quiet)
