"""The frame geometry of a wav2vec2 model: how its convolutional feature encoder turns samples into frames,
read from the model's config (`conv_kernel`, `conv_stride`). The one place frames are counted: the batch
plan rounds clips to its hop, the data checks count a transcript's frames with it, the network's encoder
pass and the CTC loss take their frame counts from it.

XLS-R, and every wav2vec2 checkpoint of fairseq's, has 7 layers: (kernel, stride) (10, 5), then (3, 2) x4
and (2, 2) x2: a 400-sample receptive field and a 320-sample hop, 50 frames per second at 16 kHz.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

from asr.core.audio import SAMPLE_RATE


@dataclass(frozen=True)
class Geometry:
    """(kernel, stride) per convolutional layer of the feature encoder."""

    kernels: tuple[int, ...]
    strides: tuple[int, ...]

    @classmethod
    def of(cls, config) -> "Geometry":
        """The geometry of a `Wav2Vec2Config` (or a dict of its fields; the absent ones are its defaults)."""
        if isinstance(config, dict):
            return cls(tuple(config.get("conv_kernel", WAV2VEC2.kernels)),
                       tuple(config.get("conv_stride", WAV2VEC2.strides)))
        return cls(tuple(config.conv_kernel), tuple(config.conv_stride))

    @property
    def hop(self) -> int:
        """Samples per frame: the product of the strides."""
        return math.prod(self.strides)

    @property
    def seconds_per_frame(self) -> float:
        """Seconds from one frame's start to the next's (a frame t starts at t x hop samples)."""
        return self.hop / SAMPLE_RATE

    def whole_hops(self, seconds: float) -> int:
        """Samples of `seconds` rounded to the nearest whole number of hops (transformers' ASR pipeline's
        `chunk_length_s` and `stride_length_s`)."""
        return int(round(seconds * SAMPLE_RATE / self.hop) * self.hop)

    @property
    def receptive_field(self) -> int:
        """Samples behind one frame: the shortest clip with a frame (400 for XLS-R: 25 ms)."""
        return sum((k - 1) * math.prod(self.strides[:n]) for n, k in enumerate(self.kernels)) + 1

    def layer_lengths(self, samples: int) -> list[int]:
        """The output length of each layer for a clip of `samples`."""
        lengths = []
        for kernel, stride in zip(self.kernels, self.strides):
            samples = max(0, (samples - kernel) // stride + 1)
            lengths.append(samples)
        return lengths

    def frames(self, samples):
        """Frames of a clip of `samples` (about samples / hop): an int, or a numpy array or torch tensor of
        them elementwise (a tensor stays one: the ONNX graph counts frames with tensor ops, `asr.model.onnx`).
        HF's `Wav2Vec2Model._get_feat_extract_output_lengths` computes the same (tests/test_data.py)."""
        for kernel, stride in zip(self.kernels, self.strides):
            samples = (samples - kernel) // stride + 1
            samples = samples.clamp(min=0) if isinstance(samples, torch.Tensor) else np.maximum(0, samples)
        return samples

    def padded(self, seconds) -> np.ndarray:
        """Samples of clips of `seconds` rounded up to a whole number of hops: the lengths the batch plan
        pads to (`asr.data.batching`). int64, elementwise."""
        samples = np.round(np.asarray(seconds, dtype=np.float64) * SAMPLE_RATE)
        return (np.ceil(samples / self.hop) * self.hop).astype(np.int64)


# transformers' Wav2Vec2Config defaults: XLS-R's geometry, and the demo's tiny model's
WAV2VEC2 = Geometry(kernels=(10, 3, 3, 3, 3, 2, 2), strides=(5, 2, 2, 2, 2, 2, 2))
