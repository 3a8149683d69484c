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
        return {"model.stride": 4}.get(key, value + 1)
    if isinstance(value, float):
        return 0.5 if key.startswith("model.dropout") else value * 2 + 0.1
    choices = {"model.arch": "conv_lstm", "train.optimizer": "adamw", "train.scheduler": "plateau",
               "train.device": "cpu", "train.amp": "off", "train.resume": "never"}
    return choices[key]


TRAINING_KEYS = [k for k in flatten(DEFAULTS) if k.split(".")[0] in ("model", "train") and k != "model.arch"]


@pytest.mark.parametrize("key", TRAINING_KEYS)
def test_every_training_key_changes_the_fingerprint_except_runtime_ones(key):
    value = flatten(DEFAULTS)[key]
    params = with_overrides(DEFAULTS, {key: changed(key, value)}, "test")
    if key in RUNTIME_ONLY:
        assert fingerprint(params, "datahash", "cpu:None") == BASE
    else:
        assert fingerprint(params, "datahash", "cpu:None") != BASE


def test_architecture_data_and_runtime_change_the_fingerprint():
    lstm = with_overrides(DEFAULTS, {"model.arch": "lstm", "model.convnext_blocks": 0}, "test")
    assert fingerprint(lstm, "datahash", "cpu:None") != BASE
    assert fingerprint(DEFAULTS, "otherdata", "cpu:None") != BASE
    assert fingerprint(DEFAULTS, "datahash", "cuda:torch.bfloat16") != BASE
    assert fingerprint(DEFAULTS, "datahash", "cuda:torch.float16") != fingerprint(DEFAULTS, "datahash", "cuda:torch.bfloat16")
