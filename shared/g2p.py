"""Grapheme-to-phoneme: how a term is pronounced, for the text side's `phones` part.

Stage 1 turns every glossary form, chunk text and distractor into an IPA string once and caches it;
stage 3 does the same for a glossary the run never saw. The one G2P here is eSpeak NG (the
`espeakng-loader` PyPI package ships the library and its data), called through ctypes
(`espeak_TextToPhonemes`). Stress marks are dropped: speakers and synthesisers place them
differently, and an unstressed match should still count.

Licence: eSpeak NG is GPL-3.0. Used here as a run-time G2P it sits in the trained model's input
path, which is a licence question for anyone shipping a product; `text.encoders` without "phones"
(spelling only) needs no G2P at all.
"""
from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

_STRESS = str.maketrans("", "", "ˈˌ")
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_CHARS_UTF8 = 1
_PHONEMES_IPA = 0x02
_LOCK = threading.Lock()
_LIB = None
_VOICE = None


def _lib():
    global _LIB
    if _LIB is None:
        import espeakng_loader

        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int]
        lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        data = Path(espeakng_loader.get_data_path())
        # espeak_Initialize wants the folder that contains espeak-ng-data
        if lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 500, os.fsencode(data.parent), 0) <= 0:
            raise RuntimeError(f"espeak_Initialize failed with data folder {data}; reinstall espeakng-loader")
        _LIB = lib
    return _LIB


def g2p_fingerprint(name: str = "espeak", voice: str = "en-us") -> dict:
    """What a cached phone string depends on: the G2P, its version and voice."""
    if name == "none":
        return {"name": "none"}
    import importlib.metadata
    return {"name": name, "voice": voice, "version": importlib.metadata.version("espeakng-loader")}


def phonemize(texts: list[str], voice: str = "en-us") -> list[str]:
    """IPA strings (stress removed, words separated by spaces) for `texts`, in order."""
    global _VOICE
    out = []
    with _LOCK:
        lib = _lib()
        # another user of the library in this process (the demo's synthesiser) may change the voice
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak NG has no voice {voice!r}")
        _VOICE = voice
        for text in texts:
            data = ctypes.c_char_p(text.encode("utf-8"))
            ptr = ctypes.cast(ctypes.pointer(data), ctypes.POINTER(ctypes.c_char_p))
            words = []
            # one call per clause; the library advances the pointer and sets it to NULL at the end
            while ptr.contents.value:
                res = lib.espeak_TextToPhonemes(ptr, _CHARS_UTF8, _PHONEMES_IPA)
                if res:
                    words.append(res.decode("utf-8", "replace").strip())
            out.append(" ".join(w for w in words if w).translate(_STRESS))
    return out
