"""Extraction loop, cache format, resume and scale-out, with a small deterministic backbone.

The real backbones (tiny random Qwen2-Audio, converted Whisper) are tested in test_backbones.py;
here the backbone only has to be a pure function of its input so caches can be compared.
"""
import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from shared.cache import FeatureCache, WriterLock
from shared.config import load_config
from shared.errors import BadInput
from shared.manifest import Chunk, write_chunks
from stage1_extract.extract import duration_batches, extract, verify


class FakeBackbone:
    """Frame features = framewise stats of the waveform (20 ms hop); text = character codes."""
    audio_dim, text_dim = 4, 3

    def __init__(self):
        self.audio_calls = 0
        self.batch_sizes = []

    def audio_features(self, waves):
        self.audio_calls += 1
        self.batch_sizes.append(len(waves))
        out = []
        for w in waves:
            n = max(1, len(w) // 320)
            fr = w[: n * 320].reshape(n, 320) if len(w) >= 320 else np.pad(w, (0, 320 - len(w)))[None]
            out.append(np.stack([fr.mean(1), fr.std(1), fr.max(1), fr.min(1)], 1).astype(np.float32))
        return out

    def text_features(self, texts):
        return [np.array([[ord(ch) / 100, i, len(t)] for i, ch in enumerate(t or " ")], np.float32) for t in texts]

    def export_top(self, kind, out_dir):
        (out_dir / f"top_{kind}.json").write_text(json.dumps({"kind": "identity", "layers": 0}))

    def fingerprint(self):
        return {"kind": "fake", "version": 1}


def make_corpus(tmp_path, n_train=30, n_test=7):
    rng = np.random.default_rng(0)
    wav = (0.1 * rng.standard_normal(16000 * 60)).astype(np.float32)
    sf.write(tmp_path / "long.wav", wav, 16000, subtype="PCM_16")
    (tmp_path / "glossary.json").write_text(json.dumps(["alpha", "beta gamma", "delta"]))
    terms = ["alpha", "beta gamma", "delta"]
    chunks = tmp_path / "chunks"
    for split, n in [("train", n_train), ("test", n_test)]:
        items = [Chunk(id=f"{split}{i}", audio=str(tmp_path / "long.wav"), audio_offset=0.5 * i,
                       audio_duration=1.0 + (i % 5) * 0.4, term_chunk_text=f"say {terms[i % 3]} {i % 4}",
                       term_chunk_audio_ground_truth_terms=[terms[i % 3]], split=split) for i in range(n)]
        write_chunks(items, chunks / f"{split}.jsonl")
    return load_config(None, [f"data.glossary={tmp_path / 'glossary.json'}", "data.alt2main=",
                              f"data.chunks={chunks}", f"cache.root={tmp_path / 'cache'}",
                              "extract.shard_size=8", "extract.batch_seconds=6"])


def quiet(*_):
    pass


def assert_same_cache(a, b) -> None:
    """Two complete caches hold the same tables, ids, frames and offsets."""
    ca, cb = FeatureCache(a), FeatureCache(b)
    assert ca.complete() and cb.complete() and set(ca.tables) == set(cb.tables)
    for name in ca.tables:
        fa, oa = ca.table(name).load()
        fb, ob = cb.table(name).load()
        np.testing.assert_array_equal(fa, fb)
        np.testing.assert_array_equal(oa, ob)
        assert ca.table(name).ids == cb.table(name).ids


def test_duration_batches_bucket_similar_lengths():
    d = [3.0, 1.0, 1.1, 2.9, 1.2, 3.1]
    batches = duration_batches(d, batch_seconds=4.0)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert max(d[i] for i in b) * len(b) <= 4.0 or len(b) == 1
    assert [sorted(b) for b in batches][0] == [1, 2, 4]  # the short ones together


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_extract_writes_readable_cache_and_reruns_do_nothing(tmp_path, fmt):
    cfg = make_corpus(tmp_path)
    cfg.cache.format = fmt
    bb = FakeBackbone()
    stats = extract(cfg, backbone=bb, log=quiet)
    assert stats["chunks"] == 37 and stats["complete"]
    assert max(bb.batch_sizes) > 1                      # batched by duration, not one by one
    cache = FeatureCache(tmp_path / "cache/features/demo")
    train = cache.table("audio/train")
    assert len(train) == 30 and train.ids[:3] == ["train0", "train1", "train2"]
    w = sf.read(tmp_path / "long.wav", dtype="float32")[0]
    expect = bb.audio_features([w[int(0.5 * 3 * 16000):int((0.5 * 3 + 1.0 + 3 * 0.4) * 16000)]])[0]
    np.testing.assert_allclose(train.item(3), expect, atol=2e-3)   # float16 on disk
    frames, offsets = train.load()                      # every shard read into one array, in item order
    assert train.plan.shards > 1 and offsets[-1] == len(frames) and len(offsets) == len(train) + 1
    for i in range(len(train)):
        np.testing.assert_array_equal(frames[offsets[i]:offsets[i + 1]], train.item(i))
    gl = cache.table("text/glossary")
    assert len(gl) == 3 and cache.read_json("glossary.json")["keys"] == ["alpha", "beta gamma", "delta"]
    texts = cache.read_json("chunk_texts.json")
    assert len(cache.table("text/chunks")) == len(texts) == len(set(texts)) == 12
    assert verify(cache.root, log=quiet) == []
    calls = bb.audio_calls
    again = extract(cfg, backbone=bb, log=quiet)
    assert again["shards"] == 0 and bb.audio_calls == calls      # complete: the model is not run


def test_changed_settings_are_refused_never_mixed(tmp_path):
    cfg = make_corpus(tmp_path)
    extract(cfg, backbone=FakeBackbone(), log=quiet)
    cfg.backbone.audio_unfreeze = 3
    with pytest.raises(BadInput, match="backbone.audio_unfreeze: cache has 1, config gives 3"):
        extract(cfg, backbone=FakeBackbone(), log=quiet)
    extract(cfg, backbone=FakeBackbone(), force=True, log=quiet)
    olds = list((tmp_path / "cache/features").glob("demo.old-*"))
    assert len(olds) == 1 and (olds[0] / "index.json").is_file()


def test_sharded_writers_equal_one_writer(tmp_path):
    cfg = make_corpus(tmp_path)
    extract(cfg, out=tmp_path / "one", backbone=FakeBackbone(), log=quiet)
    first = extract(cfg, out=tmp_path / "two", shard_index=0, num_shards=2, backbone=FakeBackbone(), log=quiet)
    assert not first["complete"]
    extract(cfg, out=tmp_path / "two", shard_index=1, num_shards=2, backbone=FakeBackbone(), log=quiet)
    assert_same_cache(tmp_path / "one", tmp_path / "two")


def test_resume_after_partial_run_and_leftovers(tmp_path):
    cfg = make_corpus(tmp_path)
    extract(cfg, out=tmp_path / "full", backbone=FakeBackbone(), log=quiet)
    root = tmp_path / "part"
    extract(cfg, out=root, backbone=FakeBackbone(), log=quiet)
    t = FeatureCache(root).table("audio/train")
    # a killed writer: one shard lost its done mark, another left a temporary file
    t.done_path(2).unlink()
    (t.dir / ".00003.zarr.tmp-host-123").mkdir()
    bb = FakeBackbone()
    extract(cfg, out=root, backbone=bb, log=quiet)
    assert bb.audio_calls >= 1 and not (t.dir / ".00003.zarr.tmp-host-123").exists()
    np.testing.assert_array_equal(FeatureCache(root).table("audio/train").load()[0],
                                  FeatureCache(tmp_path / "full").table("audio/train").load()[0])


def test_verify_finds_corruption(tmp_path):
    cfg = make_corpus(tmp_path)
    cfg.cache.format = "hdf5"
    extract(cfg, backbone=FakeBackbone(), log=quiet)
    root = tmp_path / "cache/features/demo"
    shard = FeatureCache(root).table("audio/test").shard_path(0)
    import h5py
    with h5py.File(shard, "r+") as f:
        f["frames"][0, 0] = 123.0
    bad = verify(root, log=quiet)
    assert bad == ["audio/test/00000: checksum mismatch"]


def test_bad_audio_stops_or_is_skipped(tmp_path):
    cfg = make_corpus(tmp_path, n_train=5, n_test=3)
    lines = (tmp_path / "chunks/test.jsonl").read_text().splitlines()
    rec = json.loads(lines[1])
    rec["audio"] = str(tmp_path / "missing.wav")
    lines[1] = json.dumps(rec)
    rec = json.loads(lines[2])
    rec["audio_duration"] = 45.0
    lines[2] = json.dumps(rec)
    (tmp_path / "chunks/test.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(BadInput, match="missing.wav"):
        extract(cfg, backbone=FakeBackbone(), log=quiet)
    cfg.cache.name = "skip"
    stats = extract(cfg, backbone=FakeBackbone(), skip_bad=True, log=quiet)
    t = FeatureCache(tmp_path / "cache/features/skip").table("audio/test")
    assert t.ids == ["test0"] and stats["rejected"] == 2
    reasons = {r["id"]: r["reason"] for r in t.rejected()}
    assert "audio file missing" in reasons["test1"] and "rejected, the audio encoder takes at most 30s" in reasons["test2"]


def test_writer_lock(tmp_path):
    lock = tmp_path / "w.lock"
    with WriterLock(lock):
        with pytest.raises(BadInput, match="another extraction is writing here"):
            with WriterLock(lock):
                pass
    # a lock left by a dead process is taken over
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(p.stdout), "since": "x"}))
    with WriterLock(lock):
        assert json.loads(lock.read_text())["pid"] != int(p.stdout)


def test_a_first_run_that_finished_no_audio_does_not_block_the_fixed_rerun(tmp_path):
    cfg = make_corpus(tmp_path, n_train=5, n_test=3)
    path = tmp_path / "chunks/test.jsonl"          # audio/test is the first audio table written
    good = path.read_text()
    lines = good.splitlines()
    rec = json.loads(lines[0])
    rec["audio"] = str(tmp_path / "missing.wav")
    path.write_text("\n".join([json.dumps(rec)] + lines[1:]) + "\n")
    with pytest.raises(BadInput, match="missing.wav"):
        extract(cfg, backbone=FakeBackbone(), log=quiet)
    path.write_text(good)                        # the user fixes the manifest: no --force needed
    assert extract(cfg, backbone=FakeBackbone(), log=quiet)["complete"]


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_shard_read_into_equals_the_format_readers_own(tmp_path, fmt):
    """read_into (zarr: chunk files read in place) equals the library's read: several chunks, an edge chunk
    stored whole, and an all-zero chunk zarr never writes."""
    from shared.cache import ShardReader, write_shard_file
    rng = np.random.default_rng(0)
    frames = rng.standard_normal((20000, 6)).astype(np.float16)
    frames[8192:16384] = 0                                # the second chunk holds only the fill value
    offsets = np.array([0, 5000, 20000])
    path = tmp_path / ("s" + {"zarr": ".zarr", "hdf5": ".h5"}[fmt])
    write_shard_file(path, frames, offsets, fmt)
    if fmt == "zarr":
        assert not (path / "frames" / "c" / "1" / "0").exists() and (path / "frames" / "c" / "2" / "0").exists()
    r = ShardReader(path, fmt)
    out = np.full((20000, 6), 7, dtype=np.float16)
    r.read_into(out)
    np.testing.assert_array_equal(out, frames)
    np.testing.assert_array_equal(out, r.frames_all())


def test_zarr_items_read_from_raw_chunks_equal_zarrs_own(tmp_path):
    from shared.cache import ShardReader, write_shard_file
    rng = np.random.default_rng(1)
    frames = rng.standard_normal((20000, 4)).astype(np.float16)
    frames[8192:16384] = 0
    offsets = np.array([0, 3, 8190, 8200, 9000, 16390, 20000])   # items across chunk edges and the empty one
    write_shard_file(tmp_path / "s.zarr", frames, offsets, "zarr")
    r = ShardReader(tmp_path / "s.zarr", "zarr")
    assert r._raw is not None
    for i in range(len(offsets) - 1):
        np.testing.assert_array_equal(r.item(i), np.asarray(r._frames[offsets[i]:offsets[i + 1]]))


# In a fresh process: a freed 30 MB block raises glibc's trim threshold to 60 MB (its dynamic
# threshold), then 40 MB of 256 KB heap blocks are touched and freed. Prints the MB the RSS grew by at
# the peak and what is still held after the frees.
MEMORY_PROBE = """
import ctypes, ctypes.util, os, sys
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
if sys.argv[1] == "trim":
    from stage1_extract.extract import return_freed_memory
    assert return_freed_memory()
big = libc.malloc(30 << 20); libc.memset(big, 1, 30 << 20); libc.free(big)
base = rss()
blocks = [libc.malloc(256 << 10) for _ in range(160)]
for b in blocks:
    libc.memset(b, 1, 256 << 10)
peak = rss()
for b in reversed(blocks):
    libc.free(b)
print((peak - base) >> 20, (rss() - base) >> 20)
"""


def test_extract_gives_freed_memory_back_to_the_system():
    """What return_freed_memory is for: memory freed after a shard goes back to the system at once
    (the RSS falls back), where glibc by default keeps it (shown by the same process without it)."""
    import os
    import platform
    from pathlib import Path
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        from stage1_extract.extract import return_freed_memory
        assert return_freed_memory() is False                  # nothing to ask elsewhere, and it says so
        pytest.skip("glibc only")
    root = Path(__file__).resolve().parents[1]
    held = {}
    for arm in ("default", "trim"):
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, arm], cwd=root, capture_output=True, text=True,
                             timeout=60, env={**os.environ, "PYTHONPATH": str(root)})
        assert out.returncode == 0, out.stderr
        peak, held[arm] = map(int, out.stdout.split())
        assert peak >= 35                                      # the 40 MB were really touched
    assert held["default"] >= 30 and held["trim"] <= 5, held
