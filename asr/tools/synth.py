"""Synthetic speech corpora in real release layouts, spoken by espeak-ng.

Used to build the embedded demo (`python -m asr.tools.synth out=demo/cv-pt`) and, in the tests, corpora
with planted defects. Nothing here is used by training itself.
"""

import csv
import hashlib
import io
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio
from omegaconf import OmegaConf

from asr import REPO_DIR
from asr.tools import cli

# Common Voice TSV columns of recent releases (docs/data.md).
CV_COLUMNS = [
    "client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes",
    "down_votes", "age", "gender", "accents", "variant", "locale", "segment",
]
CV_EXTRA_TSVS = ["validated.tsv", "other.tsv", "invalidated.tsv"]


@dataclass
class Voice:
    """One synthetic speaker: an espeak-ng voice with a variant, speed (words/min) and pitch (0-99)."""

    name: str
    speed: int
    pitch: int

    @property
    def client_id(self) -> str:
        # Common Voice client ids are 128-hex-digit hashes; ours are stable per voice.
        return hashlib.sha512(f"{self.name}/{self.speed}/{self.pitch}".encode()).hexdigest()

    @property
    def gender(self) -> str:
        return "female_feminine" if "+f" in self.name else "male_masculine"


def require_espeak() -> str:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        sys.exit("espeak-ng is not installed: run the README's set-up (apt-get install espeak-ng).")
    return espeak


def speak(text: str, voice: Voice, sample_rate: int = 48_000) -> np.ndarray:
    """(samples,) float32 speech at `sample_rate` (espeak-ng renders 22.05 kHz; we resample)."""
    wav = subprocess.run(
        [require_espeak(), "-v", voice.name, "-s", str(voice.speed), "-p", str(voice.pitch), "--stdout", text],
        check=True, capture_output=True,
    ).stdout
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    audio = torchaudio.functional.resample(torch.from_numpy(audio), rate, sample_rate).numpy()
    return 0.9 * audio / max(1e-3, float(np.abs(audio).max()))


def write_mp3(path: Path, audio: np.ndarray, sample_rate: int = 48_000) -> None:
    # Constant low bitrate keeps the committed demo small; speech stays intelligible.
    sf.write(path, audio, sample_rate, format="MP3", subtype="MPEG_LAYER_III",
             compression_level=0.95, bitrate_mode="CONSTANT")


def write_common_voice(root: Path, splits: dict[str, list[tuple[str, Voice]]], locale: str,
                       audio_for=None) -> None:
    """Write a Common Voice release directory: clips/*.mp3, one TSV per split, clip_durations.tsv.

    `splits` maps a split name (train, dev, test) to (sentence, voice) pairs. `audio_for(i, sentence,
    voice)` may return the audio of clip i (default: speak it), so tests can plant tones or silence.
    """
    root = Path(root)
    (root / "clips").mkdir(parents=True, exist_ok=True)
    durations, index = [], 0
    all_rows = []
    for split, items in splits.items():
        rows = []
        for sentence, voice in items:
            clip = f"common_voice_{locale}_{40_000_000 + index}.mp3"
            audio = audio_for(index, sentence, voice) if audio_for else speak(sentence, voice)
            write_mp3(root / "clips" / clip, audio)
            durations.append((clip, round(1000 * len(audio) / 48_000)))
            sentence_id = hashlib.sha256(sentence.encode()).hexdigest()
            rows.append([voice.client_id, clip, sentence_id, sentence, "", "2", "0", "", voice.gender,
                         "", "", locale, ""])
            index += 1
        write_tsv(root / f"{split}.tsv", CV_COLUMNS, rows)
        all_rows += rows
    write_tsv(root / "validated.tsv", CV_COLUMNS, all_rows)
    for name in ("other.tsv", "invalidated.tsv"):
        write_tsv(root / name, CV_COLUMNS, [])
    write_tsv(root / "clip_durations.tsv", ["clip", "duration[ms]"], durations)


def write_tsv(path: Path, header: list[str], rows: list[list]) -> None:
    # Common Voice TSVs are unquoted: quote characters are part of the sentences.
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar=None, quotechar=None,
                            lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_zeroth(root: Path, parts: dict[str, list[tuple[str, str, np.ndarray]]]) -> None:
    """Write the OpenSLR 40 (Zeroth-Korean) layout: `<part>/003/<speaker>/<speaker>_003_<NNNN>.flac` at
    16 kHz and `<speaker>_003.trans.txt`. parts: {"train_data_01": [(speaker, sentence, 16 kHz audio)]}."""
    for part, items in parts.items():
        by_speaker: dict[str, list[tuple[str, np.ndarray]]] = {}
        for speaker, sentence, audio in items:
            by_speaker.setdefault(speaker, []).append((sentence, audio))
        for speaker, clips in by_speaker.items():
            folder = Path(root) / part / "003" / speaker
            folder.mkdir(parents=True, exist_ok=True)
            lines = []
            for n, (sentence, audio) in enumerate(clips):
                utt_id = f"{speaker}_003_{n:04d}"
                sf.write(folder / f"{utt_id}.flac", audio, 16_000)
                lines.append(f"{utt_id} {sentence}\n")
            (folder / f"{speaker}_003.trans.txt").write_text("".join(lines), encoding="utf-8")
    (Path(root) / "AUDIO_INFO").write_text("SPEAKERID|NAME|SEX|SCRIPTID|DATASET\n", encoding="utf-8")


def wav_bytes(audio: np.ndarray, sample_rate: int = 16_000) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def write_hf_dataset(root: Path, splits: dict[str, list[dict]], layout: str = "save_to_disk") -> None:
    """A local `datasets` copy as users have them: `save_to_disk` (arrow shards, dataset_dict.json) or
    `hub` (parquet files `main/<split>/0000.parquet`, as the hub's parquet conversion stores them).
    Rows hold an `audio` column of {"bytes", "path"} (16 kHz WAV bytes embedded) and any other columns."""
    import datasets

    tables = {}
    for split, rows in splits.items():
        table = datasets.Dataset.from_list(rows)
        tables[split] = table.cast_column("audio", datasets.Audio(sampling_rate=16_000))
    if layout == "save_to_disk":
        datasets.DatasetDict(tables).save_to_disk(str(root))
    else:
        for split, table in tables.items():
            (Path(root) / "main" / split).mkdir(parents=True, exist_ok=True)
            table.to_parquet(str(Path(root) / "main" / split / "0000.parquet"))


# ---------------------------------------------------------------------------------------------
# The demo: short Portuguese sentences from a small grammar, so dev and test sentences are new
# combinations of words the model heard in training.

SUBJECTS = [
    "o gato", "a menina", "o meu irmão", "a professora", "o vizinho", "a minha avó", "o cão",
    "o pescador", "a cantora", "o médico", "a família", "o padeiro", "a criança", "o velho marinheiro",
]
VERBS = [
    "come", "vê", "procura", "compra", "leva", "encontra", "pinta", "guarda", "traz", "vende",
    "lava", "prepara",
]
OBJECTS = [
    "o pão", "uma laranja", "o livro azul", "a bicicleta", "um peixe grande", "as flores",
    "o chapéu velho", "a caixa de madeira", "um bolo de chocolate", "a carta", "o barco",
    "as batatas", "um copo de leite", "a chave da porta",
]
PLACES = [
    "na cozinha", "no mercado", "na praia", "no jardim", "na escola", "perto do rio",
    "na estação", "no quarto", "na aldeia", "debaixo da árvore",
]
TIMES = [
    "hoje", "de manhã", "à noite", "todos os dias", "no domingo", "depois do almoço", "ontem",
    "às vezes",
]

# espeak-ng voice variants stand in for speakers; dev and test have speakers of their own, as in
# Common Voice, but the same two accents (European and Brazilian Portuguese).
TRAIN_VOICES = [
    Voice("pt+m1", 150, 45), Voice("pt+f2", 165, 60), Voice("pt-br+m3", 160, 40),
    Voice("pt-br+f4", 145, 65), Voice("pt+m4", 175, 50), Voice("pt-br+f1", 170, 55),
    Voice("pt+f5", 155, 70), Voice("pt-br+m2", 150, 35),
]
DEV_VOICES = [Voice("pt+m2", 160, 48), Voice("pt-br+f2", 158, 62)]
TEST_VOICES = [Voice("pt+f3", 162, 58), Voice("pt-br+m4", 155, 42)]


def distinct(n: int, sentence) -> list[str]:
    """`n` different sentences, drawn one by one from the grammar `sentence()`, sorted."""
    sentences: set[str] = set()
    while len(sentences) < n:
        sentences.add(sentence())
    return sorted(sentences)


def grammar_sentences(n: int, rng: random.Random, subjects, verbs, objects, places, times, marks) -> list[str]:
    """`n` different sentences "[Time,] subject verb object [place]<mark>" (a place 70% of the time, a time 40%)."""
    def sentence() -> str:
        words = [rng.choice(subjects), rng.choice(verbs), rng.choice(objects)]
        if rng.random() < 0.7:
            words.append(rng.choice(places))
        if rng.random() < 0.4:
            words.insert(0, rng.choice(times).capitalize() + ",")
        else:
            words[0] = words[0].capitalize()
        return " ".join(words) + rng.choice(marks)

    return distinct(n, sentence)


def demo_sentences(n: int, rng: random.Random) -> list[str]:
    return grammar_sentences(n, rng, SUBJECTS, VERBS, OBJECTS, PLACES, TIMES, [".", ".", "!", "?"])


def make_demo(root: Path, n_train: int, n_dev: int, n_test: int, seed: int) -> None:
    rng = random.Random(seed)
    sentences = demo_sentences(n_train + n_dev + n_test, rng)
    write_speakers(root, sentences, rng, n_train, n_dev, (TRAIN_VOICES, DEV_VOICES, TEST_VOICES))


def write_speakers(root: Path, sentences: list[str], rng: random.Random, n_train: int, n_dev: int,
                   voices: tuple[list[Voice], list[Voice], list[Voice]], locale: str = "pt") -> None:
    """Shuffle `sentences` into train, dev and test (the rest), spoken in turn by each split's own voices,
    as a Common Voice release in `root`."""
    sentences = list(sentences)
    rng.shuffle(sentences)
    parts = {"train": sentences[:n_train], "dev": sentences[n_train:n_train + n_dev],
             "test": sentences[n_train + n_dev:]}
    splits = {split: [(s, split_voices[i % len(split_voices)]) for i, s in enumerate(part)]
              for (split, part), split_voices in zip(parts.items(), voices)}
    write_common_voice(root, splits, locale=locale)


# ---------------------------------------------------------------------------------------------
# A second corpus, unlike the demo: short sentences (about 2.3 s) of other words, other voices. It
# checks that a recipe learns on a corpus it was not tuned on (tests, benchmarks/convergence.py).

SHORT_SUBJECTS = [
    "o comboio", "a janela", "o professor", "a rua", "o telefone", "a porta verde", "o autocarro",
    "a lua", "o rapaz", "a senhora", "o relógio", "a sopa", "o carro novo", "a ponte",
]
SHORT_PREDICATES = [
    "chega cedo", "está aberta", "fica longe", "parte agora", "faz barulho", "está fria",
    "é muito bonita", "não funciona", "anda devagar", "volta amanhã", "brilha muito", "dorme bem",
    "está fechada", "custa caro",
]
SHORT_ENDINGS = ["", "", "", "outra vez", "sempre", "também", "de novo"]
SHORT_TRAIN_VOICES = [
    Voice("pt+m5", 150, 52), Voice("pt+f1", 155, 66), Voice("pt-br+m1", 145, 38),
    Voice("pt-br+f3", 160, 58), Voice("pt+m6", 140, 44), Voice("pt-br+f5", 150, 72),
]
SHORT_DEV_VOICES = [Voice("pt+m7", 148, 47), Voice("pt-br+f4", 153, 61)]
SHORT_TEST_VOICES = [Voice("pt+f4", 151, 55), Voice("pt-br+m6", 144, 41)]


def short_sentences(n: int, rng: random.Random) -> list[str]:
    def sentence() -> str:
        words = [rng.choice(SHORT_SUBJECTS), rng.choice(SHORT_PREDICATES), rng.choice(SHORT_ENDINGS)]
        return " ".join(w for w in words if w).capitalize() + rng.choice([".", "!", "?"])

    return distinct(n, sentence)


def make_short(root: Path, n_train: int, n_dev: int, n_test: int, seed: int) -> None:
    """Clips of about 2.3 s in the Common Voice layout: a corpus that is not the demo."""
    rng = random.Random(seed)
    sentences = short_sentences(n_train + n_dev + n_test, rng)
    write_speakers(root, sentences, rng, n_train, n_dev, (SHORT_TRAIN_VOICES, SHORT_DEV_VOICES, SHORT_TEST_VOICES))


# ---------------------------------------------------------------------------------------------
# Another language: Spanish sentences of the demo's shape, Castilian and Latin American voices (dev and test
# voices unseen in training). A second language to adapt a Portuguese base to (benchmarks/adapt.py).

ES_SUBJECTS = [
    "el gato", "la niña", "mi hermano", "la maestra", "el vecino", "mi abuela", "el perro", "el pescador",
    "la cantante", "el médico", "la familia", "el panadero", "el niño", "el viejo marinero",
]
ES_VERBS = ["come", "ve", "busca", "compra", "lleva", "encuentra", "pinta", "guarda", "trae", "vende", "lava",
            "prepara"]
ES_OBJECTS = [
    "el pan", "una naranja", "el libro azul", "la bicicleta", "un pez grande", "las flores", "el sombrero viejo",
    "la caja de madera", "un pastel de chocolate", "la carta", "el barco", "las patatas", "un vaso de leche",
    "la llave de la puerta",
]
ES_PLACES = ["en la cocina", "en el mercado", "en la playa", "en el jardín", "en la escuela", "cerca del río",
             "en la estación", "en el cuarto", "en el pueblo", "debajo del árbol"]
ES_TIMES = ["hoy", "por la mañana", "por la noche", "todos los días", "el domingo", "después de comer", "ayer",
            "a veces"]
ES_TRAIN_VOICES = [
    Voice("es+m1", 150, 45), Voice("es+f2", 165, 60), Voice("es-419+m3", 160, 40), Voice("es-419+f4", 145, 65),
    Voice("es+m4", 175, 50), Voice("es-419+f1", 170, 55), Voice("es+f5", 155, 70), Voice("es-419+m2", 150, 35),
]
ES_DEV_VOICES = [Voice("es+m2", 160, 48), Voice("es-419+f2", 158, 62)]
ES_TEST_VOICES = [Voice("es+f3", 162, 58), Voice("es-419+m4", 155, 42)]


def spanish_sentences(n: int, rng: random.Random) -> list[str]:
    return grammar_sentences(n, rng, ES_SUBJECTS, ES_VERBS, ES_OBJECTS, ES_PLACES, ES_TIMES, [".", ".", "!"])


def make_spanish(root: Path, n_train: int, n_dev: int, n_test: int, seed: int) -> None:
    """Spanish clips in the Common Voice layout (locale es): the demo's shape, another language."""
    rng = random.Random(seed)
    sentences = spanish_sentences(n_train + n_dev + n_test, rng)
    write_speakers(root, sentences, rng, n_train, n_dev, (ES_TRAIN_VOICES, ES_DEV_VOICES, ES_TEST_VOICES),
                   locale="es")


CORPORA = {"demo": make_demo, "short": make_short, "es": make_spanish}


def make(corpus: str, root: Path, sizes: dict | None = None) -> None:
    """`corpus` (demo, short or es) into `root`, with its sentences per split and seed from `sizes` (train, dev,
    test, seed), by default conf/synth.yaml's (`corpora.<corpus>`): the committed demo's, for instance."""
    sizes = sizes or OmegaConf.load(REPO_DIR / "conf" / "synth.yaml").corpora[corpus]
    CORPORA[corpus](root, n_train=sizes["train"], n_dev=sizes["dev"], n_test=sizes["test"], seed=sizes["seed"])

def main(argv: list[str]) -> None:
    settings, _ = cli.parse("synth", argv)
    if settings.corpus not in CORPORA:
        sys.exit(f"error: corpus={settings.corpus}: expected one of {', '.join(CORPORA)}")
    out = Path(settings.out).expanduser()
    if out.exists():
        shutil.rmtree(out)
    make(settings.corpus, out, settings.corpora[settings.corpus])
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
