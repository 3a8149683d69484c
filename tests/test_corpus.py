import hashlib
import json

import numpy as np

from ctclab import corpus
from ctclab.labels import INDEX


def digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_whatever_the_worker_count(tmp_path, tiny_corpus):
    sizes = {"train": 6, "dev": 2, "test": 2}
    for workers in (1, 2):
        corpus.generate(tmp_path / f"w{workers}", seed=3, sizes=sizes, min_words=2, max_words=4,
                        workers=workers, progress=False)
    one, two = digests(tmp_path / "w1"), digests(tmp_path / "w2")
    assert len(one) == 2 * 10 + 3 + 1 + 1  # mfcc + transcripts, 3 manifests, test_order, marker
    assert one == two
    corpus.generate(tmp_path / "other", seed=4, sizes=sizes, min_words=2, max_words=4, workers=1, progress=False)
    other = digests(tmp_path / "other")
    assert all(other[k] != one[k] for k in one if "/mfcc/" in k)


def test_corpus_labels_are_in_the_label_set_and_speakers_are_disjoint(tiny_corpus):
    speakers = {}
    for split in ("train", "dev", "test"):
        rows = [json.loads(l) for l in (tiny_corpus / split / "manifest.jsonl").read_text().splitlines()]
        assert len(rows) == len(list((tiny_corpus / split / "mfcc").glob("*.npy")))
        speakers[split] = {r["speaker"] for r in rows}
        for r in rows:
            labels = np.load(tiny_corpus / split / "transcript" / f"{r['id']}.npy")
            feats = np.load(tiny_corpus / split / "mfcc" / f"{r['id']}.npy")
            assert feats.shape == (r["frames"], 13) and feats.dtype == np.float32
            assert all(s in INDEX for s in labels) and labels[0] == labels[-1] == "SIL"
            assert len(labels) == r["labels"] and len(feats) >= 4 * len(labels)
            assert 15 <= r["snr_db"] <= 40 and len(r["text"].split()) in (2, 3, 4)
    assert not speakers["train"] & speakers["dev"] and not speakers["train"] & speakers["test"]
    assert not speakers["dev"] & speakers["test"]


def test_espeak_mnemonics_map_to_arpabet_with_pauses_as_sil():
    sr = 1000
    events = [("h", 0), ("@", 50), ("l", 90), ("'oU", 120), ("_:", 200), ("w", 400), ("'3:", 450),
              ("r-", 500), ("l", 520), ("d", 560), ("_", 600), ("aI@", 610)]
    labels, unmapped = corpus.phonemes_to_arpabet(events, end_sample=700, sample_rate=sr)
    assert labels == ["SIL", "HH", "AH", "L", "OW", "SIL", "W", "ER", "L", "D", "AY", "AH", "SIL"]
    assert unmapped == []
    labels, unmapped = corpus.phonemes_to_arpabet([("Q!", 0)], 10, sr)
    assert unmapped == ["Q!"] and labels == ["SIL"]


def test_every_arpabet_phoneme_is_reachable_from_espeak():
    reachable = {p for seq in corpus.ESPEAK_TO_ARPABET.values() for p in seq}
    assert reachable | {"SIL"} == set(INDEX)


def test_text_has_the_requested_number_of_words():
    rng = np.random.default_rng(0)
    for n in (1, 3, 12):
        assert len(corpus.make_text(rng, n).split()) == n
