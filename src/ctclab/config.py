"""The one place where params.yaml becomes typed, validated config objects (pydantic v2, strict).

params.yaml holds every value, defaults included (it is what `dvc exp show` and `-S` read and
write); these models hold only types, ranges and cross-key rules. An unknown or missing key, a
wrong type (no silent coercion: "3" is not 3) or a value out of range is reported as one line
naming the dotted key, e.g. `params.yaml: train.scheduler = 'step', expected one of cosine, plateau, none`.

    ctclab params --schema > params.schema.json    # JSON schema for an editor's YAML extension
"""
from __future__ import annotations

import functools
import io
import re
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import ruamel.yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .errors import CtclabError

AtLeast1 = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Probability = Annotated[float, Field(ge=0.0, lt=1.0)]


class Section(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class SyntheticConfig(Section):
    seed: NonNegativeInt
    train: AtLeast1
    dev: AtLeast1
    test: AtLeast1
    min_words: AtLeast1
    max_words: AtLeast1
    workers: AtLeast1  # speed only: the same seed gives the same bytes whatever the worker count

    @model_validator(mode="after")
    def _word_range(self):
        if self.min_words > self.max_words:
            raise rule_error("min_words", self.min_words, f"between 1 and max_words ({self.max_words})")
        return self


class DataConfig(Section):
    source: Literal["synthetic", "kaggle", "local"]
    competition: str
    path: str
    synthetic: SyntheticConfig

    @model_validator(mode="after")
    def _local_needs_path(self):
        if self.source == "local" and not self.path:
            raise rule_error("path", self.path, "a folder or zip when data.source is local")
        return self


class FeaturesConfig(Section):
    normalize: Literal["utterance", "global", "none"]
    on_bad: Literal["skip", "fail"]


class ArchConfig(Section):
    """An architecture's knobs (subclassed in each module of ctclab.archs). Every field has a default:
    params.yaml's `model.<arch>` section may leave keys out, and a checkpoint written before a field
    existed still loads."""


class ModelSection(Section):
    """`model.arch` picks a registered architecture; `model.<name>` holds each one's knobs. The
    fields per architecture are added when params are validated (see `params_class`)."""
    arch: str

    @property
    def active(self) -> ArchConfig:
        """The knobs of the architecture that runs."""
        return getattr(self, self.arch)


class SpecAugmentConfig(Section):
    time_masks: NonNegativeInt
    time_width: NonNegativeInt
    freq_masks: NonNegativeInt
    freq_width: NonNegativeInt


class DistributedConfig(Section):
    """DDP through torchrun: processes per node, nodes, and node 0's host:port when nnodes > 1."""
    nproc: AtLeast1
    nnodes: AtLeast1
    rdzv_endpoint: str

    @model_validator(mode="after")
    def _endpoint_for_nodes(self):
        if self.nnodes > 1 and not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", self.rdzv_endpoint):
            raise rule_error("rdzv_endpoint", self.rdzv_endpoint, "node 0's host:port when nnodes > 1")
        return self


class TrainConfig(Section):
    epochs: AtLeast1
    batch_size: AtLeast1
    lr: Annotated[float, Field(gt=0.0)]
    optimizer: Literal["adam", "adamw"]
    weight_decay: Annotated[float, Field(ge=0.0)]
    scheduler: Literal["cosine", "plateau", "none"]
    warmup_epochs: NonNegativeInt  # the lr ramps up linearly over these first epochs (cosine or none)
    grad_clip: Annotated[float, Field(gt=0.0)]
    seed: NonNegativeInt
    device: Literal["auto", "cpu", "cuda"]
    amp: Literal["auto", "bf16", "fp16", "off"]  # CUDA autocast; auto = bf16 where supported, else fp16
    loader_workers: NonNegativeInt  # DataLoader processes collating batches ahead (speed only)
    resume: Literal["auto", "never"]
    checkpoint_minutes: Annotated[float, Field(gt=0.0)]  # a mid-epoch resume checkpoint at least this often
    oom: Literal["split", "fail"]  # out of memory: retry the batch as micro-batches, or stop
    compile: bool  # torch.compile what the architecture says fuses well (CTCModel.compile_parts)
    lstm_autocast: bool  # CUDA: BiLSTMs under autocast too (reduced-precision cuDNN); no effect on the CPU
    cuda_graphs: bool  # CUDA: forward and backward replayed as one graph per batch shape (ctclab.cuda_graphs); no effect on the CPU
    specaugment: SpecAugmentConfig
    distributed: DistributedConfig

    @model_validator(mode="after")
    def _a_share_for_every_rank(self):
        ranks = self.distributed.nproc * self.distributed.nnodes
        if self.batch_size < ranks:
            raise rule_error("batch_size", self.batch_size, f"at least one utterance per DDP rank ({ranks})")
        return self

    @model_validator(mode="after")
    def _graphs_alone(self):
        ranks = self.distributed.nproc * self.distributed.nnodes
        if self.cuda_graphs and (ranks > 1 or self.compile):
            other = f"train.distributed ({ranks} processes)" if ranks > 1 else "train.compile: true"
            raise rule_error("cuda_graphs", True, f"false with {other}: graphs replay one process's "
                             "eager model (set one of them false)")
        return self

    @model_validator(mode="after")
    def _warmup_before_the_end(self):
        if self.warmup_epochs and self.scheduler == "plateau":
            # ReduceLROnPlateau steps on the dev score, once an epoch; torch's SequentialLR cannot chain it
            raise rule_error("warmup_epochs", self.warmup_epochs, "0 with train.scheduler = plateau "
                             "(warmup chains with cosine or none)")
        if self.warmup_epochs >= self.epochs:
            raise rule_error("warmup_epochs", self.warmup_epochs, f"fewer than train.epochs ({self.epochs})")
        return self


class TrackingConfig(Section):
    uri: str
    experiment: Annotated[str, Field(min_length=1)]


class DecodeConfig(Section):
    beam_width: AtLeast1
    workers: AtLeast1


class SubmitConfig(Section):
    upload: bool


class StudyConfig(Section):
    """Set by `ctclab study run` for each queued experiment; empty for ordinary runs."""
    name: str
    variant: str
    parent_run_id: str

    @field_validator("*", mode="before")
    @classmethod
    def _null_is_empty(cls, v):  # `dvc exp run -S study.name=` writes a YAML null
        return "" if v is None else v


class Params(Section):
    data: DataConfig
    features: FeaturesConfig
    model: ModelSection
    train: TrainConfig
    tracking: TrackingConfig
    decode: DecodeConfig
    submit: SubmitConfig
    study: StudyConfig


def rule_error(key: str, value, expected: str) -> PydanticCustomError:
    """A cross-key rule's failure, reported at `key` (relative to the section that raised it)."""
    return PydanticCustomError("ctclab", "{key} = {value}, expected {expected}",
                               {"key": key, "value": value, "expected": expected})


def _submodel(annotation) -> type[BaseModel] | None:
    """The model a field holds: itself, or the item type of e.g. list[Variant]; None for leaves."""
    return next((a for a in (annotation, *typing.get_args(annotation))
                 if isinstance(a, type) and issubclass(a, BaseModel)), None)


def _field(loc: list[str], root: type[BaseModel]):
    """The pydantic FieldInfo at a location of `root` (list indices skipped; None past a leaf)."""
    model, info = root, None
    for part in loc:
        if part.isdigit():
            continue
        info = model.model_fields.get(part) if model is not None else None
        if info is None:
            return None
        model = _submodel(info.annotation)
    return info


def _expected(err: dict, info) -> str:
    """What a failed check wanted, in words, read from the field's own type and constraints."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "literal_error" and info is not None:
        return "one of " + ", ".join(str(c) for c in typing.get_args(info.annotation))
    bounds = {type(m).__name__: m for m in (info.metadata if info is not None else [])}
    if "Ge" in bounds and "Lt" in bounds:
        return f"in [{bounds['Ge'].ge:g}, {bounds['Lt'].lt:g})"
    words = {"int_type": "an integer", "bool_type": "true or false", "float_type": "a number",
             "string_type": "a string", "model_type": "a mapping", "dict_type": "a mapping",
             "greater_than_equal": f"at least {ctx.get('ge')}", "greater_than": f"greater than {ctx.get('gt')}",
             "less_than": f"less than {ctx.get('lt')}", "less_than_equal": f"at most {ctx.get('le')}",
             "string_too_short": "a non-empty string", "too_short": f"at least {ctx.get('min_length')} item",
             "string_pattern_mismatch": f"a value matching {ctx.get('pattern')}"}
    return words.get(kind, err["msg"])


def one_line(err: ValidationError, source: str, root: type[BaseModel]) -> str:
    """pydantic's first error as `<source>: <dotted key> = <value>, expected <what>`."""
    e = err.errors()[0]
    loc = [str(p) for p in e["loc"]]
    if e["type"] == "ctclab":
        ctx = e["ctx"]
        return f"{source}: {'.'.join(loc + [ctx['key']])} = {ctx['value']!r}, expected {ctx['expected']}"
    key = ".".join(loc).replace(".[", "[")
    if e["type"] == "extra_forbidden":
        parent = _field(loc[:-1], root) if loc[:-1] else None
        model = (_submodel(parent.annotation) if parent is not None else None) or root
        return f"{source}: unknown key {key}; expected one of {', '.join(model.model_fields)}"
    if e["type"] == "missing":
        return f"{source}: missing key {key}; params.yaml must set every key (the repository's params.yaml lists them)"
    return f"{source}: {key} = {e['input']!r}, expected {_expected(e, _field(loc, root))}"


def params_class() -> type[Params]:
    """Params with a `model.<name>` section for each architecture (ctclab.archs) — in a process that
    builds models, i.e. has imported ctclab.models, whose registry finds them. A process that never
    does (the fetch and preprocess stages) leaves the model section unchecked rather than import
    every architecture's code: a stage depends on the code it runs (tests/test_dvc_yaml.py), and
    a new architecture must not re-run the corpus."""
    models = sys.modules.get(f"{__package__}.models")
    archs = models.architectures() if models is not None else {}
    return _params_class(tuple((a.name, a.config) for a in archs.values()))


class UncheckedModelSection(ModelSection):
    """The model section where no architecture is known (see params_class): kept, not checked or used."""
    model_config = ConfigDict(extra="allow")

    @property
    def active(self) -> ArchConfig:
        raise CtclabError("params.yaml: the model section was not checked (this process never imported "
                          "ctclab.models, whose registry knows the architectures); import it before load_params")


@functools.cache
def _params_class(archs: tuple[tuple[str, type[ArchConfig]], ...]) -> type[Params]:
    if not archs:
        return create_model("Params", __base__=Params, model=(UncheckedModelSection, ...))
    names = tuple(name for name, _ in archs)
    model = create_model("ModelConfig", __base__=ModelSection, arch=(Literal[names], ...),
                         **{name: (cfg, Field(default_factory=cfg)) for name, cfg in archs})
    return create_model("Params", __base__=Params, model=(model, ...))


def validate(raw, source: str = "params.yaml") -> Params:
    """Params from a parsed params.yaml mapping, or CtclabError with one line naming the key."""
    if not isinstance(raw, dict):
        raise CtclabError(f"{source}: expected a mapping of sections ({', '.join(Params.model_fields)})")
    cls = params_class()
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        raise CtclabError(one_line(err, source, cls)) from None


# params.yaml is read as DVC reads it (dvc.utils.serialize.parse_yaml: ruamel.yaml, typ="safe", YAML
# 1.2), so a value means here what dvc.lock records and what `dvc exp run -S` wrote: `1e-3` and `.5`
# are floats, `1_000` an int, and `off`/`no` stay strings (PyYAML's YAML 1.1 disagrees on each).
YAMLError = ruamel.yaml.YAMLError


def load_yaml(text: str):
    return ruamel.yaml.YAML(typ="safe").load(text)


def dump_yaml(data, flow: bool = False) -> str:
    """YAML text that load_yaml (and so DVC) reads back as `data`; mappings keep their order."""
    out = ruamel.yaml.YAML(typ="safe")
    out.default_flow_style = flow
    out.representer.sort_base_mapping_type_on_output = False
    buf = io.StringIO()
    out.dump(data, buf)
    return buf.getvalue()


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = load_yaml(path.read_text())
    except FileNotFoundError:
        raise CtclabError(f"{path}: not found; run from the repository root") from None
    except YAMLError as err:
        raise CtclabError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return validate(raw, str(path))


def with_overrides(params: Params, overrides: dict[str, Any], source: str = "overrides") -> Params:
    """Params with dotted overrides (`{"model.conv_lstm.hidden": 8}`) applied and validated like params.yaml."""
    # re-read first: an architecture registered since `params` was read gets its default section
    raw = validate(params.model_dump(), source).model_dump()
    for key, value in overrides.items():
        node, parts = raw, key.split(".")
        for p in parts[:-1]:
            node = node.get(p) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                break
        if not isinstance(node, dict) or parts[-1] not in node or isinstance(node[parts[-1]], dict):
            raise CtclabError(f"{source}: unknown param {key!r}; expected a key of params.yaml such as train.lr")
        node[parts[-1]] = value
    return validate(raw, source)


def flatten(obj: BaseModel, prefix: str = "") -> dict[str, object]:
    """Dotted-name view of a config object, e.g. {'model.conv_lstm.dropout.lstm': 0.2} (for MLflow params)."""
    out: dict[str, object] = {}
    # of the architectures' sections only the one that runs: the others' knobs did nothing
    names = ("arch", obj.arch) if isinstance(obj, ModelSection) else type(obj).model_fields
    for name in names:
        v = obj.active if isinstance(obj, ModelSection) and name == obj.arch else getattr(obj, name)
        if isinstance(v, BaseModel):
            out.update(flatten(v, f"{prefix}{name}."))
        else:
            out[prefix + name] = v
    return out


def json_schema() -> dict:
    """JSON schema of params.yaml (for editors: `# yaml-language-server: $schema=...`)."""
    return params_class().model_json_schema()
