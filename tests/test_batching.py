"""Batches: the DataLoader yields exactly the bucketed batches, in order, whatever its worker count;
SpecAugment masks within each utterance, reproducibly."""
import numpy as np
import pytest
import torch

from ctclab.batching import bucket_batches, collate, ctc_min_frames, loader, spec_augment
from ctclab.data import Shard, preprocess
from conftest import make_spring2022
from project import config


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    root = tmp_path_factory.mktemp("batching")
    preprocess(make_spring2022(root / "raw", n=23), root / "out", config("features"))
    return Shard(root / "out" / "train")


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_gives_the_same_batches_as_collating_in_process(shard, workers):
    batches = bucket_batches(shard.frames(), 4, seed=3, epoch=1)
    got = list(loader(shard, batches, workers, torch.device("cpu")))
    assert len(got) == len(batches)
    for b, idx in zip(got, batches):
        want = collate(shard, idx)
        assert torch.equal(b.features, want.features) and torch.equal(b.targets, want.targets)
        assert b.lengths.tolist() == shard.frames()[idx].tolist() and b.labels == want.labels
        assert b.features.shape[1] == max(shard.frames()[idx])  # padded to the batch's longest only


def test_the_loader_leaves_torchs_rng_to_dropout(shard):
    torch.manual_seed(1)
    want = torch.rand(3)
    torch.manual_seed(1)
    list(loader(shard, bucket_batches(shard.frames(), 4, seed=3, epoch=1), 0, torch.device("cpu")))
    assert torch.equal(torch.rand(3), want)


def test_spec_augment_zeroes_bands_inside_each_utterance_reproducibly(shard):
    cfg = config("train", **{"specaugment.time_masks": 2, "specaugment.time_width": 5,
                             "specaugment.freq_masks": 1, "specaugment.freq_width": 3}).specaugment
    batch = collate(shard, [0, 1, 2, 3])
    a = spec_augment(batch, cfg, torch.Generator().manual_seed(7))
    b = spec_augment(batch, cfg, torch.Generator().manual_seed(7))
    assert torch.equal(a.features, b.features) and a.labels == batch.labels
    assert not torch.equal(a.features, batch.features)  # something was masked, on a copy
    assert torch.equal(batch.features, collate(shard, [0, 1, 2, 3]).features)
    changed = a.features != batch.features
    assert (a.features[changed] == 0).all()  # masks zero, nothing else changes
    for k, n in enumerate(batch.lengths.tolist()):
        time_masked = changed[k, :n].all(dim=1).sum().item()  # frames zeroed in every feature
        assert 0 < time_masked <= 2 * 5 and not changed[k, n:].any()  # within the utterance
    off = config("train").specaugment
    assert spec_augment(batch, off, torch.Generator()) is batch  # the default: no masks, no copy


def test_batch_lengths_stay_on_the_cpu_when_moved(shard):
    b = collate(shard, [0, 1])
    assert b.to(torch.device("cpu")) is b
    if torch.cuda.is_available():
        moved = b.pin_memory().to(torch.device("cuda"))
        assert moved.features.is_cuda and moved.lengths.device.type == "cpu"


def test_ctc_min_frames_counts_a_blank_between_repeats():
    assert ctc_min_frames(np.array([3, 3, 4, 4, 4, 5])) == 9
    assert ctc_min_frames(np.array([], dtype=np.int64)) == 0


@pytest.mark.parametrize("batch_size", [64, 256, 512, 1024])
def test_large_batches_keep_padding_under_five_percent_and_still_mix_each_epoch(batch_size):
    # train-clean-100's shape (bench/synthetic.py): ~N(1270, 370) frames, 28,539 utterances
    lengths = np.clip(np.random.default_rng(0).normal(1270, 370, 28539), 150, 2450).astype(np.int64)
    epochs = [bucket_batches(lengths, batch_size, seed=0, epoch=e) for e in range(2)]
    for batches in epochs:
        assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
        padded = sum(len(b) * int(lengths[b].max()) for b in batches)
        assert 1 - lengths.sum() / padded < 0.05
    as_sets = [{frozenset(b.tolist()) for b in batches} for batches in epochs]
    assert len(as_sets[0] & as_sets[1]) < len(as_sets[0]) / 2  # most batches are new mixes the next epoch
