"""The embedded default corpus: synthesized English speech → MFCC → ARPAbet labels, offline.

Text comes from a small grammar over common words shipped here (licence-clean); speech from
eSpeak NG (espeakng-loader); labels from the phonemes eSpeak actually spoke, mapped to ARPAbet;
then lead/trail silence, gain jitter, reverb on ~30 % of utterances and white or pink noise at
15–40 dB SNR; MFCC via kaldi-native-fbank. Speakers (eSpeak voice variants) are disjoint across
train/dev/test. Output is ctclab's own layout (like Spring 2022's, plus a marker and manifests):

    <out>/ctclab_corpus.json
    <out>/{train,dev,test}/mfcc/utt_NNNNNN.npy        float32 [T, 13]
    <out>/{train,dev,test}/transcript/utt_NNNNNN.npy  phoneme symbols, SIL at the ends
    <out>/{train,dev,test}/manifest.jsonl             text, speaker, voice, SNR, frames, labels
    <out>/test/test_order.csv

Determinism: every utterance draws from its own RNG seeded by (seed, split, index), and is
synthesised in a freshly forked child of a spawned worker that has never synthesised, because
libespeak-ng carries hidden state from one synthesis to the next. Same seed → same bytes,
whatever the worker count.

    python -m ctclab.corpus OUT_DIR --train 20 --dev 5 --test 5 --workers 2
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import storage
from .errors import worker_context
from .layouts import CORPUS_MARKER
from .labels import INDEX

SPLITS = ("train", "dev", "test")
FORMAT_VERSION = 1

# --- text --------------------------------------------------------------------------------------
_WORDS = {
    "det": "the a this that every one my your our their some no each another".split(),
    "adj": ("small big old young good bad long short red green blue black white quiet loud warm cold "
            "dark bright happy sad early late fast slow soft hard clean heavy light new strong simple "
            "free real full empty round deep high low rich poor sharp sweet wild busy calm").split(),
    "noun": ("man woman child boy girl friend teacher doctor farmer king queen dog cat horse bird fish "
             "tree house door window road river city town garden field forest mountain island ship boat "
             "train car book letter paper story song game table chair bed floor wall room school church "
             "market bridge water fire stone light sun moon star rain snow wind morning evening night "
             "summer winter money voice music picture question answer family country world hand eye "
             "face heart head word name idea plan problem reason") .split(),
    "verb": ("saw found made took gave kept left brought bought sold told showed heard knew wanted "
             "needed liked loved helped opened closed carried watched followed called washed painted "
             "built pushed pulled caught held moved turned changed finished started remembered "
             "forgot") .split(),
    "intrans": ("walked ran slept waited smiled laughed arrived returned stayed worked played sang "
                "talked listened danced jumped fell rested travelled") .split(),
    "adv": ("slowly quickly quietly happily again today yesterday soon often never always early "
            "together alone outside inside later suddenly carefully") .split(),
    "prep": "in on under near behind beside across through into over from with without after before".split(),
    "pron": "he she we they i you".split(),
    "conj": "and but so then because while".split(),
}


def _noun_phrase(rng) -> list[str]:
    words = [str(rng.choice(_WORDS["det"]))]
    if rng.random() < 0.5:
        words.append(str(rng.choice(_WORDS["adj"])))
    words.append(str(rng.choice(_WORDS["noun"])))
    return words


def _clause(rng) -> list[str]:
    subject = [str(rng.choice(_WORDS["pron"]))] if rng.random() < 0.4 else _noun_phrase(rng)
    if rng.random() < 0.6:
        words = subject + [str(rng.choice(_WORDS["verb"]))] + _noun_phrase(rng)
    else:
        words = subject + [str(rng.choice(_WORDS["intrans"]))]
    if rng.random() < 0.5:
        words += [str(rng.choice(_WORDS["prep"]))] + _noun_phrase(rng)
    if rng.random() < 0.3:
        words.append(str(rng.choice(_WORDS["adv"])))
    return words


def make_text(rng, n_words: int) -> str:
    """Grammatical-looking English of exactly `n_words` common words (clauses joined, then cut)."""
    words = _clause(rng)
    while len(words) < n_words:
        words += [str(rng.choice(_WORDS["conj"]))] + _clause(rng)
    return " ".join(words[:n_words])


# --- eSpeak mnemonics → ARPAbet -----------------------------------------------------------------
ESPEAK_TO_ARPABET: dict[str, tuple[str, ...]] = {
    **{m: (a,) for m, a in zip("pbtdkgfv", "P B T D K G F V".split())},
    "T": ("TH",), "D": ("DH",), "s": ("S",), "z": ("Z",), "S": ("SH",), "Z": ("ZH",), "h": ("HH",),
    "m": ("M",), "n": ("N",), "N": ("NG",), "l": ("L",), "r": ("R",), "w": ("W",), "j": ("Y",),
    "tS": ("CH",), "dZ": ("JH",), "t#": ("T",), "t2": ("T",), "?": ("T",), "d#": ("D",), "x": ("K",),
    "C": ("HH",), "l/": ("L",), "l#": ("L",), "n-": ("AH", "N"), "m-": ("AH", "M"), "l-": ("AH", "L"),
    "r-": (), ";": (),
    "@": ("AH",), "@2": ("AH",), "@5": ("AH",), "@-": ("AH",), "a#": ("AH",), "V": ("AH",),
    "@L": ("AH", "L"), "3": ("ER",), "3:": ("ER",), "@r": ("ER",), "a": ("AE",), "aa": ("AE",),
    "A": ("AA",), "A:": ("AA",), "0": ("AA",), "A~": ("AA",), "A@": ("AA", "R"),
    "O": ("AO",), "O:": ("AO",), "O2": ("AO",), "O~": ("AO",), "O@": ("AO", "R"), "o@": ("AO", "R"),
    "OI": ("OY",), "oU": ("OW",), "o": ("OW",), "U": ("UH",), "U@": ("UH", "R"), "u:": ("UW",),
    "u": ("UW",), "E": ("EH",), "e": ("EH",), "E2": ("EH",), "e@": ("EH", "R"), "eI": ("EY",),
    "i": ("IY",), "i:": ("IY",), "I": ("IH",), "I2": ("IH",), "I#": ("IH",), "i@": ("IY", "AH"),
    "i@3": ("IH", "R"), "aI": ("AY",), "aI@": ("AY", "AH"), "aI3": ("AY", "ER"), "aU": ("AW",),
    "aU@": ("AW", "ER"),
}
_STRESS = "',%="
assert all(p in INDEX for seq in ESPEAK_TO_ARPABET.values() for p in seq)


def phonemes_to_arpabet(events: list[tuple[str, int]], end_sample: int, sample_rate: int,
                        min_pause_s: float = 0.1) -> tuple[list[str], list[str]]:
    """eSpeak phoneme events → ARPAbet with SIL at both ends and for internal pauses ≥ min_pause_s.
    Returns (labels, unmapped mnemonics)."""
    labels, unmapped = ["SIL"], []
    for k, (mnemonic, start) in enumerate(events):
        m = mnemonic.lstrip(_STRESS)
        if m.startswith("_"):
            end = events[k + 1][1] if k + 1 < len(events) else end_sample
            if end - start >= min_pause_s * sample_rate and labels[-1] != "SIL":
                labels.append("SIL")
            continue
        if m not in ESPEAK_TO_ARPABET:
            unmapped.append(m)
            continue
        for p in ESPEAK_TO_ARPABET[m]:
            if p == "R" and labels[-1] in ("ER", "R"):
                continue
            labels.append(p)
    if labels[-1] != "SIL":
        labels.append("SIL")
    return labels, unmapped


# --- speakers ----------------------------------------------------------------------------------
# Variants that sound robotic or like an effect; variants with breath noise are excluded too,
# because their output differs between processes.
_NOT_HUMAN = {"croak", "Demonic", "Tweaky", "UniRobot", "anikaRobot", "whisper", "whisperf", "Mr serious"}


def human_variants() -> list[str]:
    from .espeak import Synthesizer

    names = []
    for path in sorted(Synthesizer.variants_dir().iterdir()):
        text = path.read_text(errors="replace")
        breath = any(line.split()[0] == "breath" and any(v != "0" for v in line.split()[1:])
                     for line in text.splitlines() if line.strip())
        if breath or path.name in _NOT_HUMAN or path.name.startswith("robo") or " " in path.name:
            continue
        names.append(path.name)
    return names


def assign_speakers(variants: list[str], seed: int) -> dict[str, list[str]]:
    """Disjoint speaker sets per split: ~10 % of variants each for dev and test, the rest train."""
    order = [variants[i] for i in np.random.default_rng([seed, 999]).permutation(len(variants))]
    n_held = max(1, round(0.1 * len(order)))
    return {"dev": order[:n_held], "test": order[n_held:2 * n_held], "train": order[2 * n_held:]}


# --- one utterance -----------------------------------------------------------------------------
@dataclass
class Job:
    split: str
    index: int
    seed: int
    min_words: int
    max_words: int
    speakers: list[str]
    out: str

    @property
    def utt_id(self) -> str:
        return f"utt_{self.index:06d}"


def _pink_noise(rng, n: int) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    spectrum[1:] /= np.sqrt(np.arange(1, len(spectrum)))
    return np.fft.irfft(spectrum, n)


def _augment(rng, speech: np.ndarray, sr: int) -> tuple[np.ndarray, dict]:
    from scipy.signal import fftconvolve

    x = speech.astype(np.float64)
    info: dict = {"gain": round(float(rng.uniform(0.3, 1.0)), 4)}
    lead, trail = (int(rng.uniform(0.1, 0.4) * sr) for _ in range(2))
    x = np.concatenate([np.zeros(lead), x, np.zeros(trail)])
    info["reverb_rt60"] = 0.0
    if rng.random() < 0.3:
        rt60 = float(rng.uniform(0.2, 0.6))
        t = np.arange(int(rt60 * sr)) / sr
        ir = rng.standard_normal(len(t)) * np.exp(-6.9 * t / rt60) * 0.3
        ir[0] = 1.0
        x = fftconvolve(x, ir)[: len(x)]
        info["reverb_rt60"] = round(rt60, 3)
    snr_db = float(rng.uniform(15, 40))
    kind = "pink" if rng.random() < 0.5 else "white"
    noise = _pink_noise(rng, len(x)) if kind == "pink" else rng.standard_normal(len(x))
    speech_power = np.mean(x[x != 0] ** 2) if np.any(x) else 1.0
    noise *= np.sqrt(speech_power / (10 ** (snr_db / 10)) / np.mean(noise ** 2))
    x = (x + noise) * info["gain"]
    info.update(snr_db=round(snr_db, 2), noise=kind, lead_s=round(lead / sr, 3), trail_s=round(trail / sr, 3))
    return np.clip(x, -32768, 32767).astype(np.float32), info


def render(job: Job, synth) -> dict:
    """Synthesise, label, augment and featurise one utterance; write its files; return its manifest row."""
    from .features import mfcc

    rng = np.random.default_rng([job.seed, SPLITS.index(job.split), job.index])
    n_words = int(rng.integers(job.min_words, job.max_words + 1))
    text = make_text(rng, n_words)
    speaker = job.speakers[int(rng.integers(len(job.speakers)))]
    # A speaker keeps its own pitch centre; rate and pitch vary a little per utterance.
    base_pitch = int(np.random.default_rng([job.seed, sum(map(ord, speaker))]).integers(35, 65))
    voice = dict(rate=int(rng.integers(135, 206)), pitch=int(np.clip(base_pitch + rng.integers(-5, 6), 0, 99)),
                 pitch_range=int(rng.integers(30, 80)), word_gap=int(rng.integers(0, 3)))
    result = synth.synthesize(text, voice=f"en-us+{speaker}", **voice)
    labels, unmapped = phonemes_to_arpabet(result.phonemes, len(result.samples), result.sample_rate)
    audio, aug = _augment(rng, result.samples, result.sample_rate)
    feats = mfcc(audio, result.sample_rate)
    split_dir = Path(job.out) / job.split
    storage.save_npy(split_dir / "mfcc" / f"{job.utt_id}.npy", feats)
    storage.save_npy(split_dir / "transcript" / f"{job.utt_id}.npy", np.array(labels))
    return {"id": job.utt_id, "text": text, "speaker": speaker, **voice, **aug,
            "seconds": round(len(audio) / result.sample_rate, 3), "frames": int(len(feats)),
            "labels": len(labels), "unmapped": unmapped}


# --- workers: spawned, never synthesise themselves; one forked child per utterance ---------------
_synth = None


def _worker_init() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Import what the children use once here, or every forked child pays for it again.
    import kaldi_native_fbank  # noqa: F401
    import scipy.signal  # noqa: F401


def _render_in_child(job: Job) -> dict:
    global _synth
    if _synth is None:
        from .espeak import Synthesizer
        _synth = Synthesizer()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: render, send the row (or the error) back, exit without cleanup
        os.close(read_fd)
        status = 0
        try:
            payload = pickle.dumps(("ok", render(job, _synth)))
        except BaseException:
            payload, status = pickle.dumps(("error", traceback.format_exc())), 1
        with os.fdopen(write_fd, "wb") as w:
            w.write(payload)
        os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as r:
        data = r.read()
    os.waitpid(pid, 0)
    if not data:
        raise RuntimeError(f"{job.split}/{job.utt_id}: synthesis child died without a result")
    kind, value = pickle.loads(data)
    if kind == "error":
        raise RuntimeError(f"{job.split}/{job.utt_id}: {value}")
    return value


def generate(out: str | Path, seed: int, sizes: dict[str, int], min_words: int = 3, max_words: int = 7,
             workers: int = 1, progress: bool = True) -> dict:
    """Generate the corpus into `out` (replacing what is there); return a summary."""
    from tqdm import tqdm

    out = Path(out)
    speakers = assign_speakers(human_variants(), seed)
    jobs = [Job(split, i, seed, min_words, max_words, speakers[split], str(out))
            for split in SPLITS for i in range(sizes[split])]
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    pool = ProcessPoolExecutor(workers, mp_context=worker_context(), initializer=_worker_init)
    try:
        results = pool.map(_render_in_child, jobs, chunksize=4)
        for job, row in tqdm(zip(jobs, results), total=len(jobs), desc="synthesising corpus",
                             unit="utt", disable=not progress, file=sys.stderr,
                             mininterval=1 if sys.stderr.isatty() else 30):
            rows[job.split].append(row)
    finally:  # interrupted (even while submitting): jobs not started are dropped, the workers finish theirs
        pool.shutdown(cancel_futures=True)  # and exit quietly, before fetch removes the half-made folder
    for split in SPLITS:
        storage.write_text(out / split / "manifest.jsonl",
                           "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows[split]))
    storage.write_text(out / "test" / "test_order.csv",
                       "file\n" + "".join(f"{r['id']}.npy\n" for r in rows["test"]))
    unmapped = sorted({m for split in SPLITS for r in rows[split] for m in r["unmapped"]})
    summary = {"format": FORMAT_VERSION, "seed": seed, "sizes": sizes, "min_words": min_words,
               "max_words": max_words, "speakers": speakers, "sample_rate": 22050,
               "hours": round(sum(r["seconds"] for s in SPLITS for r in rows[s]) / 3600, 3),
               "frames": sum(r["frames"] for s in SPLITS for r in rows[s]), "unmapped_mnemonics": unmapped}
    storage.write_json(out / CORPUS_MARKER, summary)
    return summary


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=11785)
    for split, n in (("train", 20), ("dev", 5), ("test", 5)):
        ap.add_argument(f"--{split}", type=int, default=n)
    ap.add_argument("--min-words", type=int, default=3)
    ap.add_argument("--max-words", type=int, default=7)
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args(argv)
    summary = generate(a.out, a.seed, {"train": a.train, "dev": a.dev, "test": a.test}, a.min_words,
                       a.max_words, a.workers)
    print(json.dumps({k: v for k, v in summary.items() if k != "speakers"}))


if __name__ == "__main__":
    main()
