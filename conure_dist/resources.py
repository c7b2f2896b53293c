"""Per-worker resource sizing: how much memory one data-parallel worker needs.

A pure function of the model and run shape, so that a job can turn "646K items, f = 256,
ZeRO-2 on 8 workers" into a Ray resource request (``{"CPU", "GPU", "memory"}``) before it
starts training: on an autoscaling cluster a bigger catalogue then brings up bigger or more
nodes instead of failing with out-of-memory half-way through T1.

Example::

    >>> plan = plan_worker(SizingInputs(
    ...     num_items=646_000, embed_dim=256, num_conv_layers=16, kernel_size=3,
    ...     max_label_space=18_000, batch_size=32, seq_len=100, sample_ratio=0.2,
    ...     zero_stage=2, num_workers=4, precision="bf16", use_gpu=True),
    ...     gpu_memory_bytes=24 * 2**30)
    >>> plan.fits, sorted(plan.resources)
    (True, ['CPU', 'GPU', 'memory'])
    >>> print(plan.table())   # what ``--dry-run`` prints  # doctest: +SKIP

The estimate follows what DeepSpeed 0.19 allocates for ZeRO 0/1/2 (read from its
``runtime/zero/stage_1_and_2.py`` and ``runtime/engine.py``); each formula is written out
next to the code that computes it. It is an estimate: it is meant to be within tens of
percent, and to err on the large side. It sizes the NextItNet backbone (the Transformer
option's weights are a few MiB; its embedding and output layer dominate the same way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

MiB = 2**20
GiB = 2**30

PRECISIONS = ("fp32", "bf16")
TASK_KINDS = ("sequence", "item", "class")

# Bytes per element of the module's parameters, gradients and activations. DeepSpeed's bf16
# mode casts the whole module to bf16, so frozen tensors are 2 bytes as well.
LOW_PRECISION_BYTES = {"fp32": 4, "bf16": 2}
FP32_BYTES = 4
ADAM_STATES = 2  # exp_avg and exp_avg_sq, fp32 each: 8 bytes per trainable parameter

# DeepSpeed's default ``zero_optimization.reduce_bucket_size`` (elements). ZeRO-1/2 with
# contiguous_gradients (the default) allocate one bucket of exactly this size on the device;
# ZeRO-0 flattens gradients into buckets of the same default size for the all-reduce.
# (overlap_comm, off by default for ZeRO-1/2, would double the bucket: not modelled.)
DEFAULT_REDUCE_BUCKET_ELEMENTS = 500_000_000

# Activations kept for backward by one conv layer, in units of [batch, seq_len, f]: the
# LayerNorm output, the causally padded conv input (padding of (k-1)*dilation positions is
# ignored: it adds < 20 % to this one tensor at seq_len 100), the conv output and the ReLU
# output. Each residual block (two conv layers) adds its sum: 0.5 per conv layer.
ACTIVATIONS_PER_CONV_LAYER = 4.5
# The embedding lookup output, plus the gradient being propagated and the one being produced
# during backward (the transient working set of autograd).
ACTIVATIONS_OUTSIDE_LAYERS = 3
# LayerNorm keeps its mean and reciprocal std per position, in fp32.
LAYERNORM_STATS_BYTES = 2 * FP32_BYTES
# Copies of the logits matrix alive at the peak of T1's loss (train/losses.py computes it in
# fp32): the masked/concatenated logits, the log-softmax saved for backward, and two gradients
# in backward; in bf16 also the matmul output before ``.float()``. Accidental hits are found by
# a search over the sorted sample and set in place (no [rows, samples] mask).
FP32_LOGIT_COPIES = 4
BOOL_BYTES = 1
# Evaluation ranks against every candidate (eval/evaluate.py): scores in the module dtype, their
# fp32 copy, and one bool comparison (eval/metrics.py keeps one [rows, candidates] bool alive at a
# time); test batches are 4x the train batch.
EVAL_BATCH_FACTOR = 4

# model/freeze.py's FrozenGuard: frozen tensors up to GUARD_LARGE_TENSOR_ELEMENTS keep an exact
# copy (module dtype; masks as bool); larger ones keep two int64 checksums per chunk of
# GUARD_CHUNK_ELEMENTS, streamed through one int64 buffer and its int64 position weights.
# Same values as model/freeze.py (not imported: sizing must not import torch).
GUARD_LARGE_TENSOR_ELEMENTS = 16 * 2**20
GUARD_CHUNK_ELEMENTS = 2**20
GUARD_CHUNK_ELEMENTS_GPU = 8 * 2**20
GUARD_CHECKSUM_BYTES_PER_CHUNK = 2 * 8
GUARD_BUFFER_BYTES_PER_ELEMENT = 2 * 8

# Fixed costs that are not tensors of the model.
GPU_CONTEXT_BYTES = 1 * GiB  # CUDA context, cuBLAS workspaces, NCCL buffers, per process
CPU_PROCESS_BYTES = 1 * GiB  # Python + torch + Ray worker + DeepSpeed + gloo (imports: ~0.4 GiB)
GPU_HOST_PROCESS_BYTES = 2 * GiB  # the same process on a GPU node also maps the CUDA runtime
ALLOCATOR_SLACK = 0.10  # caching-allocator fragmentation, on top of all tensors

DEFAULT_CPUS_PER_GPU_WORKER = 4.0  # input pipeline + NCCL progress threads per GPU process
DEFAULT_CPUS_PER_CPU_WORKER = 1.0


@dataclass(frozen=True)
class SizingInputs:
    """The shape of one training stage, as seen by one data-parallel worker.

    ``batch_size`` is the global batch of the task (``TrainConfig.batch_size``, paper: 32 for
    T1, 512 after); each worker trains on ``ceil(batch_size / num_workers)`` rows per step, as
    the trainer does. ``task_kind`` selects the stage: ``"sequence"`` is
    T1 (embedding, backbone and the output layer all trainable; sampled softmax over
    ``sample_ratio * num_items`` shared negatives); ``"item"`` and ``"class"`` are later
    tasks (only the prunable conv weights, the embedding if ``prune_embedding``, and the
    task's head of ``max_label_space`` outputs are trainable). ``max_label_space`` may be 0
    for a run with T1 only. Every task's head lives in the model from the start:
    ``total_label_space`` is the sum of the item/class heads' sizes (default: the largest).
    """

    num_items: int
    embed_dim: int
    num_conv_layers: int
    kernel_size: int
    max_label_space: int
    batch_size: int
    seq_len: int
    sample_ratio: float
    zero_stage: int
    num_workers: int
    precision: str
    use_gpu: bool
    prune_embedding: bool = False
    task_kind: str = "sequence"
    sampler: str = "log_uniform"  # T1's negative sampler: how many of the draws are distinct
    total_label_space: int | None = None
    reduce_bucket_elements: int = DEFAULT_REDUCE_BUCKET_ELEMENTS

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int) and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"SizingInputs.{f.name} must be an int, got {value!r}")
            if f.type in ("bool", bool) and not isinstance(value, bool):
                raise ValueError(f"SizingInputs.{f.name} must be a bool, got {value!r}")
        _at_least(self, "num_items", 1)
        _at_least(self, "embed_dim", 1)
        _at_least(self, "num_conv_layers", 1)
        _at_least(self, "kernel_size", 1)
        _at_least(self, "max_label_space", 0)
        _at_least(self, "batch_size", 1)
        _at_least(self, "seq_len", 2)  # T1 predicts positions 1..seq_len-1 from their prefix
        _at_least(self, "num_workers", 1)
        _at_least(self, "reduce_bucket_elements", 1)
        if isinstance(self.sample_ratio, bool) or not isinstance(self.sample_ratio, (int, float)):
            raise ValueError(f"SizingInputs.sample_ratio must be a number, got {self.sample_ratio!r}")
        if not 0.0 < self.sample_ratio <= 1.0:
            raise ValueError(f"SizingInputs.sample_ratio must be in (0, 1], got {self.sample_ratio!r}")
        if self.total_label_space is not None:
            if isinstance(self.total_label_space, bool) or not isinstance(self.total_label_space, int):
                raise ValueError(f"SizingInputs.total_label_space must be an int, got {self.total_label_space!r}")
            if self.total_label_space < self.max_label_space:
                raise ValueError(
                    f"SizingInputs.total_label_space ({self.total_label_space}) must be >= "
                    f"max_label_space ({self.max_label_space}): it sums every task head"
                )
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(
                f"SizingInputs.zero_stage must be 0, 1 or 2, got {self.zero_stage!r} "
                "(ZeRO-3 partitions parameters and breaks the per-weight masks)"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"SizingInputs.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.sampler not in ("log_uniform", "uniform"):
            raise ValueError(f"SizingInputs.sampler must be log_uniform or uniform, got {self.sampler!r}")
        if self.task_kind not in TASK_KINDS:
            raise ValueError(f"SizingInputs.task_kind must be one of {TASK_KINDS}, got {self.task_kind!r}")
        if self.task_kind != "sequence" and self.max_label_space < 1:
            raise ValueError(
                f"SizingInputs.max_label_space must be >= 1 for a {self.task_kind!r} task, got "
                f"{self.max_label_space!r}"
            )

    @property
    def num_sampled(self) -> int:
        """Negatives shared by the batch in T1's sampled softmax, as train/losses.py draws them."""
        return max(1, int(round(self.sample_ratio * self.num_items)))

    @property
    def distinct_sampled(self) -> int:
        """Expected distinct items among the draws (the loss scores each distinct item once):
        ``sum_r 1 - (1 - p_r)^n`` over the sampler's probabilities ``p``."""
        import numpy as np

        n, v = self.num_sampled, self.num_items
        if self.sample_ratio >= 1.0:
            return v  # the exact softmax scores every item
        if self.sampler == "uniform":
            return int(math.ceil(v * -math.expm1(n * math.log1p(-1.0 / v)))) if v > 1 else 1
        r = np.arange(v, dtype=np.float64)
        p = (np.log(r + 2) - np.log(r + 1)) / math.log(v + 1)
        return int(math.ceil(float(-np.expm1(n * np.log1p(-p)).sum())))

    @property
    def micro_batch(self) -> int:
        """Rows per worker per step: the trainer splits the global batch across workers."""
        return max(1, math.ceil(self.batch_size / self.num_workers))


def _at_least(inputs: SizingInputs, name: str, low: int) -> None:
    value = getattr(inputs, name)
    if value < low:
        raise ValueError(f"SizingInputs.{name} must be >= {low}, got {value!r}")


@dataclass(frozen=True)
class WorkerPlan:
    """One worker's memory by component and the Ray resource request derived from it.

    ``components`` are bytes on the device that holds the model: GPU memory for a GPU
    worker, RAM for a CPU worker; ``total_bytes`` is their sum. ``host_bytes`` is the RAM
    the worker process needs (the ``"memory"`` request). ``fits`` is None when no device
    size was given, else whether ``total_bytes`` fits in it; ``recommendation`` says what
    to change when it does not.
    """

    inputs: SizingInputs
    components: dict[str, int]
    total_bytes: int
    host_bytes: int
    resources: dict[str, float]
    fits: bool | None = None
    device_bytes_available: int | None = None
    recommendation: str | None = None
    params: dict[str, int] = field(default_factory=dict)

    def table(self) -> str:
        """A per-component table in MiB/GiB, printed by the jobs' ``--dry-run``."""
        i = self.inputs
        where = "GPU memory" if i.use_gpu else "RAM"
        lines = [
            f"worker plan: {i.task_kind} stage, {i.num_items:,} items, f={i.embed_dim}, "
            f"{i.num_conv_layers} conv layers (k={i.kernel_size}), largest head {i.max_label_space:,}",
            f"  batch {i.batch_size} ({i.micro_batch} per worker) x seq {i.seq_len}, "
            + (f"sampled softmax {i.num_sampled:,} draws (~{i.distinct_sampled:,} distinct), "
               if i.task_kind == "sequence" else "")
            + f"ZeRO-{i.zero_stage} on {i.num_workers} worker(s), {i.precision}, "
            f"{'GPU' if i.use_gpu else 'CPU'}"
            + (", embedding prunable" if i.prune_embedding else ""),
            f"  parameters: {self.params.get('total', 0):,} total, "
            f"{self.params.get('trainable', 0):,} trainable in this stage",
            "",
            f"  {'component (' + where + ')':<34}{'MiB':>12}{'GiB':>10}",
        ]
        for name, value in self.components.items():
            lines.append(f"  {name:<34}{value / MiB:>12,.1f}{value / GiB:>10.2f}")
        lines.append(f"  {'total':<34}{self.total_bytes / MiB:>12,.1f}{self.total_bytes / GiB:>10.2f}")
        lines.append("")
        request = ", ".join(
            f'"{k}": {_format_resource(k, v)}' for k, v in self.resources.items()
        )
        lines.append(f"  Ray resources per worker: {{{request}}}")
        if self.fits is not None:
            avail = self.device_bytes_available or 0
            verdict = "fits" if self.fits else "DOES NOT FIT"
            lines.append(f"  {verdict} in {avail / GiB:.1f} GiB of GPU memory")
        if self.recommendation:
            lines.append(f"  recommendation: {self.recommendation}")
        return "\n".join(lines)


def _format_resource(name: str, value: float) -> str:
    if name == "memory":
        return f"{int(value)} ({value / GiB:.2f} GiB)"
    return f"{value:g}"


def _param_counts(i: SizingInputs) -> dict[str, int]:
    """Parameter counts by tensor group (elements)."""
    f, n1 = i.embed_dim, i.num_items + 1  # row 0 is padding
    conv_weight = i.num_conv_layers * f * f * i.kernel_size
    return {
        "embedding": n1 * f,
        "output_layer": n1 * f + n1,  # output embedding + per-item bias
        "conv_weight": conv_weight,  # the prunable backbone weights
        # conv biases and the LayerNorm (scale, shift) before each conv layer
        "backbone_other": i.num_conv_layers * (f + 2 * f),
        # dense f -> |Y| with bias, one per item/class task; all exist from the start
        "heads": _heads(i) * (f + 1),
        "largest_head": i.max_label_space * (f + 1),
    }


def _heads(i: SizingInputs) -> int:
    return i.total_label_space if i.total_label_space is not None else i.max_label_space


def _trainable(i: SizingInputs, p: dict[str, int]) -> tuple[int, int]:
    """(trainable elements, largest trainable tensor) in this stage.

    T1 trains everything it has. Later tasks train only tensors that still have free
    entries (the conv weights, the embedding when it is prunable) and their own head;
    the embedding, output layer, biases and LayerNorms are frozen with requires_grad=False,
    so DeepSpeed gives them neither gradients nor optimizer state. (Masked entries of a
    trainable tensor still cost the whole tensor: DeepSpeed flattens whole tensors.)
    """
    f = i.embed_dim
    conv_layer = f * f * i.kernel_size
    if i.task_kind == "sequence":
        trainable = p["embedding"] + p["output_layer"] + p["conv_weight"] + p["backbone_other"]
        return trainable, max(p["embedding"], conv_layer)
    embedding = p["embedding"] if i.prune_embedding else 0
    return p["conv_weight"] + p["largest_head"] + embedding, max(conv_layer, i.max_label_space * f, embedding)


def _guard_bytes(i: SizingInputs, p: dict[str, int], lp: int) -> int:
    """What the FrozenGuard holds for this stage: a copy of each small frozen tensor, checksums
    of the large ones.

    Watched: every parameter with requires_grad=False, and each masked prunable weight's
    frozen values and bool mask (the conv weights in every stage of a run with an owner map;
    the embedding when it is prunable). T1 freezes only the item/class heads. Later tasks also
    freeze the embedding (unless prunable), the T1 output layer, the conv biases and
    LayerNorms, and every head but their own; heads are all counted as copies (each is at most
    ``max_label_space`` x f, below the threshold for any catalogue in the paper; above it the
    estimate errs large).
    """
    f, n1 = i.embed_dim, i.num_items + 1
    conv_layer = f * f * i.kernel_size
    # (elements of one tensor, bytes per element, how many such tensors)
    tensors = [(conv_layer, lp, i.num_conv_layers), (conv_layer, BOOL_BYTES, i.num_conv_layers)]
    if i.prune_embedding:
        tensors += [(n1 * f, lp, 1), (n1 * f, BOOL_BYTES, 1)]
    if i.task_kind == "sequence":
        frozen_heads = p["heads"]
    else:
        frozen_heads = p["heads"] - p["largest_head"]
        if not i.prune_embedding:
            tensors.append((n1 * f, lp, 1))
        tensors += [(n1 * f, lp, 1), (n1, lp, 1)]  # T1 output layer: weight and bias
        tensors.append((f, lp, 3 * i.num_conv_layers))  # conv bias, LayerNorm scale and shift
    total = frozen_heads * lp
    largest_summed = 0
    chunk = GUARD_CHUNK_ELEMENTS_GPU if i.use_gpu else GUARD_CHUNK_ELEMENTS
    for numel, size, count in tensors:
        if numel > GUARD_LARGE_TENSOR_ELEMENTS:
            total += count * math.ceil(numel / chunk) * GUARD_CHECKSUM_BYTES_PER_CHUNK
            largest_summed = max(largest_summed, numel)
        else:
            total += count * numel * size
    return total + min(largest_summed, chunk) * GUARD_BUFFER_BYTES_PER_ELEMENT


def _device_components(i: SizingInputs) -> tuple[dict[str, int], dict[str, int]]:
    p = _param_counts(i)
    lp = LOW_PRECISION_BYTES[i.precision]  # bytes per module param / grad / activation
    n = i.num_workers
    trainable, largest = _trainable(i, p)
    shard = math.ceil(trainable / n)  # ZeRO partitions flat buffers evenly (padding ignored)

    c: dict[str, int] = {}
    # Module parameters, replicated on every worker under ZeRO 0/1/2, all in `lp` bytes.
    c["embedding"] = p["embedding"] * lp
    c["output_layer"] = p["output_layer"] * lp
    c["backbone"] = (p["conv_weight"] + p["backbone_other"]) * lp
    c["heads"] = p["heads"] * lp

    # model/masked.py: every conv weight and the embedding carry a frozen-value buffer (module
    # dtype) and a bool trainable mask, whether or not the embedding is prunable. A prunable
    # weight also has its owner-map entry (uint8) and, while masked, the effective weight
    # where(trainable, weight, frozen) that the forward pass builds (module dtype; the conv
    # keeps it for backward).
    buffered = p["conv_weight"] + p["embedding"]
    prunable = p["conv_weight"] + (p["embedding"] if i.prune_embedding else 0)
    c["owner_map_and_masks"] = buffered * (lp + BOOL_BYTES) + prunable * (1 + lp)

    c["frozen_guard_copies"] = _guard_bytes(i, p, lp)

    # Gradients in the module dtype. ZeRO-0 and ZeRO-1 keep every trainable gradient on
    # every worker. ZeRO-2 keeps only this worker's 1/n partition; during backward each
    # gradient is copied into the reduction bucket as soon as it is produced (counted there).
    if i.zero_stage < 2:
        c["gradients"] = trainable * lp
    else:
        c["gradients"] = shard * lp

    # fp32 master weights and the fp32 gradient the optimizer steps on.
    #   bf16, ZeRO-0: DeepSpeed's bf16 wrapper keeps a full fp32 copy of the trainable
    #                 weights and of their gradients (4 + 4 bytes per trainable param).
    #   ZeRO-1/2:     one fp32 copy of this worker's partition of weights and of gradients;
    #                 DeepSpeed clones the partition even when the model is fp32.
    #   fp32, ZeRO-0: the optimizer steps on the module's own weights: no copy.
    if i.zero_stage == 0:
        master = trainable if i.precision == "bf16" else 0
    else:
        master = shard
    c["master_weights_fp32"] = master * FP32_BYTES
    c["master_gradients_fp32"] = master * FP32_BYTES

    # Adam: two fp32 states per trainable parameter, sharded by ZeRO-1 and ZeRO-2.
    c["optimizer_state"] = (trainable if i.zero_stage == 0 else shard) * ADAM_STATES * FP32_BYTES

    # Reduction buffers. ZeRO-1/2 (contiguous_gradients, the default) allocate one bucket of
    # exactly reduce_bucket_size elements on a GPU; on a CPU only the pages written are
    # resident: at most the trainable gradients. ZeRO-0 flattens up to one bucket of
    # gradients for the all-reduce, and only when there is more than one worker.
    if i.zero_stage == 0:
        bucket = min(trainable, i.reduce_bucket_elements) if n > 1 else 0
    elif i.use_gpu:
        bucket = i.reduce_bucket_elements
    else:
        bucket = min(trainable, i.reduce_bucket_elements)
    c["reduce_bucket"] = bucket * lp

    # Activations of the backbone for one micro-batch (see the constants above).
    positions = i.micro_batch * i.seq_len
    units = ACTIVATIONS_PER_CONV_LAYER * i.num_conv_layers + ACTIVATIONS_OUTSIDE_LAYERS
    c["activations"] = int(positions * i.embed_dim * units * lp) + (
        positions * i.num_conv_layers * LAYERNORM_STATS_BYTES
    )

    # Logits. T1: [batch * (seq_len - 1), distinct sampled items] (negatives shared by the
    # batch, each distinct item scored once), plus the gathered output rows of the sampled
    # items and of the targets, each with its gradient. Later tasks: [batch, |Y|] (an upper
    # bound for BPR, which scores fewer).
    logit_bytes = FP32_LOGIT_COPIES * FP32_BYTES + (lp if i.precision == "bf16" else 0)
    if i.task_kind == "sequence":
        rows = i.micro_batch * (i.seq_len - 1)
        gathered = (i.distinct_sampled + rows) * i.embed_dim * lp * 2
        c["sampled_softmax_logits"] = rows * i.distinct_sampled * logit_bytes + gathered
    else:
        c["head_logits"] = i.micro_batch * i.max_label_space * logit_bytes

    # Full-ranking evaluation runs with the model (and, for validation, the optimizer) in
    # memory but without the training step's activations and logits: only what it needs
    # beyond them is added. Test batches are EVAL_BATCH_FACTOR x the global batch per worker.
    candidates = i.num_items + 1 if i.task_kind == "sequence" else i.max_label_space
    eval_scores = EVAL_BATCH_FACTOR * i.batch_size * candidates * (lp + FP32_BYTES + BOOL_BYTES)
    train_transient = c["activations"] + c.get("sampled_softmax_logits", 0) + c.get("head_logits", 0)
    c["evaluation_headroom"] = max(0, eval_scores - train_transient)

    # Not everything above is alive at once. A step has two phases, and the peak is the larger:
    #   backward:  the activations and logits (plus, under ZeRO-1/2, the reduction bucket the
    #              gradients are copied into as backward produces them);
    #   after it:  ZeRO-0 flattens the gradients into the all-reduce bucket; ZeRO-1/2 step on
    #              the gradient partition (ZeRO-2) and its flat fp32 copy.
    # The smaller phase is freed before the larger one peaks (measured per worker on a T1
    # stage at 646K items, fp32, 2 workers: 7.82 GiB under ZeRO-0 and 7.22 GiB under ZeRO-2,
    # against 10.2 GiB planned when every row was summed; BENCHMARKS.md).
    if i.zero_stage > 0:
        # Each gradient exists in full until it is copied into the bucket. The largest (T1: the
        # embedding's, produced last in backward, once the logits are freed) counts where it
        # outgrows the activations and logits.
        c["largest_gradient_in_full"] = max(0, largest * lp - train_transient)
    backward = train_transient + (c["reduce_bucket"] + c["largest_gradient_in_full"] if i.zero_stage > 0 else 0)
    after = c["reduce_bucket"] if i.zero_stage == 0 else (
        c["master_gradients_fp32"] + (c["gradients"] if i.zero_stage == 2 else 0))
    c["freed_before_the_peak"] = -min(backward, after)

    tensors = sum(c.values())
    fixed = GPU_CONTEXT_BYTES if i.use_gpu else CPU_PROCESS_BYTES
    c["framework_overhead"] = fixed + int(ALLOCATOR_SLACK * tensors)

    counts = {"total": sum(v for k, v in p.items() if k != "largest_head"), "trainable": trainable}
    return c, counts


def _host_bytes(i: SizingInputs, c: dict[str, int]) -> int:
    """RAM of the worker process (the ``"memory"`` request).

    Saving or loading a checkpoint stages this worker's model and optimizer partition in
    host memory (torch.save / torch.load with map_location="cpu"). A CPU worker needs that
    on top of everything it holds; a GPU worker needs it on top of its process.
    """
    staging = sum(
        c[k]
        for k in (
            "embedding", "output_layer", "backbone", "heads",
            "master_weights_fp32", "optimizer_state",
        )
    )
    if i.use_gpu:
        return GPU_HOST_PROCESS_BYTES + staging
    return sum(c.values()) + staging


def plan_worker(
    inputs: SizingInputs,
    *,
    gpu_memory_bytes: int | None = None,
    cpus_per_worker: float | None = None,
    gpus_per_worker: float = 1.0,
) -> WorkerPlan:
    """Memory by component and the Ray resource request for one worker of one stage.

    ``gpu_memory_bytes`` (per GPU) enables the ``fits`` check; a worker with a fraction
    of a GPU gets that fraction of its memory. ``cpus_per_worker`` defaults to 4 for GPU
    workers and 1 for CPU workers. One DeepSpeed data-parallel process drives one GPU, so
    ``gpus_per_worker`` is at most 1: for more GPUs, use more workers.
    """
    if isinstance(cpus_per_worker, bool) or (
        cpus_per_worker is not None and not (isinstance(cpus_per_worker, (int, float)) and cpus_per_worker > 0)
    ):
        raise ValueError(f"cpus_per_worker must be a number > 0, got {cpus_per_worker!r}")
    if inputs.use_gpu and not (isinstance(gpus_per_worker, (int, float)) and 0 < gpus_per_worker <= 1):
        raise ValueError(
            f"gpus_per_worker must be in (0, 1] (one DeepSpeed process drives one GPU; use "
            f"more workers for more GPUs), got {gpus_per_worker!r}"
        )
    if gpu_memory_bytes is not None and (
        isinstance(gpu_memory_bytes, bool) or not isinstance(gpu_memory_bytes, int) or gpu_memory_bytes <= 0
    ):
        raise ValueError(f"gpu_memory_bytes must be a positive int, got {gpu_memory_bytes!r}")

    components, counts = _device_components(inputs)
    total = sum(components.values())
    host = _host_bytes(inputs, components)
    host = math.ceil(host / MiB) * MiB  # whole MiB: easier to read, never smaller

    if cpus_per_worker is None:
        cpus_per_worker = DEFAULT_CPUS_PER_GPU_WORKER if inputs.use_gpu else DEFAULT_CPUS_PER_CPU_WORKER
    resources: dict[str, float] = {"CPU": float(cpus_per_worker)}
    if inputs.use_gpu:
        resources["GPU"] = float(gpus_per_worker)
    resources["memory"] = float(host)

    fits = available = recommendation = None
    if inputs.use_gpu and gpu_memory_bytes is not None:
        available = int(gpu_memory_bytes * gpus_per_worker)
        fits = total <= available
        if not fits:
            recommendation = _recommend(inputs, available)
    return WorkerPlan(
        inputs=inputs,
        components=components,
        total_bytes=total,
        host_bytes=host,
        resources=resources,
        fits=fits,
        device_bytes_available=available,
        recommendation=recommendation,
        params=counts,
    )


def _recommend(inputs: SizingInputs, available: int) -> str:
    """The smallest change of ZeRO stage and worker count that fits, or what else to cut."""
    for stage in range(max(inputs.zero_stage, 1), 3):
        workers = inputs.num_workers
        while workers <= 1024:
            candidate = replace(inputs, zero_stage=stage, num_workers=workers)
            if sum(_device_components(candidate)[0].values()) <= available:
                return (
                    f"needs {_gib(inputs)} but {available / GiB:.1f} GiB is available: use "
                    f"--zero-stage {stage} --workers {workers}"
                )
            workers *= 2
    return (
        f"needs {_gib(inputs)} but {available / GiB:.1f} GiB is available, and no ZeRO stage "
        "or worker count fixes it (parameters, activations and logits are replicated): lower "
        "the batch size, sequence length or sample ratio, or use GPUs with more memory"
    )


def _gib(inputs: SizingInputs) -> str:
    return f"{sum(_device_components(inputs)[0].values()) / GiB:.1f} GiB"


def plan_run(
    inputs: SizingInputs,
    *,
    later_batch_size: int | None = None,
    gpu_memory_bytes: int | None = None,
    cpus_per_worker: float | None = None,
    gpus_per_worker: float = 1.0,
) -> WorkerPlan:
    """The plan of the run's largest stage: T1 at ``inputs.batch_size``, or a later task at
    ``later_batch_size`` (paper: 32 and 512). One request for every stage keeps the cluster
    shape stable between stages.
    """
    kw = dict(gpu_memory_bytes=gpu_memory_bytes, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker)
    plans = [plan_worker(replace(inputs, task_kind="sequence"), **kw)]
    if inputs.max_label_space > 0:
        later = replace(
            inputs,
            task_kind="item",
            batch_size=later_batch_size if later_batch_size is not None else inputs.batch_size,
        )
        plans.append(plan_worker(later, **kw))
    return max(plans, key=lambda plan: (plan.total_bytes, plan.host_bytes))
