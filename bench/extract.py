"""extract: the seed's padded, one-at-a-time encoding against ours at true length, on the same chunks."""
from __future__ import annotations

import time

import numpy as np

from shared.config import Config
from bench.common import TrainSetup, pooled_cosines, read_chunk_audio, seed_encode, seed_encode_timed


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
