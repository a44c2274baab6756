"""On-the-fly training augmentation: speed perturbation, silence around the speech, a second clip after a
pause, and additive noise (conf/augment/, docs/augment.md).

What happens to a clip is decided by (seed, epoch, clip), and for a clip an oversampled corpus draws again in one
epoch by (seed, epoch, clip, repeat): a numpy Generator seeded with them draws the same numbers in any process, so a
resumed run replays the same augmented batches and DDP ranks agree, whatever the number of loader workers. Everything
runs in the loader workers, in numpy and libsoxr (no torch).

- Speed: a factor f from `speed_factors` (Kaldi, ESPnet and icefall use 0.9 / 1.0 / 1.1): the waveform is
  read as if recorded at f x its rate and resampled to 16 kHz, so tempo and pitch change together and the
  clip lasts duration / f (sox `speed`). For 48 kHz MP3 this is the resampling `audio.load` does anyway, at
  another ratio: it costs nothing more.
- Silence: seconds of zeros before and after the clip, each drawn uniformly from `silence_seconds`, so that the
  model does not learn where a clip's speech starts and ends from its edges (a model trained on clips that all
  start at their speech emits nothing right in a long recording's pauses: docs/augment.md).
- Concatenation: another training clip after the clip, `concat_gap` seconds of silence between them, and the
  two transcripts joined by a space, so the model learns to finish a sentence and put a word delimiter in a
  pause when speech follows. The partner is drawn among the clips short enough to fit `concat_seconds`
  (the room the plan keeps for it, with the gap) at the slowest speed factor; it takes the clip's speed.
- Noise: a file from `noise_dir`, drawn by category (`noise_weights`: the files in a subfolder named after a
  key, e.g. music/ or babble/, and under `noise` the files in no such subfolder), a segment of the clip's
  length at a random offset (repeated if the file is shorter), added at an SNR drawn uniformly from
  `noise_snr_db`, before the clip is normalised (over the silence too: the noise is the room's).
"""

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from asr import SetupError
from asr.core import audio

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Choice:
    """What happens to one clip: its speed factor, and the noise added to it (None: none)."""

    factor: float = 1.0
    noise: int | None = None  # index into Augment.noise_files
    offset: float = 0.0  # where the noise segment starts: a fraction of the room the file leaves
    snr_db: float = 0.0
    before: float = 0.0  # seconds of silence before the clip
    after: float = 0.0  # and after it
    partner: float | None = None  # another clip after this one: where in the partners (`Augment.partners`), [0, 1)
    gap: float = 0.0  # seconds of silence between the two

    def describe(self, augment: "Augment") -> str:
        parts = [f"speed {self.factor:g}"] if self.factor != 1.0 else []
        if self.before or self.after:
            parts.append(f"silence {self.before:.2f} s before, {self.after:.2f} s after")
        if self.partner is not None:
            parts.append(f"another clip after {self.gap:.2f} s")
        if self.noise is not None:
            parts.append(f"{augment.noise_name(self.noise)} at {self.snr_db:.1f} dB SNR")
        return ", ".join(parts) or "none"


NONE = Choice()


class Augment:
    """The training augmentation of a run; conf/data/default.yaml (`data.augment`) gives every setting and
    conf/augment/ its options. speed_prob: chance that a clip's factor is drawn from `speed_factors` (else
    1.0). silence_prob: chance that a clip gets silence around it, before and after each drawn from
    silence_seconds: [low, high]. concat_prob: chance that another clip follows it, after concat_gap: [low, high]
    seconds, within concat_seconds of room. noise_prob: chance that a clip gets noise. noise_snr_db: [low, high]
    dB. noise_weights: category -> weight (0 leaves it out)."""

    def __init__(self, speed_prob: float, speed_factors: list[float], silence_prob: float,
                 silence_seconds: list[float], concat_prob: float, concat_seconds: float, concat_gap: list[float],
                 noise_prob: float, noise_dir: str | None, noise_snr_db: list[float], noise_weights: dict[str, float],
                 seed: int):
        self.speed_prob, self.speed_factors = float(speed_prob), [float(f) for f in speed_factors]
        self.silence_prob, self.silence_seconds = float(silence_prob), [float(x) for x in silence_seconds]
        self.concat_prob, self.concat_seconds = float(concat_prob), float(concat_seconds)
        self.concat_gap = [float(x) for x in concat_gap]
        self.noise_prob, self.noise_dir = float(noise_prob), noise_dir
        self.noise_snr_db, self.noise_weights = [float(x) for x in noise_snr_db], dict(noise_weights)
        self.seed = seed
        self._problem = self._settings_problem()  # said by `check`, at start-up with the data's problems
        self.noise_files: list[tuple[str, int, int]] | None = None  # (path, frames, rate), once scanned
        self.noise_categories: list[str] = []  # of each noise file
        self.unreadable_noise: list[str] = []  # files skipped at start-up (no readable header)
        self._cumulative: np.ndarray | None = None  # categories' cumulative weights
        self._by_category: list[np.ndarray] = []  # noise file indices of each weighted category
        self._weighted: list[str] = []  # the categories drawn from

    def _settings_problem(self) -> str | None:
        if not all(0 <= p <= 1 for p in (self.speed_prob, self.silence_prob, self.concat_prob, self.noise_prob)):
            return ("data.augment.speed_prob, silence_prob, concat_prob and noise_prob are probabilities: give values "
                    "in [0, 1].")
        if self.speed_prob > 0 and (not self.speed_factors or min(self.speed_factors) <= 0):
            return f"data.augment.speed_factors={self.speed_factors}: give positive factors (e.g. [0.9, 1.0, 1.1])."
        if len(self.silence_seconds) != 2 or not 0 <= self.silence_seconds[0] <= self.silence_seconds[1]:
            return f"data.augment.silence_seconds={self.silence_seconds}: give [low, high] seconds, 0 <= low <= high."
        if len(self.concat_gap) != 2 or not 0 <= self.concat_gap[0] <= self.concat_gap[1] < self.concat_seconds:
            return (f"data.augment.concat_gap={self.concat_gap}, concat_seconds={self.concat_seconds:g}: give "
                    f"[low, high] seconds, 0 <= low <= high, and a room in concat_seconds larger than the gap.")
        if len(self.noise_snr_db) != 2 or self.noise_snr_db[0] > self.noise_snr_db[1]:
            return f"data.augment.noise_snr_db={self.noise_snr_db}: give [low, high] in dB."
        if self.noise_prob > 0 and not self.noise_dir:
            return "augment=noise needs its folder of noise audio: pass data.augment.noise_dir=<folder>."
        return None

    @property
    def active(self) -> bool:
        return self.speed_prob > 0 or self.silence_prob > 0 or self.concat_prob > 0 or self.noise_prob > 0

    @property
    def slowest(self) -> float:
        """The smallest factor a clip can get: its duration / this is the longest its speech can last."""
        return min(self.speed_factors) if self.speed_prob > 0 else 1.0

    def longest(self, seconds: np.ndarray) -> np.ndarray:
        """The longest each clip of `seconds` can last once augmented: slowed by the slowest factor, with the
        most silence on both sides and the room for a second clip. The batch plan is made on these."""
        return (seconds / self.slowest + (2 * self.silence_seconds[1] if self.silence_prob > 0 else 0.0)
                + (self.concat_seconds if self.concat_prob > 0 else 0.0))

    def expected(self, seconds: np.ndarray) -> np.ndarray:
        """Each clip's expected duration once augmented: seconds x E[1 / factor] + the expected silence and
        second clip (its gap and the partners' mean duration)."""
        stretch = 1.0 if self.speed_prob == 0 else \
            1 - self.speed_prob + self.speed_prob * float(np.mean([1 / f for f in self.speed_factors]))
        partners = self.partners(seconds)
        concat = self.concat_prob * (sum(self.concat_gap) / 2 + float(seconds[partners].mean()) * stretch) \
            if self.concat_prob > 0 and len(partners) else 0.0
        return seconds * stretch + self.silence_prob * sum(self.silence_seconds) + concat

    def partners(self, seconds: np.ndarray | None) -> np.ndarray:
        """The clips (indices into `seconds`) that fit the room for a second clip with the longest gap at the
        slowest speed: those concatenation draws from (none without durations)."""
        if seconds is None or self.concat_prob == 0:
            return np.zeros(0, np.int64)
        return np.flatnonzero(np.asarray(seconds) / self.slowest <= self.concat_seconds - self.concat_gap[1])

    def concat_partners(self, seconds: np.ndarray) -> dict:
        """How many of the training clips of `seconds` can follow another (`partners`), for the data report.
        SetupError, in one line, when none can: concatenation would then never happen. A warning when fewer than a
        tenth can: the same few clips would end every concatenated example."""
        partners, seconds = self.partners(seconds), np.asarray(seconds)
        room = f"a clip follows another when it lasts at most concat_seconds - the longest gap " \
               f"({self.concat_gap[1]:g} s)" \
               + (f" at the slowest speed ({self.slowest:g})" if self.slowest != 1.0 else "")
        median = float(np.median(seconds)) / self.slowest + self.concat_gap[1]
        if not len(partners):
            shortest = float(seconds.min()) / self.slowest + self.concat_gap[1]
            raise SetupError(f"data.augment.concat_seconds={self.concat_seconds:g} leaves no training clip short "
                             f"enough to follow another ({room}; the shortest lasts {float(seconds.min()):.2f} s): "
                             f"give concat_seconds={shortest:.2f} or more ({median:.2f} lets half the clips follow), "
                             f"or concat_prob=0.")
        if len(partners) < 0.1 * len(seconds):
            log.warning("only %d of %d training clips (%.0f%%) are short enough to follow another (%s; "
                        "data.augment.concat_seconds=%g): those few end every concatenated example; "
                        "concat_seconds=%.2f lets half the clips follow", len(partners), len(seconds),
                        100 * len(partners) / len(seconds), room, self.concat_seconds, median)
        return {"clips": int(len(partners)), "of_clips": round(len(partners) / len(seconds), 4)}

    def check(self) -> str | None:
        """Why these settings or the noise folder cannot be used (missing, empty, unreadable: the message names
        it), or None.
        Scans it once: every file's header (frames, rate); a file without a readable header is left out
        and listed in `unreadable_noise`."""
        if self._problem or self.noise_prob == 0 or self.noise_files is not None:
            return self._problem
        folder = Path(self.noise_dir).expanduser()
        if not folder.is_dir():
            return f"data.augment.noise_dir={self.noise_dir}: no such folder (augment=noise needs audio files there)."
        named = [k for k in self.noise_weights if k != "noise"]
        files, categories, errors = [], [], []
        for parent, dirs, names in os.walk(folder, onerror=errors.append):
            dirs.sort()
            relative = Path(parent).relative_to(folder).parts
            category = relative[0] if relative and relative[0] in named else "noise"
            for name in sorted(names):
                if name.startswith("."):
                    continue
                path = os.path.join(parent, name)
                try:
                    info = sf.info(path)
                except Exception:  # noqa: BLE001 (libsndfile raises several types; a text file, a broken header)
                    self.unreadable_noise.append(os.path.relpath(path, folder))
                    continue
                if info.frames > 0:
                    files.append((path, int(info.frames), int(info.samplerate)))
                    categories.append(category)
        if errors and not files:
            return f"data.augment.noise_dir={self.noise_dir}: cannot read the folder ({errors[0]})."
        weighted = [c for c, w in self.noise_weights.items() if w > 0 and c in categories]
        if not weighted:
            found = f"{len(self.unreadable_noise)} unreadable file(s)" if self.unreadable_noise else "no file"
            return (f"data.augment.noise_dir={self.noise_dir}: no readable audio file in a weighted category "
                    f"({found}; weights {self.noise_weights}: files in music/ or babble/ subfolders, the rest are "
                    f"`noise`).")
        self.noise_files, self.noise_categories = files, categories
        weights = np.array([self.noise_weights[c] for c in weighted], dtype=np.float64)
        self._cumulative = np.cumsum(weights / weights.sum())
        self._by_category = [np.flatnonzero(np.array(categories) == c) for c in weighted]
        self._weighted = weighted
        if self.unreadable_noise:
            log.warning("noise: %d file(s) of %s have no readable header and are left out: %s",
                        len(self.unreadable_noise), self.noise_dir, self.unreadable_noise[:5])
        return None

    def _scanned(self) -> None:
        problem = self.check()
        if problem:
            raise SetupError(problem)

    def choose(self, epoch: int, clip: int, force: bool = False, repeat: int = 0) -> Choice:
        """What happens to clip `clip` (its position in the training split) in `epoch`. The same thirteen
        uniform draws whatever the settings, so turning noise on does not change the speed factors (and the
        first seven are those of the releases before silence and concatenation: a run's speed and noise draws
        are unchanged).
        force: every augmentation applied whose probability is not 0 (an example to show).
        repeat: the clip's n-th draw again in this epoch (an oversampled corpus, `asr.data.mixing`): its own draws,
        from (seed, epoch, clip, repeat)."""
        if not self.active:
            return NONE
        u = np.random.default_rng([self.seed, epoch, clip] + ([repeat] if repeat else [])).random(13)
        factor = 1.0
        if self.speed_prob > 0 and (force or u[0] < self.speed_prob):
            factors = (([f for f in self.speed_factors if f != 1.0] or self.speed_factors) if force
                       else self.speed_factors)
            factor = factors[int(u[1] * len(factors))]
        around = {}  # silence before and after, another clip after a gap
        if self.silence_prob > 0 and (force or u[7] < self.silence_prob):
            low, high = self.silence_seconds
            around = {"before": float(low + u[8] * (high - low)), "after": float(low + u[9] * (high - low))}
        if self.concat_prob > 0 and (force or u[10] < self.concat_prob):
            low, high = self.concat_gap
            around.update(partner=float(u[11]), gap=float(low + u[12] * (high - low)))
        if self.noise_prob == 0 or not (force or u[2] < self.noise_prob):
            return Choice(factor, **around)
        self._scanned()
        category = min(int(np.searchsorted(self._cumulative, u[3], side="right")), len(self._by_category) - 1)
        files = self._by_category[category]
        snr = self.noise_snr_db[0] + u[6] * (self.noise_snr_db[1] - self.noise_snr_db[0])
        return Choice(factor, int(files[int(u[4] * len(files))]), float(u[5]), float(snr), **around)

    def noise_name(self, index: int) -> str:
        return os.path.relpath(self.noise_files[index][0], Path(self.noise_dir).expanduser())

    def noise(self, choice: Choice, samples: int) -> np.ndarray:
        """(samples,) float32 at 16 kHz: the chosen segment of the chosen noise file, repeated if it is
        shorter. Raises what libsndfile raises for a file that does not decode."""
        path, frames, rate = self.noise_files[choice.noise]
        needed = min(frames, -(-samples * rate // audio.SAMPLE_RATE) + 16)  # native frames, a little over
        start = int(choice.offset * (frames - needed))
        segment, rate = sf.read(path, start=start, frames=needed, dtype="float32", always_2d=True)
        segment = audio.to_mono(segment)
        if rate != audio.SAMPLE_RATE:
            segment = audio.resample(segment, rate, audio.SAMPLE_RATE)
        if not len(segment):
            raise ValueError(f"{path}: no samples decoded")
        return np.resize(segment, samples) if len(segment) < samples else segment[:samples]

    def __repr__(self) -> str:
        return f"Augment({self.summary()})"

    def summary(self, seconds: np.ndarray | None = None) -> dict:
        """What this augmentation does, for the data report; with the training clips' `seconds`, how many can
        follow another (`concat_partners`: SetupError when none can)."""
        out = {}
        if self.speed_prob > 0:
            out["speed"] = {"prob": self.speed_prob, "factors": self.speed_factors,
                            "planned_on": f"durations / {self.slowest:g} (the slowest factor)"}
        if self.silence_prob > 0:
            out["silence"] = {"prob": self.silence_prob, "seconds": self.silence_seconds,
                              "planned_on": f"durations + {2 * self.silence_seconds[1]:g} s (the most on both sides)"}
        if self.concat_prob > 0:
            out["concat"] = {"prob": self.concat_prob, "gap": self.concat_gap,
                             "planned_on": f"durations + {self.concat_seconds:g} s (the room for a second clip)"}
            if seconds is not None:
                out["concat"]["partners"] = self.concat_partners(seconds)
        if self.noise_prob > 0:
            self._scanned()
            counts = {c: self.noise_categories.count(c) for c in self._weighted}
            out["noise"] = {"prob": self.noise_prob, "dir": str(self.noise_dir), "snr_db": self.noise_snr_db,
                            "weights": {c: self.noise_weights[c] for c in self._weighted}, "files": counts,
                            "unreadable_at_start": len(self.unreadable_noise)}
        return out or {"none": True}


def mix(speech: np.ndarray, noise: np.ndarray, snr_db: float, reference: np.ndarray | None = None) -> np.ndarray:
    """speech + noise scaled to `snr_db` below the speech's mean power, in place in `speech`; silent noise adds
    nothing. reference: the samples whose mean power is the speech's (the clip without the silence put around
    it), else `speech` itself."""
    power = float(np.dot(noise, noise)) / len(noise) if len(noise) else 0.0
    if power > 0:
        reference = speech if reference is None else reference
        gain = np.sqrt(float(np.dot(reference, reference)) / len(reference) / (power * 10 ** (snr_db / 10)))
        speech += np.float32(gain) * noise
    return speech
