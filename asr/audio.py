"""Audio decoding and the wav2vec2 input convention: 16 kHz mono float32, zero mean, unit variance."""

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16_000  # Hz, what every wav2vec2 / XLS-R checkpoint expects

# The wav2vec2 convolutional feature encoder, (kernel, stride) per layer: 400-sample receptive
# field, 320-sample hop, i.e. 50 frames per second at 16 kHz.
CONV_LAYERS = [(10, 5)] + [(3, 2)] * 4 + [(2, 2)] * 2
HOP = 320  # samples per encoder frame: the product of the strides


def load(path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """(samples,) float32 at `sample_rate`, channels averaged. Raises soundfile.LibsndfileError if corrupt.

    Resampled by libsoxr (python-soxr, HQ: passband to 91% of Nyquist, 95 dB stop band), which keeps its
    filters between calls. torchaudio's `resample` designed a new windowed-sinc filter for every clip and was
    the loader's bottleneck (48 kHz MP3 -> 16 kHz: ~440 vs ~3,200 audio-s/s per core; benchmarks/loader.py).
    The two agree to ~73 dB on a tone (tests/test_audio.py); soxr gives round(n x ratio) samples where
    torchaudio gave ceil(n x ratio), one sample fewer at most."""
    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    audio = audio[:, 0] if audio.shape[1] == 1 else audio.mean(axis=1, dtype=np.float32)
    if rate != sample_rate:
        audio = soxr.resample(np.ascontiguousarray(audio), rate, sample_rate, quality="HQ")
    return audio


def normalize(audio: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per utterance, as Wav2Vec2FeatureExtractor(do_normalize=True). In place (no copy
    of the clip: `load` returns the loader's own array), float32; returns `audio`."""
    audio -= audio.mean(dtype=np.float64)
    audio *= 1 / np.sqrt(np.dot(audio, audio) / max(1, len(audio)) + 1e-7)
    return audio


def duration(path) -> float:
    """Seconds, from the file header (no decoding)."""
    return sf.info(path).duration


def encoder_frames(samples):
    """Output frames of the wav2vec2 feature encoder for `samples` at 16 kHz (about samples / 320); an int
    or a numpy array of them."""
    for kernel, stride in CONV_LAYERS:
        samples = np.maximum(0, (samples - kernel) // stride + 1)
    return samples
