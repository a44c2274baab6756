"""Audio decoding and the wav2vec2 input convention: 16 kHz mono float32, zero mean, unit variance."""

import numpy as np
import soundfile as sf
import torch
import torchaudio

SAMPLE_RATE = 16_000  # Hz, what every wav2vec2 / XLS-R checkpoint expects

# The wav2vec2 convolutional feature encoder, (kernel, stride) per layer: 400-sample receptive
# field, 320-sample hop, i.e. 50 frames per second at 16 kHz.
CONV_LAYERS = [(10, 5)] + [(3, 2)] * 4 + [(2, 2)] * 2


def load(path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """(samples,) float32 at `sample_rate`, channels averaged. Raises soundfile.LibsndfileError if corrupt."""
    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != sample_rate:
        audio = torchaudio.functional.resample(torch.from_numpy(audio), rate, sample_rate).numpy()
    return audio


def normalize(audio: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per utterance, as Wav2Vec2FeatureExtractor(do_normalize=True)."""
    return (audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)


def duration(path) -> float:
    """Seconds, from the file header (no decoding)."""
    return sf.info(path).duration


def encoder_frames(samples):
    """Output frames of the wav2vec2 feature encoder for `samples` at 16 kHz (about samples / 320); an int
    or a numpy array of them."""
    for kernel, stride in CONV_LAYERS:
        samples = np.maximum(0, (samples - kernel) // stride + 1)
    return samples
