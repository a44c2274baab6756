"""Several corpora in one run (`data.corpora`): each corpus's settings, its share of an epoch, and the clips of
each corpus an epoch draws.

An entry names a corpus (`name`: the `val/<name>/cer` of its dev split), its reader by `lang` (conf/lang/<lang>.yaml:
corpus, text rules, split names), and what differs: `root`, `corpus`, `language`, the split names, `columns`, and
its `weight`. What an entry does not set comes from its lang file, then from conf/data/default.yaml: never from the
run's own `lang=`. Without `data.corpora` the run's own corpus (`lang=`, `data.root`) is a mix of one.

Shares of an epoch, as Lhotse's `CutSet.mux` and NeMo's `input_cfg` weigh their sources: `weight` is a corpus's
share of the clips an epoch draws (normalised over the corpora); `data.temperature=T` instead gives each corpus a
share proportional to (its training hours)^(1/T) (XLS-R's multilingual sampling: T=1 as the hours fall, larger T
flatter). Without either, each corpus's share is its share of the clips: every clip once an epoch.

What an epoch draws (`strata`): a fixed number of clips from each (corpus, duration bucket) stratum, the corpus's
draws spread over its buckets as its clips are. Which clips fill a stratum changes with (seed, epoch)
(`asr.data.batching`); the counts never do, so every epoch has the same batches of the same shapes.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from asr import REPO_DIR, SetupError
from asr.core.config import register_resolvers, typed_values

# What an entry may set beside name and weight: the settings of one corpus (SpeechDataModule's arguments).
CORPUS_KEYS = ("corpus", "root", "language", "lang", "train_split", "dev_split", "test_split", "dev_speakers",
               "train_extra", "columns")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a name in a metric key: val/<name>/cer


@dataclass(frozen=True)
class Source:
    """One corpus of a mix: its name, weight (None: none given) and settings (`CORPUS_KEYS`); `listed`: an entry
    of `data.corpora`, whose figures reports and logs show on their own (the run's own `data.root` is the run's
    whole: a one-corpus run reports, logs and scores without a per-corpus copy of its figures)."""

    name: str
    weight: float | None
    settings: dict
    listed: bool = False

    @property
    def where(self) -> str:
        """How its errors name it."""
        return f"data.corpora ({self.name}): " if self.listed else ""


def _conf(path: Path) -> dict:
    """The settings of one corpus in a config file (conf/data/default.yaml, conf/lang/<lang>.yaml), resolved
    (${repo:} in conf/lang/demo.yaml)."""
    register_resolvers()
    node = OmegaConf.load(path)
    return {k: OmegaConf.to_container(OmegaConf.create({"v": node._get_node(k)}), resolve=True)["v"]
            for k in CORPUS_KEYS if k in node}


def sources(entries: list | None, temperature: float | None, own: dict | None = None) -> list[Source]:
    """The corpora of a run, each with its settings complete: those of `data.corpora`, or without it (`entries`
    None) the run's own corpus (`own`: data.corpus, data.root, ... of its `lang=`), a mix of one named by its
    lang. SetupError, in one line, for an entry without a name, two of one name, an unknown key or lang, a
    weight of 0 or below, weights on some corpora only, or weights beside a temperature."""
    if entries is None:
        return [Source(own["lang"], None, {k: own[k] for k in CORPUS_KEYS})]
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise SetupError("data.corpora: give a list of corpora, e.g. "
                         "'data.corpora=[{name:pt,lang:pt,root:/data/cv/pt,weight:0.8},{name:es,lang:es,root:...,weight:0.2}]'.")
    if temperature is not None and not temperature > 0:
        raise SetupError(f"data.temperature={temperature}: give a temperature above 0 (1: shares as the hours fall; "
                         f"larger: flatter), or null.")
    defaults = _conf(REPO_DIR / "conf" / "data" / "default.yaml")
    seen, out = {}, []
    for i, entry in enumerate(entries):
        name = entry.get("name")
        where = f"data.corpora[{i}]" + (f" ({name})" if name else "")
        if not name or not NAME.match(str(name)):
            raise SetupError(f"{where}: give each corpus a name of letters, digits, '_', '.' or '-' (name:pt): "
                             f"it names its dev figures (val/<name>/cer).")
        name = str(name)
        if name in seen:
            raise SetupError(f"data.corpora: entries {seen[name]} and {i} are both named {name}; give each corpus its "
                             f"own name.")
        seen[name] = i
        unknown = sorted(set(entry) - {"name", "weight", *CORPUS_KEYS})
        if unknown:
            raise SetupError(f"{where}: {', '.join(unknown)} is not a setting of a corpus; an entry takes name, "
                             f"weight, {', '.join(CORPUS_KEYS)}.")
        weight = entry.get("weight")
        if weight is not None and not (isinstance(weight, (int, float)) and weight > 0):
            raise SetupError(f"{where}: weight={weight}; a weight is the corpus's share of the clips an epoch draws: "
                             f"give a number above 0, or leave the corpus out.")
        lang = entry.get("lang")
        settings = {k: defaults.get(k) for k in CORPUS_KEYS}  # ??? in default.yaml: the lang file's
        if lang is not None:
            path = REPO_DIR / "conf" / "lang" / f"{lang}.yaml"
            if not path.is_file():
                known = sorted(p.stem for p in path.parent.glob("*.yaml"))
                raise SetupError(f"{where}: lang={lang} is not one of {', '.join(known)} (conf/lang/).")
            settings.update({k: v for k, v in _conf(path).items() if k in CORPUS_KEYS})
        # each setting of the entry typed as the data module takes it (a one-corpus run's, checked in the data node)
        settings.update(typed_values({k: v for k, v in entry.items() if k in CORPUS_KEYS}, f"data.corpora[{i}]",
                                     "asr.data.module.SpeechDataModule"))
        settings["lang"] = settings.get("lang") or name
        missing = [k for k in ("corpus", "language") if settings.get(k) in (None, "???")]
        if missing:
            raise SetupError(f"{where}: give its lang (conf/lang/<lang>.yaml), or its {' and '.join(missing)}.")
        out.append(Source(name, None if weight is None else float(weight), settings, listed=True))
    weighted = [s.weight is not None for s in out]
    if temperature is not None and any(weighted):
        raise SetupError(f"data.temperature={temperature} sets the shares from the hours: leave out the corpora's "
                         f"weights, or data.temperature.")
    if any(weighted) and not all(weighted):
        unweighted = ", ".join(s.name for s in out if s.weight is None)
        raise SetupError(f"data.corpora: {unweighted} has no weight; give every corpus a weight, or none (each corpus "
                         f"then draws as many clips as it holds).")
    return out


def shares(clips: list[int], seconds: list[float], weights: list[float | None],
           temperature: float | None) -> np.ndarray:
    """Each corpus's share of the clips of an epoch (sums to 1): its weight; with a temperature, (hours)^(1/T);
    with neither, its share of the clips."""
    if temperature is not None:
        raw = np.asarray(seconds, dtype=np.float64) ** (1.0 / temperature)
    elif all(w is not None for w in weights):
        raw = np.asarray(weights, dtype=np.float64)
    else:
        raw = np.asarray(clips, dtype=np.float64)
    return raw / raw.sum()


def apportion(total: int, shares) -> np.ndarray:
    """`total` split in whole numbers as `shares` are (largest remainder): the split sums to `total`, and every
    share above 0 gets at least 1 where total allows."""
    shares = np.asarray(shares, dtype=np.float64)
    exact = total * shares / shares.sum()
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]] += 1
    for i in np.flatnonzero((counts == 0) & (shares > 0)):  # a corpus with a weight is never left out
        j = int(np.argmax(counts))
        if counts[j] > 1:
            counts[j] -= 1
            counts[i] += 1
    return counts


def strata(corpus: np.ndarray, bucket: np.ndarray, draws, buckets: int) -> np.ndarray:
    """(corpora, buckets) clips an epoch draws from each stratum: corpus c's `draws[c]` spread over its buckets as
    its clips are (`apportion`), so that the bucket counts, and with them the batch plan, are fixed."""
    out = np.zeros((len(draws), buckets), dtype=np.int64)
    for c, n in enumerate(draws):
        held = np.bincount(bucket[corpus == c], minlength=buckets)
        if held.sum():
            out[c] = apportion(int(n), held)
    return out


def merged(reports: dict[str, dict], listed: bool) -> dict:
    """The data report of a split of a mix from its corpora's (`asr.data.listing.check_split`): the totals, with
    each corpus's report under `corpora`; of the run's own corpus (not `listed` in data.corpora), its report."""
    if not listed:
        return next(iter(reports.values()))
    report = {"kept": sum(r["kept"] for r in reports.values()), "dropped": {}, "examples": {},
              "unk_characters": sum(r["unk_characters"] for r in reports.values()),
              "unk_examples": list(dict.fromkeys(c for r in reports.values() for c in r["unk_examples"]))[:10],
              "seconds": round(sum(r["seconds"] for r in reports.values()), 2)}
    for name, r in reports.items():
        for reason, n in r["dropped"].items():
            report["dropped"][reason] = report["dropped"].get(reason, 0) + n
            report["examples"].setdefault(reason, []).extend(f"{name}: {e}" for e in r["examples"].get(reason, []))
    report["examples"] = {reason: e[:5] for reason, e in report["examples"].items()}
    report["corpora"] = reports
    return report
