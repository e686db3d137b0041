"""Integrity: a cache is never mixed, a damaged shard is named, a run never trains or evaluates on a
cache other than its own, and two extractions never write the same cache at once.

test_extract.py covers the basic refusal (a changed tap), hdf5 checksum corruption and the writer
lock on its own; here: every fingerprint part a user can change, --force, zarr damage of every kind
and the verify CLI, repairs, and the lock as `extract` meets it (a live writer, a dead one).
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shared.cache import FeatureCache
from shared.errors import BadInput
from stage1_extract.extract import extract, verify
from stage2_train.train import Trainer, train
from stage3_index.evaluate import evaluate
from tests.synthetic import build_cache
from tests.test_extract import FakeBackbone, assert_same_cache, make_corpus
from tests.test_interrupt import one_thread  # noqa: F401  (autouse: tiny models train 10x faster on one thread)
from tests.test_train import cfg_for

REPO = Path(__file__).resolve().parents[1]


def quiet(*_):
    pass


def snapshot(root: Path) -> dict:
    """Every file under a cache with its bytes: what 'untouched' means."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and "locks" not in p.parts}


class OtherWeights(FakeBackbone):
    """The same settings, a different model behind them (new weights in the same folder)."""

    def fingerprint(self):
        return {"kind": "fake", "version": 2}

    def audio_features(self, waves):
        return [2 * x for x in super().audio_features(waves)]


def _change(kind, cfg, tmp_path):
    """Apply one change a user might make between two runs; return the words the refusal must say."""
    if kind == "revision":
        cfg.backbone.revision = "v2.1"
        return ['backbone.revision: cache has "", config gives "v2.1"']
    if kind == "backbone model":
        cfg.backbone.audio_model = "/models/another-checkpoint"
        return ['backbone.audio_model: cache has "", config gives "/models/another-checkpoint"']
    if kind == "text tap":
        cfg.backbone.text_unfreeze = 2
        return ["backbone.text_unfreeze: cache has 0, config gives 2"]
    if kind == "manifest":
        m = tmp_path / "chunks/train.jsonl"
        lines = m.read_text().splitlines()
        m.write_text("\n".join(lines[:-1]) + "\n")        # one chunk dropped from the train split
        return ["manifests.train: cache has"]
    if kind == "glossary":
        (tmp_path / "glossary.json").write_text(json.dumps(["alpha", "beta gamma", "delta", "epsilon"]))
        return ["glossary_sha256: cache has"]
    if kind == "dtype":
        cfg.cache.dtype = "float32"
        return ['dtype: cache has "float16", config gives "float32"']
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["revision", "backbone model", "text tap", "manifest", "glossary", "dtype"])
def test_changed_settings_refused_saying_what_differs_and_force_never_mixes(tmp_path, kind):
    cfg = make_corpus(tmp_path, n_train=12, n_test=4)
    root = tmp_path / "cache/features/demo"
    extract(cfg, backbone=FakeBackbone(), log=quiet)
    before = snapshot(root)
    needles = _change(kind, cfg, tmp_path)
    with pytest.raises(BadInput, match="this cache was built with different settings") as e:
        extract(cfg, backbone=FakeBackbone(), log=quiet)
    for n in needles:
        assert n in str(e.value), str(e.value)
    assert "--force" in str(e.value) and str(root) in str(e.value)
    assert snapshot(root) == before                             # refused before touching anything
    logs = []
    extract(cfg, backbone=FakeBackbone(), force=True, log=logs.append)
    (aside,) = list(root.parent.glob("demo.old-*"))
    assert any(str(aside) in m for m in logs)
    assert snapshot(aside) == before and verify(aside, log=quiet) == []   # the old cache, intact
    extract(cfg, out=tmp_path / "fresh", backbone=FakeBackbone(), log=quiet)
    assert_same_cache(root, tmp_path / "fresh")                 # the new one: nothing of the old in it
    assert FeatureCache(root).fingerprint == FeatureCache(tmp_path / "fresh").fingerprint


def test_changed_model_weights_refused_and_force_starts_afresh(tmp_path):
    """Same config, a different model (its weights hash): refused mid-way; --force moves the old aside."""
    cfg = make_corpus(tmp_path, n_train=24, n_test=4)
    root = tmp_path / "cache/features/demo"
    first = extract(cfg, shard_index=0, num_shards=2, backbone=FakeBackbone(), log=quiet)
    assert not first["complete"]
    before = snapshot(root)
    with pytest.raises(BadInput, match="the backbone differs from the one this cache was started with") as e:
        extract(cfg, shard_index=1, num_shards=2, backbone=OtherWeights(), log=quiet)
    assert "version: cache has 1, config gives 2" in str(e.value)
    assert snapshot(root) == before
    extract(cfg, force=True, backbone=OtherWeights(), log=quiet)
    (aside,) = list(root.parent.glob("demo.old-*"))
    assert snapshot(aside) == before
    extract(cfg, out=tmp_path / "fresh", backbone=OtherWeights(), log=quiet)
    assert_same_cache(root, tmp_path / "fresh")


# ---------------------------------------------------------------- checksums and verify


def test_verify_names_corrupted_missing_and_unreadable_shards_and_the_repair_works(tmp_path):
    cfg = make_corpus(tmp_path, n_train=40, n_test=7)       # zarr; audio/train has 5 shards of 8
    root = tmp_path / "cache/features/demo"
    extract(cfg, backbone=FakeBackbone(), log=quiet)
    good = snapshot(root)
    t = FeatureCache(root).table("audio/train")
    # 1: one flipped value inside the frames (a bad disk block)
    (chunk,) = [p for p in t.shard_path(1).rglob("*") if p.is_file() and "frames" in p.parts and p.name != "zarr.json"]
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0xFF
    chunk.write_bytes(bytes(data))
    # 2: the shard's data gone, its done mark still there
    shutil.rmtree(t.shard_path(2))
    # 3: the done mark gone (a shard that never finished)
    t.done_path(3).unlink()
    # 4: the offsets array truncated to nothing
    (off,) = [p for p in t.shard_path(4).rglob("*") if p.is_file() and "offsets" in p.parts and p.name != "zarr.json"]
    off.write_bytes(b"")
    bad = verify(root, log=quiet)
    assert bad == ["audio/train/00001: checksum mismatch", "audio/train/00002: missing",
                   "audio/train/00003: missing", "audio/train/00004: unreadable (ValueError)"] or \
        (bad[:3] == ["audio/train/00001: checksum mismatch", "audio/train/00002: missing", "audio/train/00003: missing"]
         and bad[3].startswith("audio/train/00004: "))
    # the CLI says the same and exits 1
    p = subprocess.run([sys.executable, "-m", "stage1_extract", "verify", str(root)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    for b in bad:
        assert f"bad shard: {b}" in p.stdout
    assert f"{root}: " in p.stdout and "4 bad" in p.stdout
    # training on it is refused (the shards it would miss are named, nothing is read half-way)
    with pytest.raises(BadInput, match="incomplete"):
        Trainer(cfg_for(), root, tmp_path / "run", log=quiet)
    # the repair the README gives: delete the bad shards' done marks, rerun extract; only those are redone
    for k in (1, 2, 3, 4):
        t.done_path(k).unlink(missing_ok=True)
    bb = FakeBackbone()
    stats = extract(cfg, backbone=bb, log=quiet)
    assert stats["shards"] == 4 and verify(root, log=quiet) == []
    now = snapshot(root)
    untouched = [k for k in good if k.startswith(("tables/audio/train/00000", "tables/audio/test"))]
    assert untouched and all(now[k] == good[k] for k in untouched)      # the good shards were not redone
    extract(cfg, out=tmp_path / "fresh", backbone=FakeBackbone(), log=quiet)
    assert_same_cache(root, tmp_path / "fresh")


def test_a_crash_between_glossary_and_chunk_texts_is_finished_by_the_rerun(tmp_path):
    cfg = make_corpus(tmp_path, n_train=8, n_test=2)
    root = tmp_path / "cache/features/demo"
    extract(cfg, backbone=FakeBackbone(), log=quiet)
    # killed after glossary.json and before chunk_texts.json (both come before any shard)
    (root / "chunk_texts.json").unlink()
    shutil.rmtree(root / "tables")
    extract(cfg, backbone=FakeBackbone(), log=quiet)
    assert len(FeatureCache(root).read_json("chunk_texts.json")) == len(FeatureCache(root).table("text/chunks"))


# ---------------------------------------------------------------- training and evaluation on the right cache


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    features = build_cache(root / "a", n_train=64, n_dev=16, n_test=16)
    train(cfg_for(**{"train.epochs": 1}), features, root / "run", log=quiet)
    return root, features


def test_training_and_eval_refuse_a_cache_replaced_under_them(trained, tmp_path):
    root, features = trained
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    # someone rebuilds the cache in place with other settings (here: other manifests)
    other = build_cache(tmp_path / "b", n_train=64, n_dev=16, n_test=16, seed=1, audio_top=False)
    moved = tmp_path / "a-features"
    shutil.move(features, moved)
    try:
        shutil.copytree(other, features)
        with pytest.raises(BadInput, match="this run was started on a different feature cache") as e:
            train(cfg_for(**{"train.epochs": 1}), features, run, resume=True, log=quiet)
        assert "manifests.train" in str(e.value) and str(run / "last.pt") in str(e.value)
        with pytest.raises(BadInput, match="the feature cache changed since this run was trained") as e:
            evaluate(run, log=quiet)
        assert "manifests.train" in str(e.value)
        assert not (run / "eval/test/report.json").exists()
    finally:
        shutil.rmtree(features)
        shutil.move(moved, features)


def test_training_refuses_a_changed_manifest_or_an_incomplete_cache(trained, tmp_path):
    root, features = trained
    f = tmp_path / "features"
    shutil.copytree(features, f)
    index = json.loads((f / "index.json").read_text())
    dev = Path(index["manifests"]["dev"])
    copy = tmp_path / "dev.jsonl"
    copy.write_text(dev.read_text().replace("filler", "fuller"))   # the manifest edited after extraction
    index["manifests"]["dev"] = str(copy)
    (f / "index.json").write_text(json.dumps(index))
    with pytest.raises(BadInput, match="the manifest of split 'dev' changed or vanished since extraction") as e:
        Trainer(cfg_for(), f, tmp_path / "r1", log=quiet)
    assert str(copy) in str(e.value)
    shutil.rmtree(FeatureCache(f).table("audio/train").shard_path(0))   # a shard lost on disk
    with pytest.raises(BadInput, match="the feature cache is incomplete") as e:
        Trainer(cfg_for(), f, tmp_path / "r2", log=quiet)
    assert "rerun" in str(e.value)


# ---------------------------------------------------------------- concurrent writers


def _hold_lock(lock: Path) -> subprocess.Popen:
    code = ("import sys, time; from shared.cache import WriterLock\n"
            "with WriterLock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(lock)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_writer_stops_while_one_runs_and_takes_over_a_dead_ones_lock(tmp_path):
    cfg = make_corpus(tmp_path, n_train=8, n_test=2)
    root = tmp_path / "cache/features/demo"
    lock = root / "locks/writer-0-of-1.lock"
    holder = _hold_lock(lock)            # an extraction in progress (another process, this host)
    try:
        with pytest.raises(BadInput, match="another extraction is writing here") as e:
            extract(cfg, backbone=FakeBackbone(), log=quiet)
        msg = str(e.value)
        assert f"host {socket.gethostname()}, pid {holder.pid}" in msg and str(lock) in msg
        assert not (root / "tables").exists()                     # it stopped before writing anything
        # the CLI: exit code 2 and the same message
        p = subprocess.run([sys.executable, "-m", "stage1_extract", "extract",
                            "--set", f"data.glossary={cfg.data.glossary}", "--set", "data.alt2main=",
                            "--set", f"data.chunks={cfg.data.chunks}", "--set", f"cache.root={cfg.cache.root}"],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and f"pid {holder.pid}" in p.stderr and "wait for it to finish" in p.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads(lock.read_text())["pid"] == holder.pid      # the dead writer's lock is still there
    stats = extract(cfg, backbone=FakeBackbone(), log=quiet)       # ... and is taken over
    assert stats["complete"] and not lock.exists()
    extract(cfg, out=tmp_path / "fresh", backbone=FakeBackbone(), log=quiet)
    assert_same_cache(root, tmp_path / "fresh")


def test_a_lock_from_another_host_is_respected(tmp_path):
    cfg = make_corpus(tmp_path, n_train=4, n_test=2)
    lock = tmp_path / "cache/features/demo/locks/writer-0-of-1.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"host": "node-17.cluster", "pid": os.getpid() + 10 ** 6, "since": "2024-01-01T00:00:00"}))
    with pytest.raises(BadInput, match=r"another extraction is writing here \(host node-17.cluster"):
        extract(cfg, backbone=FakeBackbone(), log=quiet)


def test_writers_with_different_num_shards_never_overlap(tmp_path):
    """Writer 1 of 2 owns shards a single writer would also write: they must not run at once."""
    cfg = make_corpus(tmp_path, n_train=16, n_test=2)
    root = tmp_path / "cache/features/demo"
    holder = _hold_lock(root / "locks/writer-1-of-2.lock")
    try:
        with pytest.raises(BadInput, match="different --num-shards") as e:
            extract(cfg, backbone=FakeBackbone(), log=quiet)
        assert f"pid {holder.pid}" in str(e.value) and "writer-1-of-2" in str(e.value)
        extract(cfg, shard_index=0, num_shards=2, backbone=FakeBackbone(), log=quiet)   # its partner is fine
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert extract(cfg, backbone=FakeBackbone(), log=quiet)["complete"]      # a dead writer blocks nobody
