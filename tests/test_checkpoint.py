"""The resume fingerprint: which changes start a training afresh and which may resume it."""
import pytest

from ctclab.checkpoint import RUNTIME_ONLY, fingerprint
from ctclab.config import flatten, with_overrides
from project import DEFAULTS

BASE = fingerprint(DEFAULTS, "datahash", "cpu:None")


def changed(key, value):
    """A valid different value for `key` (ints +1, floats scaled, choices rotated, booleans flipped)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return 4 if key.endswith(".stride") else value + 1
    if isinstance(value, float):
        return 0.5 if ".dropout." in key else value * 2 + 0.1
    choices = {"model.arch": "conv_lstm", "train.optimizer": "adamw", "train.scheduler": "plateau",
               "train.device": "cpu", "train.amp": "off", "train.resume": "never", "train.oom": "fail",
               "train.distributed.rdzv_endpoint": "node0:29500"}
    return choices[key]


TRAINING_KEYS = [k for k in flatten(DEFAULTS) if k.split(".")[0] in ("model", "train") and k != "model.arch"]
# keys a change needs beside it to stay valid (rdzv_endpoint is runtime-only, so it cannot mask a change)
COMPANIONS = {"train.distributed.nnodes": {"train.distributed.rdzv_endpoint": "node0:29500"}}


@pytest.mark.parametrize("key", TRAINING_KEYS)
def test_every_training_key_changes_the_fingerprint_except_runtime_ones(key):
    value = flatten(DEFAULTS)[key]
    params = with_overrides(DEFAULTS, {key: changed(key, value), **COMPANIONS.get(key, {})}, "test")
    if key in RUNTIME_ONLY:
        assert fingerprint(params, "datahash", "cpu:None") == BASE
    else:
        assert fingerprint(params, "datahash", "cpu:None") != BASE


def test_architecture_data_and_runtime_change_the_fingerprint():
    lstm = with_overrides(DEFAULTS, {"model.arch": "lstm"}, "test")
    assert fingerprint(lstm, "datahash", "cpu:None") != BASE
    # another architecture's knobs do not change what trains
    idle = with_overrides(DEFAULTS, {"model.lstm.hidden": 7, "model.convnext.stages": 5}, "test")
    assert fingerprint(idle, "datahash", "cpu:None") == BASE
    assert fingerprint(DEFAULTS, "otherdata", "cpu:None") != BASE
    assert fingerprint(DEFAULTS, "datahash", "cuda:torch.bfloat16") != BASE
    assert fingerprint(DEFAULTS, "datahash", "cuda:torch.float16") != fingerprint(DEFAULTS, "datahash", "cuda:torch.bfloat16")


def test_a_checkpoint_write_that_fails_is_one_line_and_the_previous_file_stays(tmp_path, monkeypatch):
    import errno
    import os

    from ctclab import checkpoint, storage
    from ctclab.errors import CtclabError

    ckpt = {"epoch": 2, "batch": 0, "weights": [1, 2, 3]}
    checkpoint.write_epoch(ckpt, tmp_path / "models", tmp_path / "resume" / "fp.pt", True, "run1")
    before = (tmp_path / "models/last.pt").read_bytes()

    def disk_full(path, data):  # os.replace never runs: what a full disk does to the temp file's write
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage, "write_bytes", disk_full)
    with pytest.raises(CtclabError) as err:
        checkpoint.write_epoch({**ckpt, "epoch": 3}, tmp_path / "models", tmp_path / "resume" / "fp.pt", True, "run1")
    message = str(err.value)
    assert message.endswith("last.pt: could not write the checkpoint (No space left on device); the previous last.pt is intact")
    assert "\n" not in message and (tmp_path / "models/last.pt").read_bytes() == before
