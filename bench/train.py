"""train: an epoch on the cache against the same epoch with the frozen encoder in the loop."""
from __future__ import annotations

import time

import numpy as np

from shared.config import Config
from bench.common import ENCODER_THREADS, ListAudio, TrainSetup, read_chunk_audio, scaled_seconds, seed_encode, seed_encode_timed, torch_threads


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
