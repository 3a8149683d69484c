"""Thin ctypes binding to the libespeak-ng bundled by the `espeakng-loader` wheel.

Synthesises one utterance into int16 PCM plus eSpeak's own phoneme events (mnemonic and sample
position), which the corpus turns into ARPAbet labels. libespeak-ng keeps hidden state between
syntheses, so callers that need bit-identical audio synthesise each utterance in a fresh process
(see ctclab.corpus).

    python -c "from ctclab.espeak import Synthesizer; print(Synthesizer().synthesize('hello world'))"
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INIT_PHONEME_EVENTS = 0x0001
_INIT_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EVENT_LIST_TERMINATED = 0
_EVENT_PHONEME = 7
PARAM_RATE, PARAM_PITCH, PARAM_RANGE, PARAM_WORDGAP = 1, 3, 4, 7


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.POINTER(_Event))


@dataclass
class Synthesis:
    samples: np.ndarray  # int16 mono PCM
    sample_rate: int
    phonemes: list[tuple[str, int]]  # (eSpeak mnemonic, start sample), in spoken order


class Synthesizer:
    """One initialised libespeak-ng per process (the library itself is a process-wide singleton)."""

    def __init__(self) -> None:
        import espeakng_loader

        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self._lib.espeak_Initialize.restype = ctypes.c_int
        self._lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self._lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                           ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self._lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self._lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        data_path = espeakng_loader.get_data_path().encode()
        self.sample_rate = self._lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path, _INIT_PHONEME_EVENTS | _INIT_DONT_EXIT)
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed with {self.sample_rate} (data at {data_path!r})")
        self._chunks: list[np.ndarray] = []
        self._phonemes: list[tuple[str, int]] = []
        self._callback = _CALLBACK(self._on_audio)  # kept referenced: the C side holds the pointer
        self._lib.espeak_SetSynthCallback(self._callback)

    @staticmethod
    def variants_dir() -> Path:
        import espeakng_loader

        return Path(espeakng_loader.get_data_path()) / "voices" / "!v"

    def _on_audio(self, wav, num_samples, events) -> int:
        if num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            if events[i].type == _EVENT_PHONEME:
                self._phonemes.append((events[i].id.string.decode("ascii", "replace"), events[i].sample))
            i += 1
        return 0

    def synthesize(self, text: str, voice: str = "en-us", rate: int = 170, pitch: int = 50,
                   pitch_range: int = 50, word_gap: int = 0) -> Synthesis:
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak has no voice {voice!r}")
        for param, value in ((PARAM_RATE, rate), (PARAM_PITCH, pitch), (PARAM_RANGE, pitch_range),
                             (PARAM_WORDGAP, word_gap)):
            self._lib.espeak_SetParameter(param, int(value), 0)
        self._chunks, self._phonemes = [], []
        encoded = text.encode("utf-8")
        buf = ctypes.create_string_buffer(encoded)
        status = self._lib.espeak_Synth(buf, len(encoded) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if status != 0:
            raise RuntimeError(f"espeak_Synth failed with status {status} for {text!r}")
        self._lib.espeak_Synchronize()
        samples = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return Synthesis(samples.astype(np.int16), self.sample_rate, list(self._phonemes))
