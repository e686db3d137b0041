"""Shared fixtures: stable thread counts, offline hub, small WAV writers."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch

# One thread: tiny models gain nothing from two, and a busy 2-core machine makes two much slower.
torch.set_num_threads(1)


@pytest.fixture
def tone():
    """A 440 Hz tone of `seconds` at `sr`, optionally stereo."""
    def make(seconds=1.0, sr=16000, channels=1, amp=0.3):
        t = np.arange(int(seconds * sr)) / sr
        x = (amp * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        return np.stack([x] * channels, axis=1) if channels > 1 else x
    return make
