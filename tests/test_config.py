import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ctclab.config import flatten, json_schema, load_params
from ctclab.errors import CtclabError
from project import DEFAULTS, committed_project, merge, run

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
    # every config key, each architecture's included, is spelled out in params.yaml, so `dvc exp
    # show` lists them all; flatten (what MLflow logs) keeps only the architecture that runs
    def keys(d, prefix=""):
        for k, v in d.items():
            yield from keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
    assert set(keys(raw)) == set(keys(params.model_dump()))
    assert {k for k in flatten(params) if k.startswith("model.")} == {"model.arch"} | {
        k for k in keys(raw) if k.startswith(f"model.{params.model.arch}.")}


@pytest.mark.parametrize("data, message", [
    ({"train": {"sheduler": "cosine"}}, "unknown key train.sheduler; expected one of epochs, batch_size"),
    ({"train": {"scheduler": "step"}}, "train.scheduler = 'step', expected one of cosine, plateau, none"),
    ({"model": {"conv_lstm": {"hidden": "big"}}}, "model.conv_lstm.hidden = 'big', expected an integer"),
    ({"train": {"epochs": "3"}}, "train.epochs = '3', expected an integer"),  # strict: no coercion
    ({"train": {"lr": "0.1"}}, "train.lr = '0.1', expected a number"),
    ({"model": {"conv_lstm": {"kaiming": "yes"}}}, "model.conv_lstm.kaiming = 'yes', expected true or false"),
    ({"model": {"conv_lstm": {"dropout": {"lstm": 1.5}}}}, "model.conv_lstm.dropout.lstm = 1.5, expected in [0, 1)"),
    ({"model": {"lstm": {"stride": 3}}}, "model.lstm.stride = 3, expected one of 1, 2, 4"),
    ({"data": {"source": "local"}}, "data.path = '', expected a folder or zip"),
    ({"data": {"synthetic": {"min_words": 9, "max_words": 3}}}, "data.synthetic.min_words = 9, expected between 1 and max_words (3)"),
    ({"train": {"grad_clip": -1.0}}, "train.grad_clip = -1.0, expected greater than 0"),
    ({"train": {"warmup_epochs": 2, "scheduler": "plateau"}}, "train.warmup_epochs = 2, expected 0 with train.scheduler = plateau"),
    ({"train": {"warmup_epochs": 15, "epochs": 15}}, "train.warmup_epochs = 15, expected fewer than train.epochs (15)"),
    ({"train": {"weight_decay": -0.1}}, "train.weight_decay = -0.1, expected at least 0"),
    ({"model": {"convnext": {"embed_dim": 0}}}, "model.convnext.embed_dim = 0, expected at least 1"),
    ({"train": {"specaugment": {"time_width": -2}}}, "train.specaugment.time_width = -2, expected at least 0"),
    ({"train": {"distributed": {"nnodes": 2}}}, "train.distributed.rdzv_endpoint = '', expected node 0's host:port when nnodes > 1"),
    ({"train": {"batch_size": 2, "distributed": {"nproc": 4}}}, "train.batch_size = 2, expected at least one utterance per DDP rank (4)"),
    ({"train": {"cuda_graphs": True, "distributed": {"nproc": 2}}}, "train.cuda_graphs = True, expected false with "
                                                                     "train.distributed (2 processes)"),
    ({"train": {"cuda_graphs": True, "compile": True}}, "train.cuda_graphs = True, expected false with train.compile: true"),
    # an architecture has only its own knobs: none to hold at a neutral value for another's sake
    ({"model": {"lstm": {"convnext_blocks": 1}}}, "unknown key model.lstm.convnext_blocks; expected one of hidden, "),
    ({"model": {"convnext": {"dropout": {"lstm": 0.2}}}}, "unknown key model.convnext.dropout.lstm; expected one of "
                                                          "embedding, classifier"),
    ({"model": {"arch": "transfomer"}}, "model.arch = 'transfomer', expected one of conv_lstm, convnext, lstm"),
    ({"model": {"lstmm": {"hidden": 8}}}, "unknown key model.lstmm; expected one of arch, "),
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


def test_an_architecture_section_left_out_takes_its_defaults(tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    del raw["model"]["lstm"]
    raw["model"]["convnext"] = {"hidden": 64}
    params = load_params(write(tmp_path, raw, base=False))
    assert params.model.lstm == type(DEFAULTS.model.lstm)() and params.model.convnext.hidden == 64
    assert params.model.convnext.stages == type(DEFAULTS.model.convnext)().stages


def test_flatten_uses_dotted_names():
    flat = flatten(DEFAULTS)
    assert flat["model.conv_lstm.dropout.lstm"] == DEFAULTS.model.conv_lstm.dropout.lstm
    assert flat["train.specaugment.time_masks"] == 0


def test_yaml_12_booleans_like_dvc(tmp_path):
    # `dvc exp run -S study.variant=off` writes `variant: off` unquoted (YAML 1.2: a string)
    p = write(tmp_path, {})
    text = p.read_text().replace("variant: ''", "variant: off").replace("name: ''", "name: no")
    p.write_text(text.replace("kaiming: true", "kaiming: false"))
    params = load_params(p)
    assert params.study.variant == "off" and params.study.name == "no" and params.model.active.kaiming is False


def test_values_mean_what_dvc_reads_written_by_hand_or_by_dvc_exp_run_set(tmp_path):
    """ctclab and DVC read params.yaml alike (YAML 1.2): by hand `1e-3`, `.5`, `1_000`, `off`; and
    each value `dvc exp run -S` writes. `dvc params diff` says what DVC read; load_params must agree."""
    project = committed_project(tmp_path / "p")
    text = (project / "params.yaml").read_text()
    for old, new in (("lr: 0.002", "lr: 1e-3"), ("grad_clip: 5.0", "grad_clip: .5"), ("train: 16", "train: 1_000"),
                     ("variant: ''", "variant: off"), ("amp: auto", "amp: off")):
        assert old in text
        text = text.replace(old, new, 1)
    (project / "params.yaml").write_text(text)

    def dvc_reads() -> dict:
        diff = json.loads(run(project, sys.executable, "-m", "dvc", "params", "diff", "--json").stdout)
        return {key: change["new"] for key, change in diff["params.yaml"].items()}

    def ctclab_reads(keys) -> dict:
        flat = flatten(load_params(project / "params.yaml"))
        return {key: flat[key] for key in keys}

    by_hand = dvc_reads()
    assert by_hand == {"train.lr": 0.001, "train.grad_clip": 0.5, "data.synthetic.train": 1000, "study.variant": "off",
                       "train.amp": "off"}
    assert ctclab_reads(by_hand) == by_hand
    run(project, "git", "checkout", "params.yaml")
    run(project, sys.executable, "-m", "dvc", "exp", "run", "validate", "-S", "train.lr=1e-4", "-S", "train.grad_clip=.25",
        "-S", "decode.beam_width=1_000", "-S", "study.variant=no", "-S", "study.name=off")
    by_dvc = dvc_reads()
    assert by_dvc == {"train.lr": 0.0001, "train.grad_clip": 0.25, "decode.beam_width": 1000, "study.variant": "no",
                      "study.name": "off"}
    assert ctclab_reads(by_dvc) == by_dvc


def _resolve(node: dict, defs: dict) -> dict:
    while "$ref" in node or len(node.get("allOf", ())) == 1:
        node = defs[node["$ref"].split("/")[-1]] if "$ref" in node else node["allOf"][0]
    return node


def numeric_keys() -> dict[str, dict]:
    """Every number in the repository's params.yaml (the file, not the code, says which keys) with
    its JSON-schema property: a bound removed from the code disappears from the schema as well."""
    schema = json_schema()

    def walk(raw: dict, node: dict, prefix: str):
        node = _resolve(node, schema["$defs"])
        for key, value in raw.items():
            prop = _resolve(node["properties"][key], schema["$defs"])
            if isinstance(value, dict):
                yield from walk(value, prop, f"{prefix}{key}.")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                yield prefix + key, prop
    return dict(walk(yaml.safe_load((REPO / "params.yaml").read_text()), schema, ""))


def test_every_number_in_params_yaml_has_a_range():
    unbounded = [k for k, prop in numeric_keys().items()
                 if not {"minimum", "exclusiveMinimum", "enum"} & set(prop)]
    assert unbounded == [], f"no lower bound (or allowed values) in the schema for {unbounded}"


def out_of_range() -> list[tuple[str, object]]:
    """Each bound of each numeric key, just crossed."""
    cases = []
    for key, prop in numeric_keys().items():
        step = 1 if prop["type"] == "integer" else 0.01
        if "minimum" in prop:
            cases.append((key, prop["minimum"] - step))
        if "exclusiveMinimum" in prop:
            cases.append((key, prop["exclusiveMinimum"]))
        if "maximum" in prop:
            cases.append((key, prop["maximum"] + step))
        if "exclusiveMaximum" in prop:
            cases.append((key, prop["exclusiveMaximum"]))
        if "enum" in prop:
            cases.append((key, max(prop["enum"]) + 1))
    return cases


@pytest.mark.parametrize("key, value", out_of_range(), ids=lambda v: str(v))
def test_every_range_is_enforced_in_one_line(tmp_path, key, value):
    *parents, leaf = key.split(".")
    data = node = {}
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    with pytest.raises(CtclabError) as err:
        load_params(write(tmp_path, data))
    assert f"{key} = {value!r}, expected" in str(err.value) and "\n" not in str(err.value)


def test_schema_describes_every_key_and_the_cli_prints_it():
    schema = json_schema()
    assert schema == type(DEFAULTS).model_json_schema()
    model = schema["$defs"]["ModelConfig"]
    assert set(model["properties"]["arch"]["enum"]) >= {"lstm", "convnext", "conv_lstm"}
    assert model["additionalProperties"] is False and model["required"] == ["arch"]
    assert schema["$defs"]["LSTMDropout"]["properties"]["lstm"] == {"default": 0.2, "exclusiveMaximum": 1.0,
                                                                    "minimum": 0.0, "title": "Lstm", "type": "number"}
    out = subprocess.run([sys.executable, "-m", "ctclab", "params", "--schema"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out) == schema
