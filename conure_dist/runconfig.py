"""The run's config file: one YAML document with everything a run needs.

The schema is generated from the frozen dataclasses of :mod:`conure_dist.config` (the same
fields, types and defaults), and validated twice: by OmegaConf while merging (types, unknown
keys, naming the file and the key) and by the dataclasses themselves when the experiment is
built (ranges, choices). OmegaConf was chosen because its structured configs take dataclasses
as the schema, merge layered YAML with type checks, and take dotted ``key=value`` overrides,
including per-task ones (``tasks.like.l2=0.05``), with no parser of our own.

Precedence: command line > config files (in the order given) > the preset.

Layout (``conure-dist config show ttl`` prints a complete, commented example)::

    data / run_dir / source      where the prepared dataset, the run and raw inputs live
    task_order                   tasks to train, in order (null: the dataset's order)
    method, seed, seq_len, shuffle_buffer_rows, max_eval_rows
    model                        the backbone (ModelConfig without num_items, which the data gives)
    first_task, later_tasks      TrainConfig of T1 and of every later task
    prune_ratios                 prune ratio of task 1, 2, ... (by position)
    tasks.<name>                 per-task overrides of any first_task/later_tasks key or prune ratio
    cluster                      ClusterConfig (workers, GPUs, ZeRO stage, precision, ...)
    deepspeed                    merged into the generated DeepSpeed config (see engine.py)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Dict, List, Optional, Sequence

from conure_dist.config import ClusterConfig, ConfigError, ModelConfig, TrainConfig

SOURCE_KINDS = ("none", "synthetic", "ttl", "movielens")


def _schema_type(hint: Any) -> Any:
    """A type OmegaConf accepts for a dataclass field's type (tuples as lists, ``X | None`` as Optional)."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        return List[typing.get_args(hint)[0]]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return Optional[_schema_type(args[0])] if len(args) == 1 else Any
    return hint


def derive_schema(cls: type, name: str, *, drop: Sequence[str] = (), optional: bool = False,
                  replace: Optional[Dict[str, tuple]] = None, extra: Sequence[tuple] = ()) -> type:
    """A (mutable) dataclass with the fields of ``cls``: same names, types and defaults, less
    ``drop``; with ``optional``, every field is Optional and defaults to None (an override)."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if f.name in drop:
            continue
        kind, default = _schema_type(hints[f.name]), f.default
        if replace and f.name in replace:
            kind, default = replace[f.name]
        if optional:
            fields.append((f.name, Optional[kind], field(default=None)))
        elif isinstance(default, (list, tuple)):
            fields.append((f.name, kind, field(default_factory=lambda d=list(default): list(d))))
        elif default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            fields.append((f.name, kind, field(default_factory=f.default_factory)))
        else:
            fields.append((f.name, kind, field(default=default)))
    for name_, kind, default in extra:
        fields.append((name_, Optional[kind] if optional else kind, field(default=None if optional else default)))
    return dataclasses.make_dataclass(name, fields)


ModelSettings = derive_schema(ModelConfig, "ModelSettings", drop=("num_items",))
# The run's seed seeds every task (TrainConfig.seed is set from it).
TrainSettings = derive_schema(TrainConfig, "TrainSettings", drop=("seed",))
TaskOverride = derive_schema(TrainConfig, "TaskOverride", drop=("seed",), optional=True,
                             extra=(("prune_ratio", float, None), ("embedding_prune_ratio", float, None)))
# cpus_per_worker null: 0.5 on CPU (leaves CPUs to Ray Data), 4 with GPUs; memory_per_worker 0:
# what the run's largest stage needs (conure_dist.resources).
ClusterSettings = derive_schema(ClusterConfig, "ClusterSettings",
                                replace={"cpus_per_worker": (Optional[float], None)})


@dataclass
class SourceSettings:
    """Raw inputs prepared into RUN_DIR/data on first use, when ``data`` is not set."""

    kind: str = "none"  # none | synthetic | ttl | movielens
    raw: Optional[str] = None  # directory or URI of the raw files (ttl, movielens)
    preset: str = "demo"  # synthetic: demo | ttl-small | ttl
    skip_bad: bool = False  # ttl, movielens: skip bad lines (counted) instead of stopping
    allow_new_users: bool = False  # ttl: later-task sequences of no first-task user become new users


@dataclass
class RunConfig:
    data: Optional[str] = None
    run_dir: Optional[str] = None
    source: SourceSettings = field(default_factory=SourceSettings)
    task_order: Optional[List[str]] = None
    method: str = "conure"
    seed: int = 0
    seq_len: int = 100
    shuffle_buffer_rows: int = 100_000
    max_eval_rows: int = 0
    model: ModelSettings = field(default_factory=ModelSettings)  # type: ignore[valid-type]
    first_task: TrainSettings = field(default_factory=TrainSettings)  # type: ignore[valid-type]
    later_tasks: TrainSettings = field(default_factory=TrainSettings)  # type: ignore[valid-type]
    prune_ratios: List[float] = field(default_factory=lambda: [0.7, 0.8, 0.9, 0.8, 0.9, 0.9])
    tasks: Dict[str, TaskOverride] = field(default_factory=dict)  # type: ignore[valid-type]
    cluster: ClusterSettings = field(default_factory=ClusterSettings)  # type: ignore[valid-type]
    deepspeed: Dict[str, Any] = field(default_factory=dict)


# --- loading and merging --------------------------------------------------------------------


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("conure_dist.presets").iterdir() if p.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    """The shipped preset's YAML, comments included (``conure-dist config show NAME``)."""
    if name not in preset_names():
        raise ConfigError(f"--preset: no preset {name!r}; one of {preset_names()}")
    return resources.files("conure_dist.presets").joinpath(f"{name}.yaml").read_text(encoding="utf-8")


def _error(where: str, e: Exception) -> ConfigError:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    key = getattr(e, "full_key", None)
    return ConfigError(f"{where}: {key}: {first}" if key else f"{where}: {first}")


def _merge(base, layer, where: str):
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as e:
        raise _error(where, e) from None


def _yaml(text: str, where: str):
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a config file holds a mapping of keys, got {type(data).__name__}")
    try:
        return OmegaConf.create(data)
    except OmegaConfBaseException as e:
        raise _error(where, e) from None


def load_config(preset: str, files: Sequence[str] = (), overrides: Sequence[str] = (),
                updates: Sequence[tuple[str, Any]] = ()):
    """The merged config (an OmegaConf object typed by :class:`RunConfig`): the preset, then each
    file, then the command line (:func:`apply_command_line`)."""
    from omegaconf import OmegaConf

    from conure_dist import storage

    cfg = _merge(OmegaConf.structured(RunConfig), _yaml(preset_text(preset), f"preset {preset}"), f"preset {preset}")
    for path in files:
        try:
            text = storage.read_bytes(storage.resolve(path)).decode("utf-8")
        except FileNotFoundError:
            raise ConfigError(f"--config: {path}: not found") from None
        cfg = _merge(cfg, _yaml(text, path), path)
    return apply_command_line(cfg, updates, overrides)


def apply_command_line(cfg, updates: Sequence[tuple[str, Any]] = (), overrides: Sequence[str] = ()):
    """``cfg`` with ``updates`` (typed values of named command-line options, ``(dotted key,
    value)``), then ``overrides`` (``key=value`` strings, YAML-typed) applied."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for key, value in updates:
        try:
            OmegaConf.update(cfg, key, value, merge=False)
        except OmegaConfBaseException as e:
            raise _error("command line", e) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set: KEY=VALUE expected, got {item!r}")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"--set {item}")
    return cfg


def to_yaml(cfg) -> str:
    """The config as YAML in the presets' layout: lists of numbers on one line, per-task
    overrides with only the keys they set (an unset key is null, i.e. not overridden)."""
    import yaml
    from omegaconf import OmegaConf

    class Dumper(yaml.SafeDumper):
        pass

    def flow_lists(dumper, data):
        return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)

    Dumper.add_representer(list, flow_lists)
    data = OmegaConf.to_container(cfg)
    data["tasks"] = {name: {k: v for k, v in o.items() if v is not None} for name, o in data["tasks"].items()}
    return yaml.dump(data, Dumper=Dumper, sort_keys=False, default_flow_style=False, width=100)


def to_run_config(cfg) -> RunConfig:
    from omegaconf import OmegaConf

    return OmegaConf.to_object(cfg)


def check_source(rc: RunConfig) -> None:
    if rc.source.kind not in SOURCE_KINDS:
        raise ConfigError(f"source.kind: one of {SOURCE_KINDS}, got {rc.source.kind!r}")
    if rc.data and rc.source.raw:
        raise ConfigError(f"data (--data {rc.data}) and source.raw (--raw {rc.source.raw}) are both set; "
                          "give a prepared dataset or raw inputs, not both")


def train_config(rc: RunConfig, name: str, position: int, seed: int) -> tuple[TrainConfig, dict]:
    """Task ``name`` (at ``position``, 0 = T1): its TrainConfig and its spec overrides."""
    base = dataclasses.asdict(rc.first_task if position == 0 else rc.later_tasks)
    spec: dict[str, Any] = {}
    override = rc.tasks.get(name)
    if override is not None:
        for key, value in dataclasses.asdict(override).items():
            if value is None:
                continue
            (spec if key in ("prune_ratio", "embedding_prune_ratio") else base)[key] = value
    section = "first_task" if position == 0 else "later_tasks"
    try:
        return TrainConfig(**base, seed=seed), spec
    except ConfigError as e:
        raise ConfigError(f"{section} / tasks.{name}: {e}") from None


def model_config(rc: RunConfig, num_items: int) -> ModelConfig:
    data = dataclasses.asdict(rc.model)
    return ModelConfig(num_items=num_items, **{**data, "dilations": tuple(data["dilations"])})


def cluster_config(rc: RunConfig) -> ClusterConfig:
    data = dataclasses.asdict(rc.cluster)
    if data["cpus_per_worker"] is None:
        data["cpus_per_worker"] = 4.0 if data["use_gpu"] else 0.5
    return ClusterConfig(**data)
