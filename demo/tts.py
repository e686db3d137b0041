"""eSpeak NG speech synthesis with word times, for the offline demo corpus.

This module owns the one process-wide libespeak-ng handle: the `espeakng-loader` PyPI package
ships the shared library and its `espeak-ng-data` folder, so no system package is needed. The
library is called through ctypes in synchronous mode; word start times come from its word events
and word ends are the next word's start with trailing silence trimmed by energy.

libespeak-ng keeps global state, so every call goes through one lock and the library is
initialised once per process. Its noise generator is seeded from the clock at initialisation;
we reseed it before every utterance. Its waveform generator also carries state from one
utterance to the next (pitch flutter phase and the like; re-initialising does not reset it), so
the audio of an utterance depends on what the process synthesised before it: callers that need
byte-identical output synthesise a fixed sequence in a fresh process.

eSpeak NG is GPL-3.0: it only generates demo data and stays out of the trained model's path.
"""
from __future__ import annotations

import bisect
import ctypes
import os
import re
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np
import soxr

SAMPLE_RATE = 16000

# espeak_AUDIO_OUTPUT, espeak_PARAMETER, espeak_EVENT_TYPE and flag values from speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH, _PARAM_RANGE, _PARAM_WORDGAP = 1, 2, 3, 4, 7
_EVENT_LIST_TERMINATED, _EVENT_WORD = 0, 1
_POS_CHARACTER = 1
_CHARS_UTF8 = 1

_FRAME_S = 0.005            # energy frame for trimming word ends
_SILENCE_DB = -35.0         # frames this far below the utterance's loud frames count as silence
                            # (-35 dB stays above the echo tail of variants like f3)
_PAUSE_S = 0.04             # a silent run this long inside a span is a pause
_ONSET_LEAK_S = 0.03
_LEADING_PAUSE_S = 0.12     # a longer silent start of a word is a pause, not a stop closure
_END_MARGIN_S = 0.01        # keep a little release after the last loud frame
_MIN_WORD_S = 0.03


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),   # 1-based character index into the text
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # ms from the start of this synthesis call
        ("sample", ctypes.c_int),          # samples from the start of this synthesis call
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_void_p),           # union of number / name / char[8]
    ]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.POINTER(_Event))

_LOCK = threading.Lock()
_ENGINE: "_Engine | None" = None


class _Engine:
    """The loaded library plus the buffers its (global) callback fills during one call."""

    def __init__(self):
        import espeakng_loader

        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.data_dir = Path(espeakng_loader.get_data_path())
        lib = self.lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_ng_SetRandSeed.restype = None
        # espeak_Initialize wants the folder that contains espeak-ng-data
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 500,
                                     os.fsencode(self.data_dir.parent), 0)
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({rate}) with data folder "
                               f"{self.data_dir}; reinstall espeakng-loader")
        self.native_rate = rate
        self.chunks: list[np.ndarray] = []
        self.word_events: list[tuple[int, int]] = []   # (char index, sample)
        self._callback = _CALLBACK(self._on_audio)     # keep a reference: C holds a raw pointer
        lib.espeak_SetSynthCallback(self._callback)

    def _on_audio(self, wav, n, events):
        if n > 0 and wav:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            ev = events[i]
            if ev.type == _EVENT_WORD:
                self.word_events.append((ev.text_position - 1, ev.sample))
            i += 1
        return 0

    def synth(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int, volume: int):
        lib = self.lib
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak NG has no voice {voice!r}; "
                             "see demo.tts.english_voices()")
        for param, value in ((_PARAM_RATE, rate), (_PARAM_PITCH, pitch),
                             (_PARAM_RANGE, pitch_range), (_PARAM_VOLUME, volume),
                             (_PARAM_WORDGAP, 0)):
            lib.espeak_SetParameter(param, int(value), 0)
        # espeak_Initialize seeds the noise of breathy variants (f2, f3, ...) with the clock
        lib.espeak_ng_SetRandSeed(0)
        self.chunks, self.word_events = [], []
        data = text.encode("utf-8")
        err = lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed ({err}) for text {text[:60]!r}")
        audio = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)
        return audio, self.word_events


def _engine() -> _Engine:
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = _Engine()
    return _ENGINE


@lru_cache(maxsize=1)
def english_voices() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(English language names, voice variant names) shipped in the espeak-ng-data folder.

    A voice is a language file name, optionally with `+variant`: "en-us", "en-gb-scotland+f3".
    """
    import espeakng_loader

    data = Path(espeakng_loader.get_data_path())
    # eSpeak selects a language by its voice file name (case-insensitive), not by the
    # "language" codes inside the file: "en" is British English, "en-gb" is not a name
    languages = sorted(p.name.lower() for p in (data / "lang").rglob("en*") if p.is_file())
    languages = [lang for lang in languages if lang != "en-shaw"]  # Shavian script, not a voice
    variants = sorted(p.name for p in (data / "voices" / "!v").iterdir() if p.is_file())
    return tuple(languages), tuple(variants)


def voice_name(voice: str, variant: str | None) -> str:
    """'en-us' + 'f3' -> 'en-us+f3'; checks the variant exists (eSpeak ignores unknown ones)."""
    if variant is None and "+" in voice:
        voice, variant = voice.split("+", 1)
    if variant is None:
        return voice
    if variant not in english_voices()[1]:
        raise ValueError(f"eSpeak NG has no voice variant {variant!r}; choose one of "
                         f"espeak-ng-data/voices/!v: {', '.join(english_voices()[1])}")
    return f"{voice}+{variant}"


_TOKEN = re.compile(r"\S+")
_EDGE_PUNCT = re.compile(r"^[^\w]+|[^\w]+$")


def frame_rms(audio: np.ndarray, frame: int) -> np.ndarray:
    """RMS of consecutive non-overlapping frames (the last partial frame included)."""
    n = -(-len(audio) // frame)
    padded = np.zeros(n * frame, np.float64)
    padded[:len(audio)] = audio
    return np.sqrt((padded.reshape(n, frame) ** 2).mean(axis=1))


def word_times(tokens: list[tuple[int, int, str]], events: list[tuple[int, int]], audio: np.ndarray,
               sample_rate: int, event_rate: int) -> list[tuple[str, float, float]]:
    """Word intervals from eSpeak word events, one per whitespace token with letters or digits.

    tokens: (char start, char end, text); events: (char index, sample at `event_rate`).
    A token's span runs from its first event to the next evented token's start (or the end of
    audio). eSpeak speaks some word pairs ("for the") as one dictionary entry with one event;
    tokens without an event share the span of the evented token before them, split by length.
    Each span is then fitted to the audio: trailing silence is trimmed by energy (a pause after
    a comma belongs to no word) and a long silent start (a pause, not a stop closure) skipped.
    """
    total = len(audio) / sample_rate
    starts = [t[0] for t in tokens]
    first_sample: dict[int, int] = {}
    for pos, sample in events:
        k = bisect.bisect_right(starts, pos) - 1
        if k >= 0 and pos < tokens[k][1]:
            first_sample.setdefault(k, sample)
    evented = sorted(first_sample)
    if not evented:
        return []
    frame = max(1, int(round(_FRAME_S * sample_rate)))
    rms = frame_rms(audio, frame)
    threshold = max(1e-4, float(np.percentile(rms, 95)) * 10 ** (_SILENCE_DB / 20))
    active = rms > threshold
    out = []
    for i, k in enumerate(evented):
        start = min(first_sample[k] / event_rate, total)
        end = total
        if i + 1 < len(evented):
            end = min(first_sample[evented[i + 1]] / event_rate, total)
        start, end = _fit_span(active, frame / sample_rate, start, end)
        last = evented[i + 1] if i + 1 < len(evented) else len(tokens)
        first = 0 if i == 0 else k        # tokens before the first event join the first span
        labels = [_EDGE_PUNCT.sub("", tokens[j][2]) for j in range(first, last)]
        labels = [w for w in labels if w]
        weights = np.cumsum([0] + [len(w) for w in labels], dtype=np.float64)
        for w, a, b in zip(labels, weights[:-1], weights[1:]):
            t0 = start + (end - start) * a / weights[-1]
            t1 = start + (end - start) * b / weights[-1]
            out.append((w, min(round(float(t0), 4), total), min(round(float(t1), 4), total)))
    return out


def _fit_span(active: np.ndarray, frame_s: float, start: float, end: float) -> tuple[float, float]:
    """Shrink [start, end] to the speech in it: drop a trailing pause and a long leading pause."""
    f0, f1 = int(start / frame_s), int(np.ceil(end / frame_s))
    seg = active[f0:f1]
    idx = np.flatnonzero(seg)
    if len(idx) == 0:
        return start, max(start, min(end, start + _MIN_WORD_S))
    # the next word's onset can leak a few frames before its event: ignore a short active tail
    # that follows a real pause
    tail_limit = int(round(_ONSET_LEAK_S / frame_s))
    gap_limit = int(round(_PAUSE_S / frame_s))
    last = idx[-1]
    if len(seg) - 1 - last < gap_limit:
        run_start = last
        while run_start > 0 and seg[run_start - 1]:
            run_start -= 1
        if last - run_start + 1 <= tail_limit and run_start > 0:
            before = np.flatnonzero(seg[:run_start])
            if len(before) and run_start - 1 - before[-1] >= gap_limit:
                last = before[-1]
    new_start = start
    if (f0 + idx[0]) * frame_s - start > _LEADING_PAUSE_S:
        new_start = (f0 + idx[0]) * frame_s
    new_end = min(end, (f0 + last + 1) * frame_s + _END_MARGIN_S)
    return new_start, max(new_end, min(end, new_start + _MIN_WORD_S))


class Synth:
    """Text to 16 kHz float32 audio plus word times, through the process-wide eSpeak NG.

    >>> audio, words = Synth().say("Take paracetamol twice a day.", voice="en", variant="f3")
    >>> words[1]
    ('paracetamol', 0.3003, 0.9853)
    """

    def __init__(self, sample_rate: int = SAMPLE_RATE):
        self.sample_rate = sample_rate
        with _LOCK:
            self.native_rate = _engine().native_rate

    def say(self, text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50,
            variant: str | None = None, pitch_range: int = 50, volume: int = 100,
            ) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
        """Synthesise plain text (no SSML).

        rate: words per minute (80-450); pitch and pitch_range: 0-100 (50 = voice default);
        variant: a name from espeak-ng-data/voices/!v ("f3", "m2", "klatt", ...).
        Returns (mono float32 audio at `sample_rate`, [(word, start_s, end_s)]) with one entry per
        whitespace token that eSpeak spoke, edge punctuation stripped, case kept.
        """
        name = voice_name(voice, variant)
        with _LOCK:
            engine = _engine()
            pcm, events = engine.synth(text, name, rate, pitch, pitch_range, volume)
        audio = pcm.astype(np.float32) / 32768.0
        if self.native_rate != self.sample_rate and len(audio):
            audio = soxr.resample(audio, self.native_rate, self.sample_rate, quality="HQ")
        audio = np.ascontiguousarray(audio, dtype=np.float32)
        tokens = [(m.start(), m.end(), m.group()) for m in _TOKEN.finditer(text)]
        return audio, word_times(tokens, events, audio, self.sample_rate, self.native_rate)
