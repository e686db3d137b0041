"""Audio I/O: read a slice of a file (seek, never the whole file), mono, float32, 16 kHz.

GigaSpeech segments live inside long recordings, and chunks inside segments, so every read
is by offset and duration. Errors name the file and say what to do.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from shared.errors import BadInput

SAMPLE_RATE = 16000
# A slice may end up to this much short of what was asked (rounding of offsets and durations).
_SHORT_TOLERANCE = 0.02
_SILENCE_PEAK = 1e-4


def audio_info(path: str | Path, record: str | None = None) -> tuple[int, int]:
    """(sample rate, frames) of a file, with a clear error (naming `record`, the chunk or segment
    that points at the file) if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise BadInput("audio file missing", file=path, record=record,
                       fix="fix the path or drop the record with --skip-bad")
    if path.stat().st_size == 0:
        raise BadInput("audio file is empty (0 bytes)", file=path, record=record,
                       fix="re-export the audio or drop the record with --skip-bad")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as e:
        raise BadInput(f"unreadable audio ({e}); 16 kHz WAV expected", file=path, record=record,
                       fix="convert it to WAV/FLAC (e.g. ffmpeg -i in -ar 16000 -ac 1 out.wav)") from None
    return info.samplerate, info.frames


def read_audio(path: str | Path, offset: float = 0.0, duration: float | None = None, *,
               allow_silent: bool = False, record: str | None = None,
               channels: list[int] | None = None) -> np.ndarray:
    """Samples [offset, offset + duration) seconds of `path`, mono float32 at 16 kHz.

    Files at other rates (8 kHz, 44.1 kHz stereo...) are mixed down and resampled, not rejected.
    `channels` (0-based) mixes only those channels of the file: one side of a stereo call, say.
    """
    sr, frames = audio_info(path, record)
    start = int(round(offset * sr))
    if start >= frames or start < 0:
        raise BadInput(f"offset {offset:.3f}s is outside the audio ({frames / sr:.3f}s long)", file=path,
                       record=record, fix="check the segment offset / chunk times")
    n = frames - start if duration is None else int(round(duration * sr))
    if n <= 0:
        raise BadInput(f"non-positive duration {duration}", file=path, record=record)
    try:
        with sf.SoundFile(str(path)) as f:
            f.seek(start)
            data = f.read(n, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise BadInput(f"unreadable audio ({e})", file=path, record=record,
                       fix="the file may be truncated; re-export it or drop the record") from None
    if len(data) < n - _SHORT_TOLERANCE * sr:
        raise BadInput(f"audio ends at {frames / sr:.3f}s, before the requested end "
                       f"{offset + n / sr:.3f}s", file=path, record=record,
                       fix="the audio is shorter than its alignment; check offsets or drop the record")
    if channels is not None:
        if not channels or max(channels) >= data.shape[1]:
            raise BadInput(f"channels {channels} asked of a file with {data.shape[1]} channel(s)", file=path,
                           record=record,
                           fix="channel numbers count from 0 within the file; check the manifest's channel")
        data = data[:, channels]
    wav = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(wav).all():
        raise BadInput("audio holds NaN or Inf samples", file=path, record=record,
                       fix="re-export the audio or drop the record with --skip-bad")
    if sr != SAMPLE_RATE:
        wav = soxr.resample(wav, sr, SAMPLE_RATE, quality="HQ").astype(np.float32)
    if len(wav) == 0:
        raise BadInput("audio slice is empty", file=path, record=record)
    if not allow_silent and float(np.abs(wav).max()) < _SILENCE_PEAK:
        raise BadInput("audio slice is silent (all samples ~0)", file=path, record=record,
                       fix="check the offsets, or drop the record with --skip-bad")
    return np.ascontiguousarray(wav, dtype=np.float32)


def write_wav(path: str | Path, wav: np.ndarray, sr: int = SAMPLE_RATE) -> None:
    """PCM16 WAV; the format the users' tools expect."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.asarray(wav, dtype=np.float32), sr, subtype="PCM_16")
