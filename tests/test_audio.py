import numpy as np
import pytest
import soundfile as sf

from shared.audio import read_audio
from shared.errors import BadInput


def test_slice_by_offset_reads_the_right_samples(tmp_path):
    sr = 16000
    x = np.zeros(sr * 3, dtype=np.float32)
    x[sr:2 * sr] = 0.5                       # second 1..2 is loud
    p = tmp_path / "a.wav"
    sf.write(p, x, sr, subtype="FLOAT")
    y = read_audio(p, 1.0, 1.0)
    assert len(y) == sr and np.allclose(y, 0.5)
    assert len(read_audio(p, 1.0, None, allow_silent=True)) == 2 * sr


@pytest.mark.parametrize("sr,channels", [(8000, 1), (44100, 2)])
def test_resample_and_mixdown(tmp_path, tone, sr, channels):
    p = tmp_path / "a.wav"
    sf.write(p, tone(2.0, sr, channels), sr)
    y = read_audio(p, 0.5, 1.0)
    assert y.dtype == np.float32 and y.ndim == 1 and abs(len(y) - 16000) <= 2
    # still a 440 Hz tone after resampling: the spectrum peaks there
    spec = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spec) * 16000 / len(y) - 440) < 5


def test_errors_name_file_and_fix(tmp_path, tone):
    missing = tmp_path / "nope.wav"
    with pytest.raises(BadInput, match="audio file missing") as e:
        read_audio(missing)
    assert str(missing) in str(e.value) and "--skip-bad" in str(e.value)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(BadInput, match="empty"):
        read_audio(empty)
    text = tmp_path / "text.wav"
    text.write_text("this is not audio at all" * 10)
    with pytest.raises(BadInput, match="unreadable"):
        read_audio(text)
    good = tmp_path / "g.wav"
    sf.write(good, tone(1.0), 16000)
    trunc = tmp_path / "trunc.wav"
    trunc.write_bytes(good.read_bytes()[:30])
    with pytest.raises(BadInput, match="unreadable|empty|outside"):
        read_audio(trunc)
    with pytest.raises(BadInput, match="outside the audio"):
        read_audio(good, 5.0, 1.0, record="chunk 7")
    with pytest.raises(BadInput, match="before the requested end"):
        read_audio(good, 0.5, 2.0)
    silent = tmp_path / "s.wav"
    sf.write(silent, np.zeros(16000, np.float32), 16000)
    with pytest.raises(BadInput, match="silent"):
        read_audio(silent)
    nan = tmp_path / "nan.wav"
    x = tone(1.0)
    x[100] = np.nan
    sf.write(nan, x, 16000, subtype="FLOAT")
    with pytest.raises(BadInput, match="NaN"):
        read_audio(nan)
