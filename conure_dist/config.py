"""Typed, validated configuration: the model, the tasks and how each task is trained.

Precedence everywhere: command line > config file > the defaults below. Defaults follow the
paper's TTL setting (SIGIR 2021, section 5.1) where the paper gives one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

TASK_KINDS = ("sequence", "item", "class")
BACKBONES = ("nextitnet", "transformer", "dnn")
SAMPLERS = ("log_uniform", "uniform")
# What the L2 term covers: "head" = the task's own head weights (the authors' recipe; T1's head
# is the item vocabulary and is never regularised, so T1 gets no L2); "trainable" = every
# trainable weight but LayerNorms, biases and embedding tables; "none" = no L2 at all.
L2_SCOPES = ("head", "trainable", "none")
OPTIMIZERS = ("adam", "adamw")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the option."""


def _require(cond: bool, option: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{option}: {message}")


@dataclass(frozen=True)
class ModelConfig:
    """The backbone shared by every task.

    ``num_items`` is the largest item id; the embedding has ``num_items + 1`` rows because
    id 0 is padding.
    """

    num_items: int
    embed_dim: int = 256
    backbone: str = "nextitnet"
    kernel_size: int = 3
    dilations: tuple[int, ...] = (1, 2, 4, 8) * 4  # TTL: 16 conv layers, 8 residual blocks
    transformer_blocks: int = 2  # paper section 5.6: one head, two pre-LN blocks
    max_seq_len: int = 100  # learned positions of the Transformer backbone
    prune_embedding: bool = False  # paper Table 5

    def __post_init__(self) -> None:
        _require(self.num_items >= 1, "model.num_items", f"must be >= 1, got {self.num_items}")
        _require(self.embed_dim >= 1, "model.embed_dim", f"must be >= 1, got {self.embed_dim}")
        _require(self.backbone in BACKBONES, "model.backbone", f"one of {BACKBONES}, got {self.backbone!r}")
        _require(self.kernel_size >= 1, "model.kernel_size", f"must be >= 1, got {self.kernel_size}")
        _require(
            len(self.dilations) >= 2 and len(self.dilations) % 2 == 0 and min(self.dilations) >= 1,
            "model.dilations",
            f"an even, non-empty list of positive dilations (two conv layers per block), got {self.dilations}",
        )
        _require(self.transformer_blocks >= 1, "model.transformer_blocks", "must be >= 1")
        _require(self.max_seq_len >= 2, "model.max_seq_len", "must be >= 2")
        object.__setattr__(self, "dilations", tuple(int(d) for d in self.dilations))


@dataclass(frozen=True)
class TaskSpec:
    """One task of the continual sequence.

    kind ``sequence`` is T1 (next-item prediction over the item vocabulary); ``item`` ranks a
    label space of items (BPR); ``class`` predicts one of ``num_labels`` classes (softmax).
    """

    name: str
    kind: str
    num_labels: int = 0  # label space size for item/class tasks; unused for sequence
    prune_ratio: float = 0.7  # share of the *free* backbone capacity released after this task
    embedding_prune_ratio: float | None = None  # only with ModelConfig.prune_embedding

    def __post_init__(self) -> None:
        _require(bool(self.name) and self.name.isidentifier(), "task.name",
                 f"a non-empty identifier (letters, digits, _), got {self.name!r}")
        _require(self.kind in TASK_KINDS, f"task {self.name}.kind", f"one of {TASK_KINDS}, got {self.kind!r}")
        if self.kind != "sequence":
            _require(self.num_labels >= 2, f"task {self.name}.num_labels",
                     f"an {self.kind} task needs >= 2 labels, got {self.num_labels}")
        _require(0.0 < self.prune_ratio < 1.0, f"task {self.name}.prune_ratio",
                 f"must lie strictly between 0 and 1, got {self.prune_ratio}")
        if self.embedding_prune_ratio is not None:
            _require(0.0 < self.embedding_prune_ratio < 1.0, f"task {self.name}.embedding_prune_ratio",
                     f"must lie strictly between 0 and 1, got {self.embedding_prune_ratio}")


@dataclass(frozen=True)
class TrainConfig:
    """How one task is trained (both its train and its retrain stage)."""

    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0  # optimizer weight decay; cannot move frozen entries
    l2: float = 0.02  # l2 * 0.5 * sum(w^2) over the trainable entries that l2_scope covers
    l2_scope: str = "head"  # head | trainable | none (see L2_SCOPES)
    batch_size: int = 32
    epochs: int = 10  # train stage
    retrain_epochs: int = 5
    patience: int = 3  # epochs without validation gain before stopping early
    max_steps: int = 0  # optimizer steps per stage (train and retrain each); 0: no limit (smoke tests)
    sample_ratio: float = 0.2  # sequence task: share of the vocabulary drawn as negatives
    # Sequence task negatives: log_uniform (Zipfian over popularity rank, the authors' sampler;
    # needs the items' popularity) | uniform (its log-Q correction is a constant, i.e. none).
    sampler: str = "log_uniform"
    bpr_rho: float = 0.3  # item task: LambdaFM static sampler coefficient
    metric_k: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _require(self.optimizer in OPTIMIZERS, "train.optimizer", f"one of {OPTIMIZERS}, got {self.optimizer!r}")
        _require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _require(self.l2 >= 0, "train.l2", "must be >= 0")
        _require(self.l2_scope in L2_SCOPES, "train.l2_scope", f"one of {L2_SCOPES}, got {self.l2_scope!r}")
        _require(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _require(self.epochs >= 1, "train.epochs", "must be >= 1")
        _require(self.retrain_epochs >= 0, "train.retrain_epochs", "must be >= 0")
        _require(self.patience >= 1, "train.patience", "must be >= 1")
        _require(self.max_steps >= 0, "train.max_steps", f"must be >= 0 (0: no limit), got {self.max_steps}")
        _require(0.0 < self.sample_ratio <= 1.0, "train.sample_ratio", f"must lie in (0, 1], got {self.sample_ratio}")
        _require(self.sampler in SAMPLERS, "train.sampler", f"one of {SAMPLERS}, got {self.sampler!r}")
        _require(self.bpr_rho > 0, "train.bpr_rho", "must be > 0")
        _require(self.metric_k >= 1, "train.metric_k", "must be >= 1")


@dataclass(frozen=True)
class TaskPlan:
    """A task together with how it is trained."""

    spec: TaskSpec
    train: TrainConfig = field(default_factory=TrainConfig)


def to_dict(obj: Any) -> Any:
    """JSON-ready form of a config dataclass (tuples become lists)."""
    return dataclasses.asdict(obj)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a config dataclass from its :func:`to_dict` form, refusing unknown keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown option(s) {unknown}")
    kwargs = dict(data)
    if cls is ModelConfig and "dilations" in kwargs:
        kwargs["dilations"] = tuple(kwargs["dilations"])
    if cls is TaskPlan:
        kwargs["spec"] = from_dict(TaskSpec, kwargs["spec"])
        kwargs["train"] = from_dict(TrainConfig, kwargs.get("train", {}))
    return cls(**kwargs)


@dataclass(frozen=True)
class ClusterConfig:
    """How each stage is spread over Ray Train workers."""

    num_workers: int = 2
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 0.5  # < 1 leaves CPUs to Ray Data's read tasks (no deadlock on small nodes)
    memory_per_worker: int = 0  # bytes requested per worker (0 = none); see conure_dist.resources
    zero_stage: int = 0
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    max_failures: int = 1  # worker failures retried from the last checkpoint, per stage or evaluation
    checkpoint_every_steps: int = 0  # 0: at each epoch end only
    log_every_steps: int = 50
    # Splits smaller than this (uncompressed) are read once into Ray's object store and reused
    # by every epoch and stage (those cut into per-rank parts are read by the driver, which
    # holds each while putting it there); larger ones stream from Parquet each epoch.
    cache_splits_below_bytes: int = 256 * 2**20
    # How workers read Parquet (conure_dist.data.pipeline.READERS). It fixes the file order and
    # block boundaries, so the data order: a result setting. auto: "files" for a new run, and a
    # resumed run keeps the reader it was made with ("parquet" for runs made before the setting).
    reader: str = "auto"
    # How each rank shuffles its train rows every epoch (conure_dist.data.pipeline.TRAIN_SHUFFLES):
    # permute takes a rank's whole part of a split in the object store in a seeded permutation;
    # buffer shuffles a streaming split through shuffle_buffer_rows. A result setting; auto:
    # permute for a new run, and a resumed run keeps its own ("buffer" for runs made before it).
    train_shuffle: str = "auto"
    # run: one Ray Train worker group (the session) runs every stage and evaluation of a driver;
    # stage: a new group for each (the cluster is free while the coordinator prunes and
    # evaluates in between, at the cost of starting workers every time). Results are the same.
    worker_group: str = "run"

    def __post_init__(self) -> None:
        _require(self.num_workers >= 1, "cluster.num_workers", "must be >= 1")
        _require(self.gpus_per_worker > 0, "cluster.gpus_per_worker", "must be > 0")
        _require(self.cpus_per_worker > 0, "cluster.cpus_per_worker", "must be > 0")
        _require(self.memory_per_worker >= 0, "cluster.memory_per_worker", "must be >= 0")
        _require(self.zero_stage in (0, 1, 2), "cluster.zero_stage",
                 f"one of 0, 1, 2 (ZeRO-3 partitions parameters, which masking cannot follow); got {self.zero_stage}")
        _require(self.precision in ("auto", "fp32", "bf16"), "cluster.precision", f"auto, fp32 or bf16; got {self.precision!r}")
        _require(self.max_failures >= 0, "cluster.max_failures", "must be >= 0")
        _require(self.checkpoint_every_steps >= 0, "cluster.checkpoint_every_steps", "must be >= 0")
        _require(self.log_every_steps >= 1, "cluster.log_every_steps", "must be >= 1")
        _require(self.cache_splits_below_bytes >= 0, "cluster.cache_splits_below_bytes", "must be >= 0")
        _require(self.reader in ("auto", "files", "parquet"), "cluster.reader",
                 f"one of auto, files, parquet; got {self.reader!r}")
        _require(self.train_shuffle in ("auto", "permute", "buffer"), "cluster.train_shuffle",
                 f"one of auto, permute, buffer; got {self.train_shuffle!r}")
        _require(self.worker_group in ("run", "stage"), "cluster.worker_group", f"run or stage; got {self.worker_group!r}")

    @property
    def resolved_precision(self) -> str:
        if self.precision != "auto":
            return self.precision
        return "bf16" if self.use_gpu else "fp32"


# DeepSpeed keys the product sets from its own options (a user's ``deepspeed:`` section may not):
# key -> the option that sets it.
DEEPSPEED_OWNED = {
    "train_batch_size": "first_task/later_tasks.batch_size",
    "train_micro_batch_size_per_gpu": "the global batch divided by cluster.num_workers",
    "gradient_accumulation_steps": "(always 1: each step is one global batch)",
    "optimizer": "first_task/later_tasks: optimizer, lr, weight_decay",
    "zero_optimization.stage": "cluster.zero_stage",
    "bf16": "cluster.precision",
}
# Settings refused because they would break masking or are untested with it.
DEEPSPEED_REFUSED = {
    "fp16": "fp16 loss scaling is untested with masked weights; use cluster.precision: bf16",
    "zero_optimization.offload_optimizer": "optimizer offload is untested with masked weights",
    "zero_optimization.offload_param": "parameter offload is ZeRO-3 only, which masking cannot follow",
    "zero_optimization.stage3_param_persistence_threshold": "ZeRO-3 only, which masking cannot follow",
    "zero_optimization.stage3_max_live_parameters": "ZeRO-3 only, which masking cannot follow",
}


def _dotted_keys(value: Any, prefix: str = "") -> list[str]:
    if not isinstance(value, dict):
        return [prefix]
    keys = [prefix] if prefix else []
    for k, v in value.items():
        keys += _dotted_keys(v, f"{prefix}.{k}" if prefix else str(k))
    return keys


def check_deepspeed_section(section: dict) -> None:
    """Refuse a user's DeepSpeed setting that the product owns or that breaks masking, with the reason."""
    _require(isinstance(section, dict), "deepspeed", "a mapping of DeepSpeed config keys")
    for key in _dotted_keys(section):
        if key in DEEPSPEED_OWNED:
            raise ConfigError(f"deepspeed.{key}: set by conure_dist from {DEEPSPEED_OWNED[key]}; set that instead")
        if key in DEEPSPEED_REFUSED:
            raise ConfigError(f"deepspeed.{key}: refused: {DEEPSPEED_REFUSED[key]}")


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything a distributed run is: data, model, tasks in order, method, cluster."""

    dataset: str  # prepared dataset directory (see docs/dataset-format.md)
    model: ModelConfig
    tasks: tuple[TaskPlan, ...]
    method: str = "conure"
    seq_len: int = 100
    seed: int = 0
    # Rows each worker shuffles at a time through a buffer (cluster.train_shuffle buffer, and
    # splits too large for the object store), with a seed of (seed, task, stage, epoch, rank), on
    # top of a per-stage order of the Parquet files; 0 turns the per-epoch shuffle off (also the
    # permutation of cluster.train_shuffle permute).
    shuffle_buffer_rows: int = 100_000
    # Validation and test read at most this many rows of each split (the first ones, in the
    # stored order); 0 reads them all. For smoke tests at scale: such metrics are not the task's.
    max_eval_rows: int = 0
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # Merged into the generated DeepSpeed config (keys in DEEPSPEED_OWNED / _REFUSED refused).
    deepspeed: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(len(self.tasks) >= 1, "tasks", "at least one task")
        check_deepspeed_section(self.deepspeed)
        _require(self.seq_len >= 2, "seq_len", "must be >= 2")
        _require(self.shuffle_buffer_rows >= 0, "shuffle_buffer_rows", "must be >= 0")
        _require(self.max_eval_rows >= 0, "max_eval_rows", f"must be >= 0 (0: every row), got {self.max_eval_rows}")
        from conure_dist.train.plan import METHODS

        _require(self.method in METHODS, "method", f"one of {sorted(METHODS)}, got {self.method!r}")
        object.__setattr__(self, "tasks", tuple(self.tasks))

    def smoke_settings(self) -> list[str]:
        """The settings that cut training or evaluation short (smoke tests): metrics of such a run
        are not the tasks' own, and its reports say so."""
        out = [f"max_eval_rows={self.max_eval_rows} (validation and test read the first {self.max_eval_rows} rows "
               "of each split)"] if self.max_eval_rows else []
        limited = [f"{t.spec.name}: {t.train.max_steps}" for t in self.tasks if t.train.max_steps]
        if limited:
            out.append(f"max_steps per stage ({', '.join(limited)})")
        return out

    def task(self, name: str) -> TaskPlan:
        for t in self.tasks:
            if t.spec.name == name:
                return t
        raise ConfigError(f"tasks: no task named {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExperimentConfig":
        kwargs = dict(data)
        kwargs["model"] = from_dict(ModelConfig, kwargs["model"])
        kwargs["tasks"] = tuple(from_dict(TaskPlan, t) for t in kwargs["tasks"])
        kwargs["cluster"] = from_dict(ClusterConfig, kwargs.get("cluster", {}))
        return cls(**kwargs)
