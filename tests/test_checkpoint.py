"""The resume fingerprint: which changes start a training afresh and which may resume it."""
import pytest

import json
import pickle
import random

import torch

from ctclab import checkpoint
from ctclab.checkpoint import fingerprint
from ctclab.config import flatten, with_overrides
from ctclab.errors import CtclabError
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


# Written here, not read from the code: the keys that cannot change a training's numbers (how often
# it checkpoints, whether it may resume, loader processes, where node 0 listens). Any other model or
# train key changed must start afresh.
CANNOT_CHANGE_RESULTS = {"train.resume", "train.loader_workers", "train.checkpoint_minutes",
                         "train.distributed.rdzv_endpoint"}


@pytest.mark.parametrize("key", TRAINING_KEYS)
def test_every_training_key_changes_the_fingerprint_except_runtime_ones(key):
    value = flatten(DEFAULTS)[key]
    params = with_overrides(DEFAULTS, {key: changed(key, value), **COMPANIONS.get(key, {})}, "test")
    if key in CANNOT_CHANGE_RESULTS:
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


class WouldRunCode:
    """Unpickling this creates a marker file: what a checkpoint from an untrusted remote could do."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def a_checkpoint() -> dict:
    from ctclab import models
    model = models.build(DEFAULTS.model, input_dim=13)
    return {"model_spec": model.spec(), "model": model.state_dict(), "epoch": 1, "history": [{"epoch": 1}]}


def corrupt(kind: str, path, marker) -> None:
    good = _bytes(a_checkpoint())
    if kind == "cut short":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(random.Random(kind).randbytes(4096))
    elif kind == "pickle payload":
        torch.save({**a_checkpoint(), "extra": WouldRunCode(marker)}, path)
    elif kind == "plain pickle":
        path.write_bytes(pickle.dumps(WouldRunCode(marker)))
    elif kind == "not a checkpoint":
        torch.save({"weights": torch.zeros(3)}, path)


def _bytes(obj) -> bytes:
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


KINDS = ["cut short", "empty", "garbage", "pickle payload", "plain pickle", "not a checkpoint"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_checkpoint_is_one_line_naming_the_file_and_the_fix_and_runs_nothing(tmp_path, kind):
    from ctclab.inference import load_model

    path, marker = tmp_path / "best.pt", tmp_path / "PAYLOAD_RAN"
    corrupt(kind, path, marker)
    with pytest.raises(CtclabError) as err:
        load_model(path)
    line = str(err.value)
    assert line.startswith(f"{path}: ") and "\n" not in line and "dvc repro -f train" in line
    assert not marker.exists()  # nothing in the file ran
    if kind == "pickle payload":
        assert "refused" in line and "GLOBAL" in line


@pytest.mark.parametrize("kind", ["cut short", "garbage", "pickle payload", "bad pointer"])
def test_a_corrupt_resume_slot_is_set_aside_with_one_warning(tmp_path, kind, capsys):
    slot, marker = tmp_path / "resume" / "fp.pt", tmp_path / "PAYLOAD_RAN"
    checkpoint.write_resume({**a_checkpoint(), "batch": 3}, slot, "run1")
    if kind == "bad pointer":
        slot.with_suffix(".json").write_text("{not json")
    else:
        corrupt(kind, slot, marker)
    assert checkpoint.load_resume(slot) is None
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and f"resume checkpoint {slot} set aside as fp.pt.corrupt" in warning
    assert "training starts from epoch 1" in warning and not marker.exists()
    assert not slot.exists() and (slot.parent / "fp.pt.corrupt").is_file() and (slot.parent / "fp.json.corrupt").is_file()


def test_an_intact_resume_slot_loads_with_its_run_id(tmp_path):
    slot = tmp_path / "resume" / "fp.pt"
    checkpoint.write_resume({**a_checkpoint(), "batch": 3}, slot, "run1")
    saved = checkpoint.load_resume(slot)
    assert saved["run_id"] == "run1" and saved["batch"] == 3
    assert json.loads(slot.with_suffix(".json").read_text())["mlflow_run_id"] == "run1"
