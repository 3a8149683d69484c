from pathlib import Path

import pytest
import yaml

from ctclab.config import Params, flatten, load_params
from ctclab.errors import CtclabError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, data) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_repository_params_load_and_cover_every_key():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    params = load_params(REPO / "params.yaml")
    flat_raw = {k for k in flatten(params)}
    # every config key is spelled out in params.yaml, so `dvc exp show` lists them all
    def keys(d, prefix=""):
        for k, v in d.items():
            yield from keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
    assert set(keys(raw)) == flat_raw


@pytest.mark.parametrize("data, message", [
    ({"train": {"sheduler": "cosine"}}, "unknown key train.sheduler"),
    ({"train": {"scheduler": "step"}}, "train.scheduler = 'step', expected one of cosine, plateau, none"),
    ({"model": {"hidden": "big"}}, "model.hidden = 'big', expected an integer"),
    ({"model": {"kaiming": "yes"}}, "model.kaiming = 'yes', expected true or false"),
    ({"model": {"dropout": {"lstm": 1.5}}}, "model.dropout.lstm = 1.5, expected in [0, 1)"),
    ({"data": {"source": "local"}}, "data.path = '', expected a folder or zip"),
    ({"data": {"synthetic": {"min_words": 9, "max_words": 3}}}, "data.synthetic.min_words = 9"),
])
def test_bad_params_name_the_key(tmp_path, data, message):
    with pytest.raises(CtclabError, match=None) as err:
        load_params(write(tmp_path, data))
    assert message in str(err.value)
    assert "params.yaml" in str(err.value)


def test_flatten_uses_dotted_names():
    flat = flatten(Params())
    assert flat["model.dropout.lstm"] == Params().model.dropout.lstm
    assert flat["train.specaugment.time_masks"] == 0


def test_yaml_12_booleans_like_dvc(tmp_path):
    # `dvc exp run -S study.variant=off` writes `variant: off` unquoted (YAML 1.2: a string)
    p = write(tmp_path, {})
    p.write_text("study:\n  variant: off\n  name: no\nmodel:\n  kaiming: false\n")
    params = load_params(p)
    assert params.study.variant == "off" and params.study.name == "no" and params.model.kaiming is False
