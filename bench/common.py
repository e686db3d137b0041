"""What several bench parts share: pure helpers (unit-tested), the seed's way of encoding, thread
control, the demo inputs and the training setup the extract, train and mining parts time."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path

import numpy as np

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
