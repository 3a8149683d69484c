"""The one place where params.yaml becomes typed, validated config objects.

Each pipeline stage loads only its own sections; an unknown key, a wrong type or a value outside
its choices is reported as one line naming the dotted key, e.g.
`params.yaml: train.scheduler = 'step', expected one of cosine, plateau, none`.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from .errors import CtclabError


@dataclass(frozen=True)
class SyntheticConfig:
    seed: int = 11785
    train: int = 1200
    dev: int = 120
    test: int = 120
    min_words: int = 3
    max_words: int = 7
    workers: int = 2


@dataclass(frozen=True)
class DataConfig:
    source: Literal["synthetic", "kaggle", "local"] = "synthetic"
    competition: str = "11-785-s22-hw3p2"
    path: str = ""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(frozen=True)
class FeaturesConfig:
    normalize: Literal["utterance", "global", "none"] = "utterance"
    on_bad: Literal["skip", "fail"] = "skip"


@dataclass(frozen=True)
class DropoutConfig:
    embedding: float = 0.1
    lstm: float = 0.2
    classifier: float = 0.1


@dataclass(frozen=True)
class ModelConfig:
    arch: Literal["lstm", "convnext", "conv_lstm"] = "conv_lstm"
    hidden: int = 128
    lstm_layers: int = 2
    embed_dim: int = 128
    stride: int = 2
    convnext_blocks: int = 1
    kaiming: bool = True
    dropout: DropoutConfig = field(default_factory=DropoutConfig)


@dataclass(frozen=True)
class SpecAugmentConfig:
    time_masks: int = 0
    time_width: int = 10
    freq_masks: int = 0
    freq_width: int = 3


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 15
    batch_size: int = 16
    lr: float = 2e-3
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = 0.0
    scheduler: Literal["cosine", "plateau", "none"] = "cosine"
    grad_clip: float = 5.0
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    resume: Literal["auto", "never"] = "auto"
    specaugment: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)


@dataclass(frozen=True)
class TrackingConfig:
    uri: str = ""
    experiment: str = "ctclab"


@dataclass(frozen=True)
class DecodeConfig:
    beam_width: int = 10
    workers: int = 1


@dataclass(frozen=True)
class SubmitConfig:
    upload: bool = False


@dataclass(frozen=True)
class StudyConfig:
    """Set by `ctclab study run` for each queued experiment; empty for ordinary runs."""
    name: str = ""
    variant: str = ""
    parent_run_id: str = ""


@dataclass(frozen=True)
class Params:
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    submit: SubmitConfig = field(default_factory=SubmitConfig)
    study: StudyConfig = field(default_factory=StudyConfig)


def _coerce(tp, value, key: str, source: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise CtclabError(f"{source}: {key} = {value!r}, expected a mapping of {tp.__name__} keys")
        return build(tp, value, source, key + ".")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise CtclabError(f"{source}: {key} = {value!r}, expected one of {', '.join(map(str, choices))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise CtclabError(f"{source}: {key} = {value!r}, expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise CtclabError(f"{source}: {key} = {value!r}, expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CtclabError(f"{source}: {key} = {value!r}, expected a number")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise CtclabError(f"{source}: {key} = {value!r}, expected a string")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")


def build(cls, mapping: dict | None, source: str = "params.yaml", prefix: str = ""):
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    mapping = mapping or {}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - names)
    if unknown:
        raise CtclabError(f"{source}: unknown key {prefix}{unknown[0]}; expected one of {', '.join(sorted(names))}")
    return cls(**{k: _coerce(hints[k], v, prefix + k, source) for k, v in mapping.items()})


class Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 booleans (only true/false), as DVC reads and writes params.yaml: under PyYAML's
    YAML 1.1 rules a value such as `off` or `no` written by `dvc exp run -S` would turn into a bool."""


Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def load_yaml(text: str):
    return yaml.load(text, Loader=Yaml12Loader)


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = load_yaml(path.read_text())
    except FileNotFoundError:
        raise CtclabError(f"{path}: not found; run from the repository root") from None
    except yaml.YAMLError as err:
        raise CtclabError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    params = build(Params, raw, str(path))
    check(params, str(path))
    return params


def check(p: Params, source: str = "params.yaml") -> None:
    """Value-range checks that types alone do not express."""
    def need(ok: bool, key: str, value, expected: str):
        if not ok:
            raise CtclabError(f"{source}: {key} = {value!r}, expected {expected}")

    s = p.data.synthetic
    for split in ("train", "dev", "test"):
        need(getattr(s, split) >= 1, f"data.synthetic.{split}", getattr(s, split), "at least 1")
    need(1 <= s.min_words <= s.max_words, "data.synthetic.min_words", s.min_words, f"between 1 and max_words ({s.max_words})")
    need(s.workers >= 1, "data.synthetic.workers", s.workers, "at least 1")
    need(p.data.source != "local" or bool(p.data.path), "data.path", p.data.path, "a folder or zip when data.source is local")
    need(p.model.hidden >= 1, "model.hidden", p.model.hidden, "at least 1")
    need(p.model.lstm_layers >= 1, "model.lstm_layers", p.model.lstm_layers, "at least 1")
    need(p.model.stride in (1, 2, 4), "model.stride", p.model.stride, "1, 2 or 4")
    for name in ("embedding", "lstm", "classifier"):
        v = getattr(p.model.dropout, name)
        need(0.0 <= v < 1.0, f"model.dropout.{name}", v, "in [0, 1)")
    need(p.train.epochs >= 1, "train.epochs", p.train.epochs, "at least 1")
    need(p.train.batch_size >= 1, "train.batch_size", p.train.batch_size, "at least 1")
    need(p.train.lr > 0, "train.lr", p.train.lr, "a positive number")
    need(p.decode.beam_width >= 1, "decode.beam_width", p.decode.beam_width, "at least 1")
    need(p.decode.workers >= 1, "decode.workers", p.decode.workers, "at least 1")


def flatten(obj, prefix: str = "") -> dict[str, object]:
    """Dotted-name view of a config object, e.g. {'model.dropout.lstm': 0.2} (for MLflow params)."""
    out: dict[str, object] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out.update(flatten(v, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = v
    return out
