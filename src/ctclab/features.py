"""Kaldi-compatible MFCC through kaldi-native-fbank (no dither, so features are deterministic)."""
from __future__ import annotations

import numpy as np


def mfcc(waveform: np.ndarray, sample_rate: int, num_ceps: int = 13, high_freq: float = 8000.0) -> np.ndarray:
    """[T, num_ceps] float32 MFCC; 25 ms windows, 10 ms hop, 23 mel bins up to `high_freq`
    (8 kHz mimics 16 kHz LibriSpeech bandwidth whatever the synthesis rate). `waveform` is mono
    on the int16 scale, as Kaldi expects."""
    import kaldi_native_fbank as knf

    opts = knf.MfccOptions()
    opts.frame_opts.samp_freq = float(sample_rate)
    opts.frame_opts.dither = 0.0
    opts.mel_opts.num_bins = 23
    opts.mel_opts.high_freq = high_freq
    opts.num_ceps = num_ceps
    extractor = knf.OnlineMfcc(opts)
    extractor.accept_waveform(float(sample_rate), np.asarray(waveform, dtype=np.float32).tolist())
    extractor.input_finished()
    n = extractor.num_frames_ready
    if n == 0:
        return np.zeros((0, num_ceps), np.float32)
    return np.stack([np.asarray(extractor.get_frame(i), np.float32) for i in range(n)])
