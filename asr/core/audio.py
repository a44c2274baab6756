"""Audio decoding and the wav2vec2 input convention: 16 kHz mono float32, zero mean, unit variance."""

import os
import re

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16_000  # Hz, what every wav2vec2 / XLS-R checkpoint expects
# Why a clip cannot be used, as the data report counts it (asr.data.module) and transcribe.py says it
MISSING, EMPTY, UNREADABLE = "missing_file", "empty_file", "unreadable_audio"


def load(path, sample_rate: int = SAMPLE_RATE, speed: float = 1.0) -> np.ndarray:
    """(samples,) float32 at `sample_rate`, channels averaged. Raises `AudioError` (reason, message) for a file
    that is missing, empty or does not decode.

    Resampled by libsoxr (python-soxr, HQ: passband to 91% of Nyquist, 95 dB stop band), which keeps its
    filters between calls. torchaudio's `resample` designed a new windowed-sinc filter for every clip and was
    the loader's bottleneck (48 kHz MP3 -> 16 kHz: ~440 vs ~3,200 audio-s/s per core; benchmarks/loader.py).
    The two agree to ~73 dB on a tone (tests/test_audio.py); soxr gives round(n x ratio) samples where
    torchaudio gave ceil(n x ratio), one sample fewer at most.

    speed: speed perturbation (`asr.data.augment`): the clip is read as if recorded at `speed` x its rate, so it
    lasts duration / speed, pitch and tempo changed together (sox `speed`); one resampling either way."""
    try:
        wave, rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as error:  # noqa: BLE001 (libsndfile raises several types)
        raise AudioError(*problem(path, error)) from error
    wave = to_mono(wave)
    if rate * speed != sample_rate:
        wave = resample(wave, rate * speed, sample_rate)
    return wave


class AudioError(Exception):
    """A clip that cannot be used: `reason` (MISSING, EMPTY, UNREADABLE) and a message naming the file."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def problem(path, error: Exception | None = None) -> tuple[str, str]:
    """(reason, message) of a file that did not load, given libsndfile's `error` if any: it does not exist,
    is a directory, is empty (0 bytes), or does not decode as audio (libsndfile's words)."""
    if not os.path.exists(path):
        return MISSING, f"{path} does not exist"
    if os.path.isdir(path):
        return UNREADABLE, f"{path} is a directory, not an audio file"
    if os.path.getsize(path) == 0:
        return EMPTY, f"{path} is empty (0 bytes)"
    if error is None:
        try:
            sf.info(path)
        except Exception as raised:  # noqa: BLE001
            error = raised
    detail = re.sub(r"^Error opening .*?: ", "", str(error).strip().splitlines()[0]) if error else ""
    if "does not exist" in detail:  # libsndfile's words for a stream its decoders all refused: misleading here
        detail = ""
    return UNREADABLE, f"{path} does not decode as audio" + (f" ({detail.rstrip('.')})" if detail else "")


def to_mono(wave: np.ndarray) -> np.ndarray:
    """(samples,) of a (samples, channels) array: its one channel (a view), or the channels averaged."""
    return wave[:, 0] if wave.shape[1] == 1 else wave.mean(axis=1, dtype=np.float32)


def resample(wave: np.ndarray, rate: float, sample_rate: int) -> np.ndarray:
    """(samples,) float32 from `rate` to `sample_rate` Hz: round(n x sample_rate / rate) samples, soxr HQ."""
    return soxr.resample(np.ascontiguousarray(wave), rate, sample_rate, quality="HQ")


def normalize(audio: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per utterance, as Wav2Vec2FeatureExtractor(do_normalize=True). In place (no copy
    of the clip: `load` returns the loader's own array), float32; returns `audio`."""
    audio -= audio.mean(dtype=np.float64)
    audio *= 1 / np.sqrt(np.dot(audio, audio) / max(1, len(audio)) + 1e-7)
    return audio


def duration(path) -> float:
    """Seconds, from the file header (no decoding)."""
    return sf.info(path).duration

