"""`bench`: what the design promises, measured as ratios against the seed's way in one run.

Every comparison runs both ways on the same machine, in the same process, on the same data, so
the ratio holds on a noisy machine even when the absolute seconds do not:

    extract  the seed's way (each chunk padded to 30 s = 3000 mel frames, the HF Qwen2AudioEncoder
             forward with the 4-D padding mask, one chunk at a time) against ours
             (`Backbone.audio_features` at true length, duration-bucketed batches) on the same demo
             chunks, embedded backbone with audio_unfreeze=0; min cosine of the pooled chunk vectors.
    train    one epoch with the frozen encoder inside the loop (the seed's way: every step encodes
             its chunks padded to 30 s) against the same epoch on the cache. The online epoch is
             timed on its first batch and scaled to the epoch (labelled as an estimate).
    loader   feature MB/s the training data path (`stage2_train.data.Ragged`) delivers against a
             plain sequential read of the same shard files, zarr and hdf5 (page cache warm).
    mining   one hard-negative refresh (`Trainer.refresh_hard_negatives`: text head + FAISS) over
             a synthetic 100,000-term glossary of cached text features at the real width, and its
             share of a run that refreshes every train.hard_refresh steps.
    index    Flat against an IVF index on clustered synthetic 512-d vectors (uniform random vectors
             have no neighbourhood structure, so an ANN index has nothing to exploit there).
    memory   peak RSS of extraction (child processes) on N and 4N chunks per split.

Writes `OUT/report.json` (the figures, one block per part), `OUT/details.json` (how each figure was obtained)
and prints a table. Inputs are the demo's manifests and feature cache: run `make` first.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np

from shared.cli import config_options
from shared.config import Config
from shared.errors import BadInput

K = 10  # recall@K of the index comparison
ENCODER_THREADS = 2  # torch threads for every encoder pass (both ways), so the numbers are stable

# ---------------------------------------------------------------- pure helpers (unit-tested)


def clustered_vectors(n: int, dim: int, n_clusters: int, spread: float, seed: int,
                      block: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised vectors around `n_clusters` random unit centres; returns (vectors, labels).

    A point is normalise(centre + spread * g / sqrt(dim)), g standard normal, so its cosine to its
    centre is about 1 / sqrt(1 + spread^2). Built in blocks to keep the peak memory near the output.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, n_clusters, n)
    out = np.empty((n, dim), dtype=np.float32)
    scale = np.float32(spread / math.sqrt(dim))
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        x = rng.standard_normal((hi - lo, dim), dtype=np.float32)
        x *= scale
        x += centres[labels[lo:hi]]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[lo:hi] = x
    return out, labels


def perturbed_queries(vectors: np.ndarray, n: int, noise: float, seed: int) -> np.ndarray:
    """Queries near random database vectors (a chunk heard near its term), L2-normalised."""
    rng = np.random.default_rng(seed)
    src = rng.integers(0, len(vectors), n)
    q = vectors[src] + rng.standard_normal((n, vectors.shape[1]), dtype=np.float32) * np.float32(
        noise / math.sqrt(vectors.shape[1]))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def recall_vs_exact(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean share of each query's exact top-k ids that the approximate top-k also returns."""
    if len(exact_ids) == 0:
        return float("nan")
    hits = sum(len(set(a[a >= 0]) & set(e[e >= 0])) for a, e in zip(approx_ids, exact_ids))
    return hits / float((exact_ids >= 0).sum())


def pooled_cosines(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    """Cosine between the frame-mean vectors of a[i] and b[i] (each (T_i, D))."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} items against {len(b)}")
    out = np.zeros(len(a))
    for i, (x, y) in enumerate(zip(a, b)):
        u, v = np.asarray(x, np.float64).mean(0), np.asarray(y, np.float64).mean(0)
        out[i] = float(u @ v / max(np.linalg.norm(u) * np.linalg.norm(v), 1e-30))
    return out


def scaled_seconds(measured_seconds: float, measured_items: int, total_items: int) -> float:
    """An epoch's time from a timed part of it, assuming time proportional to items."""
    if measured_items <= 0:
        raise ValueError("nothing was measured")
    return measured_seconds * total_items / measured_items


def refresh_share(refresh_seconds: float, step_seconds: float, every: int) -> float:
    """Share of a run's time spent in hard-negative refreshes when one runs every `every` steps."""
    return refresh_seconds / (every * step_seconds + refresh_seconds)


# Qwen2-Audio-7B's audio tower and language model, from its config.json (the LM's text_config
# leaves hidden size, layers and heads at the Qwen2 defaults: 4096, 32, 32).
QWEN2_AUDIO_TOWER = dict(layers=32, d_model=1280, heads=20, ffn=5120, mels=128, positions=1500)
QWEN2_AUDIO_LM = dict(layers=32, hidden=4096, ffn=11008)


def tower_flops(seconds: float, padded: bool, layers: int = 32, d_model: int = 1280, ffn: int = 5120,
                mels: int = 128, positions: int = 1500, **_) -> float:
    """FLOPs (2 per multiply-add) of one pass of a Whisper-style tower over a chunk of `seconds`.

    100 mel frames per second; conv1 (k=3, stride 1) mels -> d, conv2 (k=3, stride 2) d -> d gives
    50 Hz; per layer and frame: q, k, v, o projections 8 d^2, FFN 4 d ffn, attention scores and
    weighted sum 4 T d. Padded: T = `positions` (30 s) whatever the chunk's length. Layer norms,
    GELU, softmax and the final avg-pool are left out (well under 1%).
    """
    mel_frames = 2 * positions if padded else math.ceil(100 * seconds)
    T = positions if padded else (mel_frames - 1) // 2 + 1
    conv = 2 * mel_frames * mels * d_model * 3 + 2 * T * d_model * d_model * 3
    per_frame = 8 * d_model ** 2 + 4 * d_model * ffn + 4 * T * d_model
    return conv + layers * T * per_frame


def lm_flops(tokens: int, layers: int = 32, hidden: int = 4096, ffn: int = 11008) -> float:
    """FLOPs of a Qwen2 decoder pass over `tokens` tokens (full attention heads, gated MLP)."""
    per_token = 8 * hidden ** 2 + 6 * hidden * ffn + 4 * tokens * hidden
    return layers * tokens * per_token


def flops_table(durations=(1.0, 2.0, 3.0)) -> list[dict]:
    """CALCULATION, not a measurement: Qwen2-Audio-7B FLOPs per audio second, padded vs true length."""
    rows = []
    for s in durations:
        padded, true = tower_flops(s, True, **QWEN2_AUDIO_TOWER), tower_flops(s, False, **QWEN2_AUDIO_TOWER)
        tokens_true = (((math.ceil(100 * s) - 1) // 2 + 1) - 2) // 2 + 1   # 25 Hz after the avg-pool
        rows.append({"seconds": s,
                     "tower_padded_gflop_per_audio_s": padded / s / 1e9,
                     "tower_true_gflop_per_audio_s": true / s / 1e9,
                     "tower_ratio": padded / true,
                     "lm_true_tokens_gflop_per_audio_s": lm_flops(tokens_true, **QWEN2_AUDIO_LM) / s / 1e9,
                     "lm_750_tokens_gflop_per_audio_s": lm_flops(750, **QWEN2_AUDIO_LM) / s / 1e9})
    return rows


TARGETS = {
    "extract": "speedup >= 15 and min_cosine >= 0.99",
    "train": "speedup >= 50",
    "loader": "fraction >= 0.5 (both formats)",
    "mining": "fraction_of_train <= 0.1",
    "index": "at 1M: recall@10 >= 0.95 of exact at >= 5x Flat QPS",
    "memory": "peak RSS does not grow with the corpus (4N within 10% of N)",
    "stream": "window_ms_p95 <= 240 (a quarter of the 0.96 s hop) with a 10k-term glossary",
    "reexperiment": "train_seconds + eval_seconds <= 60 for a loss-weight change on the demo",
}


def target_met(part: str, r: dict) -> bool:
    """Whether one part of the report meets its target (TARGETS)."""
    if part == "extract":
        return r["speedup"] >= 15 and r["min_cosine"] >= 0.99
    if part == "train":
        return r["speedup"] >= 50
    if part == "loader":
        return all(v["fraction"] >= 0.5 for v in r.values())
    if part == "mining":
        return r["fraction_of_train"] <= 0.1
    if part == "index":
        big = r[max(r, key=int)]
        return big["ann_recall_at_10_vs_flat"] >= 0.95 and big["ann_qps"] >= 5 * big["flat_qps"]
    if part == "memory":
        return r["peak_rss_mb_4n"] <= 1.1 * r["peak_rss_mb_n"]
    if part == "stream":
        return r["window_ms_p95"] <= 240
    if part == "reexperiment":
        return r["train_seconds"] + r["eval_seconds"] <= 60
    raise KeyError(part)


def _g(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def format_table(report: dict, details: dict) -> str:
    """The printed summary: one block of rows per part, its target and whether it is met."""
    rows = []
    if "extract" in report:
        r, d = report["extract"], details.get("extract", {})
        rows.append(("extract", f"{d.get('chunks', '?')} chunks: seed {_g(r['seed_seconds'])} s, ours "
                     f"{_g(r['ours_seconds'])} s, speedup {_g(r['speedup'])}x, min cos {r['min_cosine']:.4f}"))
    if "train" in report:
        r, d = report["train"], details.get("train", {})
        est = f" (estimated from {d['online_batches']} batches)" if d.get("online_estimated") else ""
        cest = f" (estimated from {d['cached_batches']} batches)" if d.get("cached_estimated") else ""
        rows.append(("train", f"online_seconds{est} {_g(r['online_seconds'])}, cached_seconds{cest} "
                     f"{_g(r['cached_seconds'])} ({d.get('steps', '?')} steps), speedup {_g(r['speedup'])}x"))
        if "what_if_heads_only" in d:
            w = d["what_if_heads_only"]
            rows.append(("train", f"what-if heads only (audio_unfreeze=0): {_g(w['step_seconds'])} s/step, "
                         f"online {_g(w['online_seconds'])} s vs cached {_g(w['cached_seconds'])} s = "
                         f"{_g(w['speedup'])}x"))
    if "loader" in report:
        mode = details.get("loader", {}).get("mode", "")
        for fmt, r in report["loader"].items():
            disk = details.get("loader", {}).get(fmt, {})
            extra = (f"; item by item from disk {_g(disk['from_disk_per_item_mb_s'])} MB/s "
                     f"({disk['from_disk_fraction']:.2f})") if disk else ""
            rows.append(("loader", f"{fmt}: raw {_g(r['raw_mb_s'])} MB/s, loader ({mode}) {_g(r['loader_mb_s'])} "
                         f"MB/s, fraction {r['fraction']:.2f}{extra}"))
    if "mining" in report:
        r, d = report["mining"], details.get("mining", {})
        rows.append(("mining", f"{r['glossary_size']:,} terms x {d.get('chunks', '?')} chunks: refresh "
                     f"{_g(r['refresh_seconds'])} s, every {d.get('hard_refresh', '?')} steps of "
                     f"{_g(d.get('step_seconds', float('nan')))} s -> {r['fraction_of_train']:.3f} of training; "
                     f"{r.get('negatives_recall_vs_exact', float('nan')):.3f} of the exact negatives kept"))
    if "index" in report:
        for n, r in report["index"].items():
            f = details.get("index", {}).get(n, {})
            rows.append(("index", f"{int(n):,} x 512: Flat {_g(r['flat_qps'])} q/s, {f.get('ann_factory', 'ANN')} "
                         f"nprobe {f.get('nprobe', '?')} {_g(r['ann_qps'])} q/s "
                         f"({_g(r['ann_qps'] / r['flat_qps'])}x), recall@10 {r['ann_recall_at_10_vs_flat']:.3f}, "
                         f"build {_g(r['build_seconds'])} s"))
    if "memory" in report:
        r, d = report["memory"], details.get("memory", {})
        rows.append(("memory", f"peak RSS {_g(r['peak_rss_mb_n'])} MB at N={d.get('n', '?')} chunks/split, "
                     f"{_g(r['peak_rss_mb_4n'])} MB at 4N"))
    if "stream" in report:
        r, d = report["stream"], details.get("stream", {})
        rows.append(("stream", f"{d.get('glossary_terms', 0):,} terms, {d.get('audio_seconds', 0):.0f} s of audio in "
                     f"{d.get('block_ms', '?')} ms blocks: window p50 {_g(r['window_ms_p50'])} ms, p95 "
                     f"{_g(r['window_ms_p95'])} ms, real-time factor {r['real_time_factor']:.3f}"))
    if "reexperiment" in report:
        r, d = report["reexperiment"], details.get("reexperiment", {})
        rows.append(("reexperiment", f"{d.get('change', '?')}: trained in {_g(r['train_seconds'])} s "
                     f"({d.get('steps', '?')} steps, {d.get('epochs', '?')} epochs), evaluated on dev in "
                     f"{_g(r['eval_seconds'])} s: dev R@10 {r['dev_r10']:.3f}"))
    lines = [f"{'part':8s} {'met':4s} figures"]
    shown = set()
    for part, text in rows:
        met = "" if part in shown else ("yes" if target_met(part, report[part]) else "NO")
        shown.add(part)
        lines.append(f"{part:8s} {met:4s} {text}")
    lines.append("targets: " + "; ".join(f"{p} {t}" for p, t in TARGETS.items() if p in report))
    return "\n".join(lines)


# ---------------------------------------------------------------- the seed's way of encoding


def seed_encode(backbone, wave: np.ndarray, tap_layer: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The seed's encoding of one chunk (padded to 30 s): `backbones.padded_reference` on this backbone."""
    from stage1_extract.backbones import padded_reference
    return padded_reference(backbone.tower, backbone.feature_extractor, wave, tap_layer)


@dataclasses.dataclass
class SeedEncoded:
    """One chunk encoded the seed's way, with what it cost."""
    final: np.ndarray          # final pooled states (25 Hz)
    tap: np.ndarray            # states at the cache's tap (the final ones when audio_unfreeze = 0)
    read_seconds: float
    encode_seconds: float


def read_chunk_audio(chunks: list) -> tuple[list[np.ndarray], list[float]]:
    """Each chunk's samples and the seconds its read took."""
    from shared.audio import read_audio
    waves, reads = [], []
    for c in chunks:
        t0 = time.perf_counter()
        waves.append(read_audio(c.audio, c.audio_offset, c.audio_duration, record=f"chunk {c.id}"))
        reads.append(time.perf_counter() - t0)
    return waves, reads


def seed_encode_timed(backbone, wave: np.ndarray, read_seconds: float, tap_layer: int | None) -> SeedEncoded:
    t0 = time.perf_counter()
    final, tap = seed_encode(backbone, wave, tap_layer)
    return SeedEncoded(final, tap, read_seconds, time.perf_counter() - t0)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block with n torch threads (0 = leave as is); restore the previous count after."""
    import torch
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ListAudio:
    """Stands in for a SplitData's cached `Ragged`: items given in a dict (index -> frames)."""

    def __init__(self, items: dict):
        self._items = items

    def items(self, idx) -> list[np.ndarray]:
        return [self._items[int(i)] for i in idx]


# ---------------------------------------------------------------- the parts


def _require_inputs(cfg: Config) -> tuple[Path, Path]:
    from shared.cache import FeatureCache
    manifest = Path(cfg.data.chunks) / "train.jsonl"
    features = Path(cfg.cache.root) / "features" / cfg.cache.name
    if not manifest.is_file():
        raise BadInput("the demo's train manifest is missing", file=manifest,
                       fix="run make first (make data, make extract, make train), or point --config at yours")
    if not (features / "index.json").is_file() or not FeatureCache(features).complete():
        raise BadInput("the feature cache is missing or incomplete", file=features,
                       fix="run make first (make extract builds it)")
    return manifest, features


def _frozen_backbone(cfg: Config):
    """The config's backbone (the demo's: the embedded one) with audio_unfreeze = 0 (final pooled
    states), loaded once for both ways."""
    from stage1_extract.backbones import load_backbone
    spec = dataclasses.replace(cfg.backbone, audio_unfreeze=0, text_unfreeze=0)
    return load_backbone(spec)


class TrainSetup:
    """The Trainer on the demo cache, epoch 0's batches, and the train chunks in item order."""

    def __init__(self, cfg: Config, features: Path, out: Path, backbone):
        from shared.manifest import read_chunks
        from stage2_train.data import global_batches
        from stage2_train.train import Trainer
        with torch_threads(0):   # the Trainer sets train.threads for the process: keep it to its steps
            self.trainer = Trainer(cfg, features, out / "train_run", log=lambda *a: None)
        self.step_threads = cfg.train.threads or ENCODER_THREADS
        d, t = self.trainer.train_data, cfg.train
        self.batches = global_batches(d.terms, len(d), self.trainer.batch_global, t.seed, 0, t.term_cap)
        by_id = {c.id: c for c in read_chunks(self.trainer.cache.index["manifests"]["train"])}
        self.chunks = [by_id[i] for i in d.ids]
        unfreeze = self.trainer.cache.fingerprint["backbone"]["audio_unfreeze"]
        self.tap_layer = len(backbone.tower.layers) - unfreeze   # = the tower's depth when unfreeze is 0
        self.seed: dict[int, SeedEncoded] = {}                  # train item index -> the seed's encoding


def bench_extract(cfg: Config, backbone, setup: TrainSetup, n_chunks: int, log) -> tuple[dict, dict]:
    """The first `n_chunks` chunks of epoch 0 (so the train part reuses their seed-way encodings).

    The two ways alternate batch by batch (a duration bucket the seed way, one chunk at a time, then
    the same bucket our way), so a change in the machine's load hits both alike."""
    from tqdm import tqdm

    from stage1_extract.extract import duration_batches
    idx = [int(i) for i in np.concatenate(setup.batches)[:n_chunks]]
    waves, reads = read_chunk_audio([setup.chunks[i] for i in idx])
    secs = [len(w) / 16000 for w in waves]
    seed_encode(backbone, waves[0], setup.tap_layer)                # warm-up: first calls allocate
    backbone.audio_features(waves[:2])
    batches = duration_batches(secs, cfg.extract.batch_seconds)
    seed: list = [None] * len(waves)
    ours: list = [None] * len(waves)
    ours_s = 0.0
    bar = tqdm(total=len(waves), desc="extract: seed way (30 s padded, one at a time) vs ours", unit="chunk",
               mininterval=2.0)
    for batch in batches:
        for j in batch:
            seed[j] = seed_encode_timed(backbone, waves[j], reads[j], setup.tap_layer)
            bar.update(1)
        t0 = time.perf_counter()
        for j, f in zip(batch, backbone.audio_features([waves[j] for j in batch])):
            ours[j] = f
        ours_s += time.perf_counter() - t0
    bar.close()
    setup.seed.update(zip(idx, seed))
    seed_s = sum(s.encode_seconds for s in seed)

    cos = pooled_cosines([s.final for s in seed], ours)
    report = {"seed_seconds": round(seed_s, 3), "ours_seconds": round(ours_s, 3),
              "speedup": round(seed_s / ours_s, 2), "min_cosine": round(float(cos.min()), 6)}
    details = {"chunks": len(idx), "audio_seconds": round(sum(secs), 1),
               "mean_chunk_seconds": round(float(np.mean(secs)), 2), "batches": len(batches),
               "batch_seconds": cfg.extract.batch_seconds,
               "frames_equal": all(len(s.final) == len(o) for s, o in zip(seed, ours)),
               "mean_cosine": round(float(cos.mean()), 6),
               "read_seconds": round(sum(reads), 3),
               "what": "the first chunks of training epoch 0; embedded backbone, final pooled states (25 Hz, "
                       "as with audio_unfreeze=0); both ways include the log-mel; audio read beforehand (not "
                       "timed); the ways alternate bucket by bucket; vectors = mean over the chunk's frames"}
    log(f"extract: {len(idx)} chunks ({sum(secs):.0f} audio-s): seed {seed_s:.1f} s, ours {ours_s:.2f} s "
        f"in {len(batches)} batches -> {seed_s / ours_s:.1f}x, min cosine {cos.min():.5f}")
    return report, details


def _heads_only_step_seconds(trainer, batches: list, cached_audio, threads: int) -> float:
    """Mean step time with the audio top as the identity, on 25 Hz stand-ins of the cached frames."""
    from shared.top_layers import IdentityTop
    d, audio = trainer.train_data, trainer.model.audio
    idx = sorted({int(i) for b in batches for i in b})
    half = {i: (x[0:len(x) // 2 * 2:2].astype(np.float32) + x[1:len(x) // 2 * 2:2]) / 2
            for i, x in zip(idx, cached_audio.items(idx))}
    top, d.audio = audio.top, ListAudio(half)
    audio.top = IdentityTop()
    try:
        with torch_threads(threads):
            trainer.step(batches[0])                               # warm-up for the new shapes
            t0 = time.perf_counter()
            for b in batches:
                trainer.step(b)
            return (time.perf_counter() - t0) / len(batches)
    finally:
        audio.top, d.audio = top, cached_audio


def cached_epoch(setup: TrainSetup, budget: float, label: str) -> tuple[float, int]:
    """Time epoch 0's steps on the cache (all, or as many as fit in `budget` seconds, at least 3):
    (seconds, steps timed). Runs with the config's train.threads, as `make train` does."""
    from tqdm import tqdm
    trainer, batches = setup.trainer, setup.batches
    with torch_threads(setup.step_threads):
        trainer.step(batches[-1])                                 # warm-up (not counted)
        done, t0 = 0, time.perf_counter()
        for b in tqdm(batches, desc=f"train: cached steps ({label})", unit="step", mininterval=2.0):
            trainer.step(b)
            done += 1
            if done >= 3 and time.perf_counter() - t0 > budget:
                break
        return time.perf_counter() - t0, done


def bench_train(cfg: Config, backbone, setup: TrainSetup, cached_budget: float, log,
                earlier: tuple[float, int] | None = None) -> tuple[dict, dict]:
    """The cached epoch (timed now, and averaged with an `earlier` timing taken before the extract
    part, so the two timings bracket the seed-way encodings in time), and batch 0 the seed's way: its
    chunks read and encoded padded (reused from the extract part), then the same step.
    Steps run with the config's train.threads, encoders with ENCODER_THREADS."""
    from tqdm import tqdm
    trainer, batches = setup.trainer, setup.batches
    d = trainer.train_data
    total_items = sum(len(b) for b in batches)
    timings = [t for t in (earlier, cached_epoch(setup, cached_budget, "after")) if t is not None]
    per_item = [sec / sum(len(b) for b in batches[:n]) for sec, n in timings]
    cached_s = float(np.mean(per_item)) * total_items
    done = min(n for _, n in timings)
    cached_measured = float(np.mean([sec for sec, _ in timings]))
    step_s = float(np.mean([sec / n for sec, n in timings]))

    # batch 0 the seed's way: every chunk read and encoded padded, then the step (the extract part's
    # encodings of these very chunks are reused, with their measured read and encode times)
    first = [int(i) for i in batches[0]]
    missing = [i for i in first if i not in setup.seed]
    if missing:
        waves, reads = read_chunk_audio([setup.chunks[i] for i in missing])
        seed_encode(backbone, waves[0], setup.tap_layer)          # warm-up
        for i, w, r in zip(missing, tqdm(waves, desc="train: batch 0 encoded the seed's way", unit="chunk",
                                         mininterval=2.0), reads):
            setup.seed[i] = seed_encode_timed(backbone, w, r, setup.tap_layer)
    enc = [setup.seed[i] for i in first]
    encode_s = sum(s.read_seconds + s.encode_seconds for s in enc)
    tap_of = {i: s.tap for i, s in zip(first, enc)}
    cached_audio = d.audio
    d.audio = ListAudio(tap_of)
    try:
        with torch_threads(setup.step_threads):
            t0 = time.perf_counter()
            trainer.step(batches[0])
            online_step = time.perf_counter() - t0
    finally:
        d.audio = cached_audio
    online_measured = encode_s + online_step
    online_s = scaled_seconds(online_measured, len(first), total_items)
    check = first[:8]   # the online features must be what the cache holds (float16 there)
    diffs = [float(np.abs(tap_of[i] - w.astype(np.float32)).max()) if tap_of[i].shape == w.shape else float("inf")
             for i, w in zip(check, cached_audio.items(check))]
    report = {"online_seconds": round(online_s, 1), "cached_seconds": round(cached_s, 2),
              "speedup": round(online_s / cached_s, 1)}
    details = {"steps": len(batches), "chunks": total_items, "step_seconds": round(step_s, 4),
               "step_threads": setup.step_threads, "encoder_threads": ENCODER_THREADS,
               "cached_estimated": done < len(batches), "cached_batches": done,
               "cached_measured_seconds": round(cached_measured, 2),
               "cached_timings": [{"seconds": round(sec, 3), "steps": n} for sec, n in timings],
               "cached_seconds_label": "cached_seconds" if done == len(batches) else
               f"cached_seconds (estimated from {done} of {len(batches)} batches)",
               "online_estimated": True, "online_batches": 1,
               "online_measured_seconds": round(online_measured, 2),
               "online_step_seconds": round(online_step, 3),
               "online_encode_seconds": round(sum(s.encode_seconds for s in enc), 2),
               "online_read_seconds": round(sum(s.read_seconds for s in enc), 3),
               "online_seconds_label": f"online_seconds (estimated from 1 batch = {len(first)} chunks, "
                                       f"scaled to {total_items})",
               "online_vs_cache_max_abs_diff": round(max(diffs), 4),
               "tap": ("final states" if setup.tap_layer == len(backbone.tower.layers)
                       else f"states entering tower layer {setup.tap_layer}"),
               "what": "Trainer.step over epoch 0's batches (model setup and loading the cache not timed), timed "
                       "before and after the extract part and averaged. The online way = batch 0's chunks read and "
                       "run through the frozen tower padded to 30 s (timed in the extract part), then the same "
                       "step; the online time of the epoch is scaled from that batch by chunk count"}
    msg = ""
    if setup.tap_layer < len(backbone.tower.layers):
        # the trainable top dominates a CPU step: what the same comparison gives when only heads train
        heads_step = _heads_only_step_seconds(trainer, batches[:3], cached_audio, setup.step_threads)
        heads_cached = heads_step * len(batches)
        heads_online = scaled_seconds(encode_s + heads_step, len(first), total_items)
        details["what_if_heads_only"] = {
            "step_seconds": round(heads_step, 4), "cached_seconds": round(heads_cached, 2),
            "online_seconds": round(heads_online, 1), "speedup": round(heads_online / heads_cached, 1),
            "what": "the same steps with the audio top replaced by the identity (audio_unfreeze=0: only the heads "
                    "train) on 25 Hz stand-in features (cached frames averaged in pairs): step time depends on "
                    "shapes only. A what-if on this cache, not the config's setting"}
        details["what"] += ("; the online way's trainable top runs on true-length frames, so the seed's real cost "
                            "(top layers on 1500 padded frames too) is higher: the speedup is a lower bound")
        msg = f"; what-if heads only: {heads_step:.2f} s/step -> {heads_online / heads_cached:.0f}x"
    log(f"train: cached {step_s:.3f} s/step x {len(batches)} steps = {cached_s:.1f} s"
        f"{' (estimated from %d steps)' % done if done < len(batches) else ''}; online batch 0 "
        f"{online_measured:.0f} s ({len(first)} padded encodes + step) -> epoch {online_s:.0f} s (estimated) "
        f"-> {online_s / cached_s:.0f}x{msg}")
    return report, details


def _read_sequentially(paths: list[Path]) -> tuple[int, float]:
    """A plain read: every file front to back into one buffer that holds them all, as the table must end
    up in memory for in-memory training (what any reader must at least do). One fresh buffer for both
    ways: reads into small arrays freed one after another get already-mapped pages back from malloc, a
    cost a loader that keeps the data cannot avoid, and the comparison would measure the allocator."""
    sizes = [p.stat().st_size for p in paths]
    t0 = time.perf_counter()
    buf = np.empty(sum(sizes), dtype=np.uint8)
    pos = 0
    for p, n in zip(paths, sizes):
        with open(p, "rb") as f:
            f.readinto(memoryview(buf[pos:pos + n]))
        pos += n
    return pos, time.perf_counter() - t0


def _shard_files(table) -> list[Path]:
    files = []
    for k in range(table.plan.shards):
        p = table.shard_path(k)
        files += sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    return files


def hdf5_copy(features: Path, root: Path, table_name: str = "audio/train") -> Path:
    """The table re-written as HDF5 shards (same items, same ids) through the cache's own writer."""
    from shared.cache import FeatureCache
    src = FeatureCache(features)
    t = src.table(table_name)
    shas = [m["sha256"] for m in t.meta()]
    fp = {"copy_of": str(features), "table": table_name, "shards_sha256": shas}
    try:
        dst = FeatureCache.create(root, fingerprint=fp, tables={table_name: t.plan}, dims=src.index["dims"],
                                  fmt="hdf5", dtype=src.index["dtype"])
    except BadInput:  # the demo cache changed since the last copy: start over
        shutil.rmtree(root)
        dst = FeatureCache.create(root, fingerprint=fp, tables={table_name: t.plan}, dims=src.index["dims"],
                                  fmt="hdf5", dtype=src.index["dtype"])
    out = dst.table(table_name)
    for k in range(t.plan.shards):
        if not out.is_done(k):
            r = t.reader(k)
            frames, offsets = r.frames_all(), r.offsets
            items = [frames[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
            out.write_shard(k, t.meta()[k]["ids"], items)
    src.close()
    return root


def _loader_pass(root: Path, table_name: str, batches: list, in_memory: bool) -> tuple[int, float]:
    """One epoch of the training data path: Ragged as SplitData builds it, items read batch by batch."""
    from shared.cache import FeatureCache
    from stage2_train.data import Ragged
    t0 = time.perf_counter()
    cache = FeatureCache(root)
    ragged = Ragged(cache.table(table_name), in_memory)
    nbytes = 0
    for b in batches:
        for x in ragged.items(b):
            nbytes += x.nbytes
    seconds = time.perf_counter() - t0
    cache.close()
    return nbytes, seconds


def bench_loader(cfg: Config, features: Path, out: Path, log, repeats: int = 3) -> tuple[dict, dict]:
    from shared.cache import FeatureCache
    from stage2_train.data import SplitData, global_batches, want_in_memory
    cache = FeatureCache(features)
    split = SplitData(cache, "train", in_memory="no")
    t = cfg.train
    batches = global_batches(split.terms, len(split), t.batch_size, t.seed, 0, t.term_cap)
    table_bytes = cache.table("audio/train").nbytes()
    in_memory = want_in_memory(t.in_memory, table_bytes)
    roots = {cache.format: features}
    other = "hdf5" if cache.format == "zarr" else "zarr"
    if other == "hdf5":
        roots["hdf5"] = hdf5_copy(features, out / "hdf5_copy")
    else:
        log("loader: the demo cache is hdf5; the zarr figure is left out (no zarr copy is made)")
    cache.close()
    report, details = {}, {"mode": "in memory" if in_memory else "from disk",
                           "table": "audio/train", "table_mb": round(table_bytes / 2 ** 20, 1)}
    for fmt, root in sorted(roots.items(), key=lambda kv: kv[0] != "zarr"):
        table = FeatureCache(root).table("audio/train")
        files = _shard_files(table)
        _read_sequentially(files)                                   # warm the page cache for both ways
        raw = min((_read_sequentially(files) for _ in range(repeats)), key=lambda r: r[1])
        main = min((_loader_pass(root, "audio/train", batches, in_memory) for _ in range(repeats)),
                   key=lambda r: r[1])
        disk = _loader_pass(root, "audio/train", batches, False)    # per-item reads: the TB-scale path
        raw_mb_s = raw[0] / raw[1] / 2 ** 20
        loader_mb_s = main[0] / main[1] / 2 ** 20
        disk_mb_s = disk[0] / disk[1] / 2 ** 20
        report[fmt] = {"raw_mb_s": round(raw_mb_s, 1), "loader_mb_s": round(loader_mb_s, 1),
                       "fraction": round(loader_mb_s / raw_mb_s, 3)}
        details[fmt] = {"files": len(files), "file_mb": round(raw[0] / 2 ** 20, 1),
                        "from_disk_per_item_mb_s": round(disk_mb_s, 1),
                        "from_disk_fraction": round(disk_mb_s / raw_mb_s, 3),
                        "from_disk_ms_per_item": round(1000 * disk[1] / len(split), 3)}
        log(f"loader {fmt}: raw {raw_mb_s:.0f} MB/s, training path ({details['mode']}) {loader_mb_s:.0f} MB/s "
            f"-> {loader_mb_s / raw_mb_s:.2f}; item by item from disk {disk_mb_s:.0f} MB/s "
            f"({1000 * disk[1] / len(split):.2f} ms/item)")
    details["what"] = ("loader = one epoch in training order (global_batches, epoch 0) through stage2_train.data."
                       "Ragged as SplitData builds it for this config (train.in_memory=auto -> "
                       f"{details['mode']}): its construction (bulk shard reads, concatenation) plus every item "
                       "read; from_disk = the same with per-item reads (what a cache larger than memory gets); "
                       "raw = the same shard files read whole with np.fromfile; page cache warm for all (files "
                       f"read once before timing); best of {repeats}")
    return report, details


def synthetic_glossary(n: int, dim: int, seed: int, tokens=(3, 8)) -> list[np.ndarray]:
    """Cached text features of n terms: (L, dim) float16, L tokens in `tokens` (MiniLM: [CLS] term [SEP])."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(tokens[0], tokens[1] + 1, n)
    flat = rng.standard_normal((int(lengths.sum()), dim), dtype=np.float32).astype(np.float16)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return [flat[offsets[i]:offsets[i + 1]] for i in range(n)]


def synthetic_table(trainer, lm_items: list[np.ndarray]):
    """A TermTable of len(lm_items) synthetic terms as the trainer's text side reads them: the LM
    states given, and 20-40 random n-gram ids each (a term's spelling + phones) for form parts."""
    from shared.termside import TermTable
    side = trainer.model.text
    n = len(lm_items)
    grams = None
    if side.bag is not None:
        rng = np.random.default_rng(3)
        grams = [np.unique(rng.integers(0, side.buckets, int(rng.integers(20, 41)))) for _ in range(n)]
    return TermTable(lm_items if side.lm is not None else None, np.arange(n), grams, np.arange(n))


def bench_mining(cfg: Config, setup: TrainSetup, glossary_size: int, log, run: str | Path = "cache/runs/demo",
                 features: Path | None = None, out: Path = Path("cache/bench"),
                 steps_around: int = 5) -> tuple[dict, dict]:
    """One refresh over a synthetic glossary, between `steps_around` cached steps before and after it
    (their mean is the step time of the share), all with the training's thread count."""
    trainer, batches = setup.trainer, setup.batches
    dim = int(trainer.cache.index["dims"]["text"])
    real = trainer.gloss, trainer.equivalent, trainer.owner
    synthetic = synthetic_table(trainer, synthetic_glossary(glossary_size, dim, seed=1))
    # After a full epoch every chunk has an embedding; the steps timed here saw only some, so the
    # others get random unit vectors (the search costs the same whatever the values).
    unseen = np.flatnonzero(~trainer.seen)
    if len(unseen):
        fill = np.random.default_rng(2).standard_normal((len(unseen), trainer.memory.shape[1])).astype(np.float32)
        trainer.memory[unseen] = fill / np.linalg.norm(fill, axis=1, keepdims=True)
        trainer.seen[:] = True
    around = [batches[i % len(batches)] for i in range(2 * steps_around)]
    with torch_threads(setup.step_threads):
        trainer.step(around[-1])                                  # warm-up (not counted)
        t0 = time.perf_counter()
        for b in around[:steps_around]:
            trainer.step(b)
        before = time.perf_counter() - t0
        (trainer.gloss, trainer.equivalent, trainer.owner), hard = (synthetic, {}, np.arange(glossary_size)), \
            trainer.hard.copy()
        mine_from, trainer.cfg.train.mine_from = trainer.cfg.train.mine_from, "all"
        try:
            trainer.mining_seconds = 0.0
            # every synthetic row is searched: with mine_from = "train" only the rows of terms the train split
            # holds would be (a few hundred of the 100,000 here), which is not what the figure is about
            stats = trainer.refresh_hard_negatives()
            seconds = trainer.mining_seconds
        finally:   # the mined ids point into the synthetic glossary: the real one comes back with its ids
            (trainer.gloss, trainer.equivalent, trainer.owner), trainer.hard = real, hard
            trainer.cfg.train.mine_from = mine_from
        t0 = time.perf_counter()
        for b in around[steps_around:]:
            trainer.step(b)
        after = time.perf_counter() - t0
    step_seconds = (before + after) / len(around)
    every = cfg.train.hard_refresh
    share = refresh_share(seconds, step_seconds, every)
    recall, recall_how = negatives_recall(cfg, run, features, out, glossary_size, log)
    report = {"glossary_size": glossary_size, "refresh_seconds": round(seconds, 3),
              "fraction_of_train": round(share, 4), "negatives_recall_vs_exact": round(recall, 3)}
    details = {"chunks": int(trainer.seen.sum()), "text_dim": dim, "hard_refresh": every,
               "step_seconds": round(step_seconds, 4), "threads": setup.step_threads,
               "search_seconds": round(stats.get("seconds", float("nan")), 3),
               "text_head_seconds": round(seconds - stats.get("seconds", float("nan")), 3),
               "random_memory_rows": int(len(unseen)),
               "what": "Trainer.refresh_hard_negatives with an embedding for every train chunk (as after epoch 0; "
                       "rows no timed step produced are random unit vectors): the text head over the synthetic "
                       "glossary's cached features (float16, 3-8 tokens of the real width), then the FAISS "
                       f"search of all its rows (mine_from = all) and the filters; step time = mean of the {len(around)} cached steps timed around it; "
                       "fraction = refresh / (hard_refresh x step + refresh)"}
    details["index"] = cfg.train.mine_index
    details["recall"] = recall_how
    log(f"mining: {glossary_size:,} terms, {details['chunks']} chunks: refresh {seconds:.2f} s (text head "
        f"{details['text_head_seconds']:.2f} s, search {details['search_seconds']:.2f} s) every {every} steps of "
        f"{step_seconds:.3f} s -> {share:.3f} of training; the index keeps {recall:.3f} of the exact negatives")
    return report, details


def negatives_recall(cfg: Config, run: str | Path, features: Path, out: Path, n_terms: int, log
                     ) -> tuple[float, dict]:
    """Share of the exact search's top-k negatives that the configured index (train.mine_index) also
    finds, where it matters: the trained run's dev-chunk embeddings against `n_terms` real-looking names
    (random vectors have no neighbourhoods, so no approximate index would find theirs)."""
    from shared.cache import FeatureCache
    from shared.heads import embed
    from stage2_train.data import SplitData
    from stage2_train.mining import mine_hard_negatives
    from stage3_index.retriever import Retriever
    run = Path(run)
    if not (run / "best.pt").is_file():
        log(f"mining: no trained run in {run}: the recall of the approximate search is not measured")
        return float("nan"), {"run": str(run), "measured": False}
    r = Retriever.load(run, glossary=stream_glossary(features, n_terms, out / "mining_glossary.txt"),
                       threshold=0.0, log=None)
    dev = SplitData(FeatureCache(features), "dev", in_memory="no")
    audio = embed(r.model.audio, dev.audio.items(range(len(dev))))
    none = [set() for _ in range(len(audio))]
    k = cfg.train.hard_k
    exact, _ = mine_hard_negatives(audio, r.glossary.vectors, none, k=k, index_factory="Flat")
    approx, _ = mine_hard_negatives(audio, r.glossary.vectors, none, k=k, index_factory=cfg.train.mine_index)
    recall = float(np.mean([len(set(a) & set(e)) / max(1, len(set(e))) for a, e in zip(approx, exact)]))
    return recall, {"run": str(run), "measured": True, "glossary_rows": len(r.glossary.vectors),
                    "dev_chunks": len(audio), "k": k, "index": cfg.train.mine_index}


def bench_index(sizes: list[int], n_queries: int, exact_queries: dict, dim: int, log) -> tuple[dict, dict]:
    """Flat vs IVF per glossary size. Flat answers `exact_queries[n]` of the queries (its QPS and the
    exact top-10 come from those); the IVF answers all `n_queries`; recall is over the exact ones.
    nprobe = the smallest power of two whose recall on the first half of the exact queries is >= 0.96."""
    import faiss

    from shared.index import build_index, pow2_nlist, search
    report, details = {}, {}
    for n in sizes:
        t_part = time.perf_counter()
        log(f"index {n:,}: generating clustered vectors ...")
        vectors, _ = clustered_vectors(n, dim, n_clusters=max(1, n // 100), spread=0.7, seed=n)
        queries = perturbed_queries(vectors, n_queries, noise=0.5, seed=n + 1)
        n_exact = min(n_queries, exact_queries.get(n, n_queries))
        flat = build_index(vectors, "Flat")
        t0 = time.perf_counter()
        _, exact = search(flat, queries[:n_exact], K)
        flat_s = time.perf_counter() - t0
        del flat
        nlist = pow2_nlist(n)
        log(f"index {n:,}: Flat {n_exact / flat_s:.1f} q/s; building IVF{nlist},Flat ...")
        t0 = time.perf_counter()
        ann = build_index(vectors, f"IVF{nlist},Flat", train_per_list=64)
        build_s = time.perf_counter() - t0
        del vectors
        ps, tried, tune = faiss.ParameterSpace(), {}, max(1, n_exact // 2)
        nprobe = 1
        while nprobe <= nlist:
            ps.set_index_parameter(ann, "nprobe", nprobe)
            tried[nprobe] = recall_vs_exact(search(ann, queries[:tune], K)[1], exact[:tune])
            if tried[nprobe] >= 0.96:
                break
            nprobe *= 2
        nprobe = min(nprobe, nlist)
        ps.set_index_parameter(ann, "nprobe", nprobe)
        t0 = time.perf_counter()
        _, ids = search(ann, queries, K)
        ann_s = time.perf_counter() - t0
        recall = recall_vs_exact(ids[:n_exact], exact)
        flat_qps, ann_qps = n_exact / flat_s, n_queries / ann_s
        report[str(n)] = {"flat_qps": round(flat_qps, 1), "ann_qps": round(ann_qps, 1),
                          "ann_recall_at_10_vs_flat": round(recall, 4), "build_seconds": round(build_s, 2)}
        details[str(n)] = {"ann_factory": f"IVF{nlist},Flat", "nprobe": nprobe, "train_vectors": min(n, 64 * nlist),
                           "nprobe_recall_on_tuning_queries": {str(p): round(r, 4) for p, r in tried.items()},
                           "flat_queries": n_exact, "ann_queries": n_queries, "recall_queries": n_exact,
                           "part_seconds": round(time.perf_counter() - t_part, 1)}
        log(f"index {n:,}: Flat {flat_qps:.1f} q/s ({n_exact} queries); IVF{nlist},Flat nprobe {nprobe} "
            f"{ann_qps:.0f} q/s ({n_queries} queries) = {ann_qps / flat_qps:.1f}x, recall@10 {recall:.3f}, "
            f"build {build_s:.1f} s")
        del ann
    details["data"] = ("clustered synthetic: n/100 random unit centres, points = normalise(centre + 0.7 g/sqrt(d)) "
                       "(cosine ~0.82 to their centre, ~0.67 between two points of a cluster, ~0 across), queries = "
                       "database points + noise 0.5 (cosine ~0.9 to their source). Uniform random vectors have no "
                       "neighbourhood structure (every point is about as far as every other), so no ANN index can "
                       "beat Flat on them; real embeddings are clustered. nprobe: smallest power of two with recall "
                       ">= 0.96 on the first half of the exact queries; recall reported over all of them. "
                       f"faiss threads: {faiss.omp_get_max_threads()}")
    return report, details


def _run_memory_child(cfg_path: str | None, overrides: list[str], out: Path) -> float:
    """Peak RSS (MB) of one extraction, in a fresh process: RUSAGE_SELF of the child, reported by it."""
    shutil.rmtree(out, ignore_errors=True)
    args = json.dumps({"config": cfg_path, "overrides": overrides, "out": str(out)})
    proc = subprocess.run([sys.executable, "-m", "stage3_index.bench", "memory-child", args],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                               "TOKENIZERS_PARALLELISM": "false"})
    shutil.rmtree(out, ignore_errors=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{\"peak_rss_kb\"")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the extraction child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])["peak_rss_kb"] / 1024


def bench_memory(cfg_path: str | None, overrides: list[str], out: Path, n: int, log) -> tuple[dict, dict]:
    shard = max(1, n // 2)
    peaks, seconds = {}, {}
    for label, limit in (("n", n), ("4n", 4 * n)):
        log(f"memory: extracting {limit} chunks per split (shards of {shard}) in a child process ...")
        t0 = time.perf_counter()
        peaks[label] = _run_memory_child(cfg_path, [*overrides, f"extract.limit={limit}",
                                                    f"extract.shard_size={shard}"], out / f"memory_{label}")
        seconds[label] = round(time.perf_counter() - t0, 1)
    report = {"peak_rss_mb_n": round(peaks["n"], 1), "peak_rss_mb_4n": round(peaks["4n"], 1)}
    details = {"n": n, "shard_size": shard, "child_seconds": seconds,
               "what": "python -m stage1_extract's extract() in a fresh child per run, extract.limit = N and 4N "
                       "chunks per split (all three splits, plus the glossary and chunk texts), shards of N/2 "
                       "chunks, into throwaway caches under the bench folder; peak = the child's VmHWM"}
    log(f"memory: peak RSS {peaks['n']:.0f} MB at N={n}, {peaks['4n']:.0f} MB at 4N={4 * n}")
    return report, details


def _memory_child(arg: str) -> None:
    import torch
    torch.set_num_threads(ENCODER_THREADS)
    from shared.config import load_config
    from stage1_extract.extract import extract
    a = json.loads(arg)
    cfg = load_config(a["config"], a["overrides"])
    extract(cfg, out=a["out"], force=True, log=lambda *x: None)
    print(json.dumps({"peak_rss_kb": peak_rss_kb()}), flush=True)


def peak_rss_kb() -> int:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries the parent's RSS at
    fork into a child's ru_maxrss across exec, so a child of a big parent would report the parent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # no /proc (macOS: bytes, not kB)


# ---------------------------------------------------------------- stream: inference latency

def talk_audio(manifest: Path, seconds: float) -> np.ndarray:
    """About `seconds` of real speech: the whole recordings behind a manifest's first chunks, end to end."""
    from shared.audio import read_audio
    from shared.manifest import read_chunks
    parts, total, seen = [], 0, set()
    for c in read_chunks(manifest):
        if c.audio in seen:
            continue
        seen.add(c.audio)
        parts.append(read_audio(c.audio, allow_silent=True))
        total += len(parts[-1])
        if total >= seconds * 16000:
            break
    return np.concatenate(parts)[:int(seconds * 16000)]


def stream_glossary(features: Path, n_terms: int, path: Path) -> Path:
    """A glossary file of `n_terms` real-looking names, one per line: the demo's terms, the cache's real
    distractor names, then two-word combinations of its one-word names (as many as needed)."""
    import itertools
    from shared.cache import FeatureCache
    from shared.glossary import normalize
    cache = FeatureCache(features)
    terms = list(cache.read_json("glossary.json")["texts"])
    names = cache.read_json("distractors.json") if (cache.root / "distractors.json").is_file() else []
    terms += names
    words = [w for w in names if " " not in w] or ["alpha", "beta", "gamma", "delta"]
    seen = {normalize(t) for t in terms}
    for a, b in itertools.product(words, words):
        if len(terms) >= n_terms:
            break
        if a != b and normalize(f"{a} {b}") not in seen:
            terms.append(f"{a} {b}")
    path.write_text("\n".join(terms[:n_terms]) + "\n", encoding="utf-8")
    return path


def bench_stream(cfg: Config, run: str | Path, out: Path, n_terms: int, seconds: float, log,
                 block_ms: int = 20) -> tuple[dict, dict]:
    """The live path a translator runs: `Retriever.stream()` fed `block_ms` blocks of a real recording,
    with a glossary of `n_terms` the run never saw (embedded once before timing). Per window: the wall
    time of the push that completed it (backbone + audio side + search); RTF = all pushes / audio."""
    import faiss
    from stage3_index.retriever import Retriever
    run = Path(run)
    if not run.is_dir():
        raise BadInput("the stream part needs a trained run", file=run, fix="run make first (make train)")
    _, features = _require_inputs(cfg)
    manifest = Path(cfg.data.chunks) / "test.jsonl"
    gpath = stream_glossary(features, n_terms, out / "stream_glossary.txt")
    t0 = time.perf_counter()
    r = Retriever.load(run, glossary=gpath, log=log)
    load_s = time.perf_counter() - t0
    with torch_threads(ENCODER_THREADS):
        faiss.omp_set_num_threads(ENCODER_THREADS)
        wav = talk_audio(manifest, seconds)
        stream, per_window, busy, n_windows = r.stream(top_k=5), [], 0.0, 0
        block = block_ms * 16
        stream.push(wav[:int(r.window * 16000)])     # warm-up (first call allocates), not timed
        stream.flush()
        for b in range(0, len(wav), block):
            t = time.perf_counter()
            got = stream.push(wav[b:b + block])
            dt = time.perf_counter() - t
            busy += dt
            if got:
                per_window += [dt / len(got) * 1000] * len(got)
                n_windows += len(got)
        t = time.perf_counter()
        n_windows += len(stream.flush())
        busy += time.perf_counter() - t
    audio_s = len(wav) / 16000
    report = {"window_ms_p50": float(np.percentile(per_window, 50)),
              "window_ms_p95": float(np.percentile(per_window, 95)),
              "real_time_factor": busy / audio_s}
    details = {"glossary_terms": len(r.glossary.terms), "glossary_rows": len(r.glossary.owner),
               "index": r.glossary.factory, "audio_seconds": audio_s, "windows": n_windows, "block_ms": block_ms,
               "window_s": r.window, "hop_s": r.hop, "threads": ENCODER_THREADS, "load_seconds": load_s,
               "run": str(run), "what": "Retriever.stream() pushes of block_ms blocks of the demo's test "
                                        "recordings; a window's time is the push that completed it"}
    log(f"stream: {n_windows} windows over {audio_s:.0f} s, p50 {report['window_ms_p50']:.0f} ms, "
        f"p95 {report['window_ms_p95']:.0f} ms, RTF {report['real_time_factor']:.3f}")
    return report, details


# ---------------------------------------------------------------- reexperiment: an idea in a minute

def bench_reexperiment(cfg: Config, features: Path, out: Path, quick: bool, log,
                       change: str = "loss.w_term=0.9") -> tuple[dict, dict]:
    """What caching is for: one idea (a loss-weight change) trained on the demo cache with the config's
    own epochs, early stopping and threads, then evaluated on dev, in a fresh run folder; wall seconds."""
    import torch
    from shared.config import load_config
    from stage2_train.train import train
    from stage3_index.evaluate import evaluate
    sets = [change] + (["train.epochs=1", "train.limit=256"] if quick else [])
    run_cfg = load_config(None, sets, base=cfg)
    run = out / "reexperiment_run"
    shutil.rmtree(run, ignore_errors=True)
    threads = torch.get_num_threads()
    try:
        t0 = time.perf_counter()
        tr = train(run_cfg, features, run, log=lambda *_: None)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        rep = evaluate(run, "dev", log=lambda *_: None)
        eval_s = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    r10 = rep["recall"].get("10")
    report = {"train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1),
              "dev_r10": float("nan") if r10 is None else round(float(r10), 4)}
    details = {"change": change, "steps": tr.state["step"], "epochs": tr.state["epoch"],
               "threads": run_cfg.train.threads, "run": str(run),
               "what": "stage2_train.train() on the demo cache with the config plus the change (its epochs, "
                       "early stopping and train.threads), then stage3_index.evaluate() on dev (the full report: "
                       "glossary sizes with distractors, rejection, cascade baseline); wall seconds in-process"}
    log(f"reexperiment: {change}: train {train_s:.1f} s ({tr.state['step']} steps), eval {eval_s:.1f} s, "
        f"dev R@10 {report['dev_r10']:.3f}")
    return report, details


# ---------------------------------------------------------------- the command

PARTS = ("extract", "train", "loader", "mining", "index", "memory", "stream", "reexperiment")   # the order of the README's table


def run_bench(cfg: Config, out: str | Path, *, quick: bool = False, parts=PARTS, config_path: str | None = None,
              overrides=(), run: str | Path = "cache/runs/demo", log=print) -> tuple[dict, dict]:
    """Run the chosen parts; write OUT/report.json and OUT/details.json; return both."""
    import faiss
    import torch
    torch.set_num_threads(ENCODER_THREADS)
    faiss.omp_set_num_threads(ENCODER_THREADS)
    t_all = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest, features = _require_inputs(cfg)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise BadInput(f"unknown bench parts {sorted(unknown)}", fix=f"choose from {', '.join(PARTS)}")
    size = {"extract_chunks": 200, "cached_budget_s": 40.0, "glossary": 100_000, "index": [100_000, 1_000_000],
            "queries": 10_000, "exact_queries": {100_000: 2000, 1_000_000: 300}, "memory_n": 16,
            "stream_terms": 10_000, "stream_seconds": 60.0}
    if quick:
        size = {"extract_chunks": 16, "cached_budget_s": 5.0, "glossary": 10_000, "index": [10_000, 100_000],
                "queries": 1000, "exact_queries": {100_000: 300}, "memory_n": 4,
                "stream_terms": 1000, "stream_seconds": 10.0}
        cfg = copy.deepcopy(cfg)
        cfg.train.limit, cfg.train.batch_size = 64, 16
    report, details = {}, {"quick": quick, "sizes": {k: v for k, v in size.items() if k != "exact_queries"},
                           "threads": torch.get_num_threads(), "load_average_at_start": os.getloadavg(),
                           "features": str(features), "manifest": str(manifest), "seconds": {}}
    details["sizes"]["exact_queries"] = {str(k): v for k, v in size["exact_queries"].items()}

    def timed(name, fn, *a):
        t0 = time.perf_counter()
        r = fn(*a)
        details["seconds"][name] = round(time.perf_counter() - t0, 1)
        return r

    if {"extract", "train", "mining"} & set(parts):
        t0 = time.perf_counter()
        backbone = _frozen_backbone(cfg)
        setup = TrainSetup(cfg, features, out, backbone)
        details["seconds"]["setup"] = round(time.perf_counter() - t0, 1)
        earlier = None
        if "train" in parts and "extract" in parts:
            earlier = timed("train_before", cached_epoch, setup, size["cached_budget_s"], "before")
        if "extract" in parts:
            report["extract"], details["extract"] = timed("extract", bench_extract, cfg, backbone, setup,
                                                          size["extract_chunks"], log)
        if "train" in parts:
            report["train"], details["train"] = timed("train", bench_train, cfg, backbone, setup,
                                                      size["cached_budget_s"], log, earlier)
        if "mining" in parts:
            report["mining"], details["mining"] = timed("mining", bench_mining, cfg, setup, size["glossary"], log,
                                                        run, features, out)
        del setup, backbone
    if "loader" in parts:
        report["loader"], details["loader"] = timed("loader", bench_loader, cfg, features, out, log)
    if "index" in parts:
        report["index"], details["index"] = timed("index", bench_index, size["index"], size["queries"],
                                                  size["exact_queries"], 512, log)
    if "memory" in parts:
        report["memory"], details["memory"] = timed("memory", bench_memory, config_path, list(overrides), out,
                                                    size["memory_n"], log)
    if "stream" in parts:
        report["stream"], details["stream"] = timed("stream", bench_stream, cfg, run, out, size["stream_terms"],
                                                    size["stream_seconds"], log)
    if "reexperiment" in parts:
        report["reexperiment"], details["reexperiment"] = timed("reexperiment", bench_reexperiment, cfg, features,
                                                                out, quick, log)
    details["load_average_at_end"] = os.getloadavg()
    report = {p: report[p] for p in PARTS if p in report}
    details["targets"] = {p: {"target": TARGETS[p], "met": target_met(p, report[p])} for p in report}
    details["flops_calculation"] = {"note": "CALCULATION from Qwen2-Audio-7B's config, not a measurement",
                                    "tower": QWEN2_AUDIO_TOWER, "lm": QWEN2_AUDIO_LM, "rows": flops_table()}
    details["seconds"]["total"] = round(time.perf_counter() - t_all, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "details.json").write_text(json.dumps(details, indent=1) + "\n")
    return report, details


def format_flops(rows: list[dict]) -> str:
    """The FLOPs calculation as a small table (GFLOP per second of audio)."""
    lines = ["CALCULATION (not a measurement), from Qwen2-Audio-7B's config: GFLOP per audio second",
             "  tower padded = audio tower on the chunk padded to 30 s; tower true = at true length;",
             "  LM true = what the language-model path adds over the chunk's 25 Hz audio tokens;",
             "  LM 750 = the same if all 750 padded audio tokens went through the LM",
             f"{'chunk':>6s} {'tower padded':>13s} {'tower true':>11s} {'ratio':>6s} {'LM true':>8s} {'LM 750':>8s}"]
    for r in rows:
        lines.append(f"{r['seconds']:5.1f}s {r['tower_padded_gflop_per_audio_s']:13,.0f} "
                     f"{r['tower_true_gflop_per_audio_s']:11,.1f} {r['tower_ratio']:5.1f}x "
                     f"{r['lm_true_tokens_gflop_per_audio_s']:8,.0f} {r['lm_750_tokens_gflop_per_audio_s']:8,.0f}")
    return "\n".join(lines)


@click.command("bench")
@config_options
@click.option("--out", default="cache/bench", show_default=True, type=click.Path(file_okay=False),
              help="Where report.json and details.json go (and the throwaway caches).")
@click.option("--quick", is_flag=True,
              help="A tiny version of every part (a smoke test of a few minutes; its figures mean little).")
@click.option("--only", default=",".join(PARTS), show_default=True,
              help="Comma-separated parts to run.")
@click.option("--run", default="cache/runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="The trained run the stream part loads.")
def bench_command(cfg: Config, out, quick, only, run):
    """Measure the design's promises against the seed's way: extract, train, loader, mining, index,
    memory. Needs the demo's manifests and feature cache (run make first). Writes OUT/report.json."""
    ctx = click.get_current_context()
    parts = tuple(p.strip() for p in only.split(",") if p.strip())
    report, details = run_bench(cfg, out, quick=quick, parts=parts, config_path=ctx.params.get("config_path"),
                                overrides=ctx.params.get("overrides", ()), run=run, log=click.echo)
    click.echo("")
    click.echo(format_table(report, details))
    click.echo("")
    click.echo(format_flops(details["flops_calculation"]["rows"]))
    click.echo(f"\nwrote {Path(out) / 'report.json'} and details.json in {details['seconds']['total']:.0f} s")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "memory-child":
        _memory_child(sys.argv[2])
