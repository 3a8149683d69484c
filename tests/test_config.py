import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ctclab.config import Params, flatten, json_schema, load_params
from ctclab.errors import CtclabError
from project import DEFAULTS, merge

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, data, base=True) -> Path:
    """params.yaml = the repository's with `data` merged over it (or `data` alone)."""
    p = tmp_path / "params.yaml"
    full = merge(yaml.safe_load((REPO / "params.yaml").read_text()), data) if base else data
    p.write_text(yaml.safe_dump(full))
    return p


def test_repository_params_load_and_cover_every_key():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    params = load_params(REPO / "params.yaml")
    # every config key is spelled out in params.yaml, so `dvc exp show` lists them all
    def keys(d, prefix=""):
        for k, v in d.items():
            yield from keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
    assert set(keys(raw)) == set(flatten(params))


@pytest.mark.parametrize("data, message", [
    ({"train": {"sheduler": "cosine"}}, "unknown key train.sheduler; expected one of epochs, batch_size"),
    ({"train": {"scheduler": "step"}}, "train.scheduler = 'step', expected one of cosine, plateau, none"),
    ({"model": {"hidden": "big"}}, "model.hidden = 'big', expected an integer"),
    ({"train": {"epochs": "3"}}, "train.epochs = '3', expected an integer"),  # strict: no coercion
    ({"train": {"lr": "0.1"}}, "train.lr = '0.1', expected a number"),
    ({"model": {"kaiming": "yes"}}, "model.kaiming = 'yes', expected true or false"),
    ({"model": {"dropout": {"lstm": 1.5}}}, "model.dropout.lstm = 1.5, expected in [0, 1)"),
    ({"model": {"stride": 3}}, "model.stride = 3, expected one of 1, 2, 4"),
    ({"data": {"source": "local"}}, "data.path = '', expected a folder or zip"),
    ({"data": {"synthetic": {"min_words": 9, "max_words": 3}}}, "data.synthetic.min_words = 9, expected between 1 and max_words (3)"),
    ({"train": {"grad_clip": -1.0}}, "train.grad_clip = -1.0, expected greater than 0"),
    ({"train": {"warmup_epochs": 2, "scheduler": "plateau"}}, "train.warmup_epochs = 2, expected 0 with train.scheduler = plateau"),
    ({"train": {"warmup_epochs": 15, "epochs": 15}}, "train.warmup_epochs = 15, expected fewer than train.epochs (15)"),
    ({"train": {"weight_decay": -0.1}}, "train.weight_decay = -0.1, expected at least 0"),
    ({"model": {"embed_dim": 0}}, "model.embed_dim = 0, expected at least 1"),
    ({"train": {"specaugment": {"time_width": -2}}}, "train.specaugment.time_width = -2, expected at least 0"),
    ({"train": {"distributed": {"nnodes": 2}}}, "train.distributed.rdzv_endpoint = '', expected node 0's host:port when nnodes > 1"),
    ({"train": {"batch_size": 2, "distributed": {"nproc": 4}}}, "train.batch_size = 2, expected at least one utterance per DDP rank (4)"),
    ({"model": {"arch": "lstm"}}, "model.convnext_blocks = 1, expected 0 with model.arch = lstm"),
    ({"model": {"arch": "convnext"}}, "model.dropout.lstm = 0.2, expected 0.0 with model.arch = convnext"),
])
def test_bad_params_name_the_key_in_one_line(tmp_path, data, message):
    with pytest.raises(CtclabError) as err:
        load_params(write(tmp_path, data))
    text = str(err.value)
    assert message in text and text.startswith(str(tmp_path / "params.yaml") + ": ")
    assert "\n" not in text


def test_a_missing_key_is_named(tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    del raw["train"]["grad_clip"]
    with pytest.raises(CtclabError, match=r"missing key train\.grad_clip"):
        load_params(write(tmp_path, raw, base=False))


def test_flatten_uses_dotted_names():
    flat = flatten(DEFAULTS)
    assert flat["model.dropout.lstm"] == DEFAULTS.model.dropout.lstm
    assert flat["train.specaugment.time_masks"] == 0


def test_yaml_12_booleans_like_dvc(tmp_path):
    # `dvc exp run -S study.variant=off` writes `variant: off` unquoted (YAML 1.2: a string)
    p = write(tmp_path, {})
    text = p.read_text().replace("variant: ''", "variant: off").replace("name: ''", "name: no")
    p.write_text(text.replace("kaiming: true", "kaiming: false"))
    params = load_params(p)
    assert params.study.variant == "off" and params.study.name == "no" and params.model.kaiming is False


def test_schema_describes_every_key_and_the_cli_prints_it():
    schema = json_schema()
    assert schema == Params.model_json_schema()
    model = schema["$defs"]["ModelConfig"]
    assert model["properties"]["arch"]["enum"] == ["lstm", "convnext", "conv_lstm"]
    assert model["additionalProperties"] is False and "hidden" in model["required"]
    assert schema["$defs"]["DropoutConfig"]["properties"]["lstm"] == {"exclusiveMaximum": 1.0, "minimum": 0.0,
                                                                        "title": "Lstm", "type": "number"}
    out = subprocess.run([sys.executable, "-m", "ctclab", "params", "--schema"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out) == schema
