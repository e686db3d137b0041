"""Augmentation of cached audio frames, so training sees more voices than the corpus has.

The frozen encoder's states are cached once, so waveform augmentation would mean re-extracting;
these work on the cached frames instead, per chunk and per step:

- speed: resample the frame sequence by a random factor in [1 - speed, 1 + speed] (linear
  interpolation along time): a faster or slower speaker;
- mask: zero one random span of `mask` x the chunk's frames (SpecAugment's time mask): the model
  cannot rely on any one part of the term;
- noise: add Gaussian noise of `noise` x each feature's spread over the chunk.

Pure numpy on lists of (T_i, D) arrays; `rng` is anything with numpy's legacy `random(size)`
(the trainer passes `np.random`, whose state its checkpoints save, so a resumed run is exact).
"""
from __future__ import annotations

import numpy as np


def augment_frames(items: list[np.ndarray], rng, speed: float = 0.0, mask: float = 0.0,
                   noise: float = 0.0) -> list[np.ndarray]:
    out = []
    for x in items:
        x = np.asarray(x, dtype=np.float32)
        T = len(x)
        if speed > 0 and T > 1:
            factor = 1.0 + speed * (2.0 * float(rng.random()) - 1.0)
            n = max(1, int(round(T / factor)))
            pos = np.linspace(0.0, T - 1.0, n)
            lo = np.floor(pos).astype(np.int64)
            hi = np.minimum(lo + 1, T - 1)
            w = (pos - lo)[:, None].astype(np.float32)
            x = (1.0 - w) * x[lo] + w * x[hi]
            T = n
        else:
            x = x.copy()
        if mask > 0 and T > 2:
            width = int(round(mask * T))
            if width:
                start = int(float(rng.random()) * (T - width + 1))
                x[start:start + width] = 0.0
        if noise > 0 and T > 1:
            spread = x.std(axis=0, keepdims=True) + 1e-6
            x = x + noise * spread * _normal(rng, x.shape)
        out.append(x.astype(np.float32))
    return out


def _normal(rng, shape) -> np.ndarray:
    # Box-Muller from uniforms, so any generator with random(size) will do
    u1 = np.clip(rng.random(shape), 1e-12, 1.0)
    u2 = rng.random(shape)
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)).astype(np.float32)
