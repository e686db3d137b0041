"""The streaming retriever on a synthesised WAV whose 'term' (a tone band) sounds at a known time."""
import numpy as np
import soundfile as sf
import torch

from shared.heads import RetrievalModel, Tower
from shared.top_layers import IdentityTop
from stage3_index.retriever import Retriever, vote, windows

BANDS = np.array([300, 500, 800, 1200, 1800, 2500, 3300, 4500])


class BandBackbone:
    """Per 20 ms frame: energy near each of 8 frequencies (a toy 'acoustic' feature)."""

    def audio_features(self, waves):
        out = []
        for w in waves:
            n = len(w) // 320
            fr = w[: n * 320].reshape(n, 320) * np.hanning(320)
            spec = np.abs(np.fft.rfft(fr, axis=1))
            freqs = np.fft.rfftfreq(320, 1 / 16000)
            bands = np.stack([spec[:, np.abs(freqs - f) < 60].sum(1) for f in BANDS], 1)
            out.append(bands.astype(np.float32))
        return out


def make_retriever(threshold=0.8):
    audio = Tower(IdentityTop(), 8, 8)
    with torch.no_grad():
        audio.proj.weight.copy_(torch.eye(8))
        audio.proj.bias.zero_()
    model = RetrievalModel(audio, Tower(IdentityTop(), 8, 8)).eval()
    terms = [f"term{i}" for i in range(8)]
    return Retriever(BandBackbone(), model, terms, np.eye(8, dtype=np.float32), threshold)


def test_windows_cover_the_recording():
    spans = windows(16000 * 5, 1.92, 0.96)
    assert spans[0] == (0, 30720) and spans[-1][1] == 80000
    assert all(b[0] - a[0] == 15360 for a, b in zip(spans[:-2], spans[1:-1]))
    assert windows(1000, 1.92, 0.96) == [(0, 1000)]


def test_vote_groups_runs_and_needs_votes():
    spans = [(0, 2), (1, 3), (2, 4), (3, 5), (4, 6)]
    best = [(3, 0.9), (3, 0.95), (1, 0.5), (2, 0.85), (2, 0.99)]
    assert vote(spans, best, 0.8) == [(3, 0.95, 0, 3), (2, 0.99, 3, 6)]
    assert vote(spans, best, 0.8, min_votes=3) == []
    assert vote(spans, best, 0.97) == [(2, 0.99, 4, 6)]


def test_finds_the_term_at_the_right_time(tmp_path):
    sr = 16000
    rng = np.random.default_rng(0)
    wav = 0.003 * rng.standard_normal(sr * 8)
    t = np.arange(int(2.0 * sr)) / sr
    wav[2 * sr:4 * sr] += 0.3 * np.sin(2 * np.pi * BANDS[5] * t)     # term5 sounds from 2.0 s to 4.0 s
    path = tmp_path / "talk.wav"
    sf.write(path, wav.astype(np.float32), sr)
    hits = make_retriever().retrieve(path)
    assert [h["term"] for h in hits] == ["term5"]
    h = hits[0]
    assert h["score"] > 0.9
    assert 2.0 - 1.92 <= h["start"] <= 2.0 and 4.0 <= h["end"] <= 4.0 + 1.92
    # silence/noise alone is rejected
    sf.write(path, (0.003 * rng.standard_normal(sr * 4)).astype(np.float32), sr)
    assert make_retriever().retrieve(path) == []
