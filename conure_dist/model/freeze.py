"""The frozen guarantee: what a stage must not change, checked twice.

1. Inside a stage, :class:`FrozenGuard` snapshots every tensor the stage must not change
   (frozen parameters, and the frozen values and masks of prunable weights) and, after each
   optimizer step, verifies them (bit for bit, or by chunk checksums for very large tensors);
   a changed entry raises :class:`FrozenWeightsChanged`.
2. Between stages, :func:`merge_stage_weights` takes from a stage's output only the entries
   that the stage was allowed to train; every other entry comes from the committed weights.
   It also verifies that the stage reported the frozen entries unchanged (in the precision the
   stage ran in) and refuses the result otherwise.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from conure_dist.model.owner_map import OwnerMap, Stage

Weights = dict[str, torch.Tensor]


class FrozenWeightsChanged(RuntimeError):
    """A stage's output differs from the committed weights where it had to be unchanged."""


# Tensors with more elements than this are checked by checksum instead of a full copy: at TTL
# scale (646K items x f = 256) the frozen embedding and T1 output layer are 165M elements each,
# 0.66 GB (fp32) per copy per worker. Everything below (conv weights' frozen values and masks,
# biases, LayerNorms, other tasks' heads) keeps an exact copy. resources.py mirrors this value.
LARGE_TENSOR_ELEMENTS = 16 * 2**20
# Elements per checksum chunk: the unit a mismatch is reported in, and the size of the int64
# working buffer (8 MiB) the checksum streams through, so no full-size temporary is made.
CHECKSUM_CHUNK_ELEMENTS = 2**20
# On a GPU the chunk loop is bound by kernel launches (measured on an H200: 9.2 ms per check of
# a 646K x 256 table at 1 Mi elements per chunk), so chunks are 8x larger there (64 MiB buffer).
CHECKSUM_CHUNK_ELEMENTS_CUDA = 8 * 2**20

# Integer dtype of the same width, to read a tensor's raw bits (NaN-safe, -0.0 != 0.0).
_BITS_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_MAX_REPORTED = 10


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS_DTYPE[t.element_size()])


class _ChunkChecksum:
    """Per-chunk (sum, position-weighted sum) of a tensor's raw bits, in int64.

    Arithmetic is modulo 2**64 (int64 wraps), which the guarantees below survive. A single
    changed entry changes its bits by d with 0 < |d| < 2**64, so the plain sum changes. Two
    changed entries that cancel in the plain sum (d and -d at positions i != j of one chunk,
    widths up to 4 bytes) change the weighted sum by d * (i - j), nonzero because |d| < 2**32
    and |i - j| < chunk <= 2**31. More changes could in principle cancel out; an engine that
    corrupts frozen weights is not adversarial, and 16 bytes per chunk is what buys the memory.
    """

    def __init__(self, tensor: torch.Tensor, chunk: int, buffers: "_Buffers"):
        if not 0 < chunk <= 2**31:
            raise ValueError(f"chunk must be in (0, 2**31], got {chunk}")
        self.chunk = chunk
        self.numel = tensor.numel()
        self._buffers = buffers
        self.table = self.compute(tensor)

    def compute(self, tensor: torch.Tensor) -> torch.Tensor:
        flat = _bits(tensor.detach()).reshape(-1)
        n, chunk = flat.numel(), self.chunk
        count = -(-n // chunk)
        table = torch.empty((count, 2), dtype=torch.int64, device=flat.device)
        work, weights = self._buffers.get(flat.device, min(chunk, n))
        for k in range(count):
            part = flat[k * chunk:(k + 1) * chunk]
            w = work[: part.numel()]
            w.copy_(part)
            table[k, 0] = w.sum()
            w.mul_(weights[: part.numel()])
            table[k, 1] = w.sum()
        return table

    def changed_chunks(self, tensor: torch.Tensor) -> list[int]:
        now = self.compute(tensor)
        if torch.equal(now, self.table):
            return []
        return (now != self.table).any(dim=1).nonzero().flatten().tolist()

    def entries(self, k: int) -> str:
        return f"{k * self.chunk:,}..{min((k + 1) * self.chunk, self.numel) - 1:,}"

    @property
    def nbytes(self) -> int:
        return self.table.numel() * self.table.element_size()


class _Buffers:
    """One int64 working buffer and its position weights per device, reused by every check
    (16 MiB at the default chunk) instead of a full-size temporary per tensor."""

    def __init__(self) -> None:
        self._by_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, device: torch.device, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        have = self._by_device.get(device)
        if have is None or have[0].numel() < size:
            work = torch.empty(size, dtype=torch.int64, device=device)
            have = (work, torch.arange(1, size + 1, dtype=torch.int64, device=device))
            self._by_device[device] = have
        return have

    @property
    def nbytes(self) -> int:
        return sum(2 * w.numel() * w.element_size() for w, _ in self._by_device.values())


class FrozenGuard:
    """Snapshot of every tensor a stage must not change; :meth:`check` after each step.

    A change is the engine breaking the frozen contract (an optimizer, ZeRO partitioning or a
    dtype cast reaching a tensor it must not touch). Restoring the entry would hide that and
    leave optimizer state and other workers inconsistent, so :meth:`check` raises
    :class:`FrozenWeightsChanged` instead. ``context`` (e.g. ``"task clicks, train stage"``)
    is put into the error message.

    Tensors up to ``large_tensor_elements`` (default :data:`LARGE_TENSOR_ELEMENTS`) keep an
    exact copy and are compared bit for bit; larger ones keep checksums of chunks of
    ``chunk_elements`` (default :data:`CHECKSUM_CHUNK_ELEMENTS`), see :class:`_ChunkChecksum`.
    """

    def __init__(
        self,
        model: nn.Module,
        context: str | None = None,
        *,
        large_tensor_elements: int | None = None,
        chunk_elements: int | None = None,
    ):
        from conure_dist.model.masked import PrunableWeight

        watched: dict[str, torch.Tensor] = {
            name: p for name, p in model.named_parameters() if not p.requires_grad
        }
        for name, module in model.named_modules():
            if isinstance(module, PrunableWeight) and module.masked:
                watched[f"{name}.weight_frozen"] = module.weight_frozen
                watched[f"{name}.weight_trainable"] = module.weight_trainable
        # read at call time, so that a test or a job can lower the module constants
        large = LARGE_TENSOR_ELEMENTS if large_tensor_elements is None else large_tensor_elements
        chunk_cuda = CHECKSUM_CHUNK_ELEMENTS_CUDA if chunk_elements is None else chunk_elements
        chunk = CHECKSUM_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
        self.context = context
        self._watched = watched
        self._copies: dict[str, torch.Tensor] = {}
        self._checksums: dict[str, _ChunkChecksum] = {}
        self._buffers = _Buffers()
        self._layout = {name: (t.dtype, tuple(t.shape)) for name, t in watched.items()}
        with torch.no_grad():
            for name, t in watched.items():
                # a non-contiguous view would need a full-size flattened temporary per check
                if t.numel() > large and t.is_contiguous():
                    self._checksums[name] = _ChunkChecksum(t, chunk_cuda if t.is_cuda else chunk, self._buffers)
                else:
                    self._copies[name] = t.detach().clone()

    @property
    def snapshot_bytes(self) -> int:
        """Memory the guard holds: exact copies, checksum tables and the checksum buffers."""
        copies = sum(t.numel() * t.element_size() for t in self._copies.values())
        return copies + sum(c.nbytes for c in self._checksums.values()) + self._buffers.nbytes

    @property
    def checksummed(self) -> list[str]:
        return sorted(self._checksums)

    def check(self) -> int:
        """Raise :class:`FrozenWeightsChanged` if any watched tensor changed; else return 0.

        Returns an int so that callers may keep adding it to a counter of changed entries.
        """
        problems: list[str] = []
        with torch.no_grad():
            for name, tensor in self._watched.items():
                layout = (tensor.dtype, tuple(tensor.shape))
                if layout != self._layout[name]:
                    problems.append(f"{name}: dtype/shape changed from {self._layout[name]} to {layout}")
                    continue
                if name in self._copies:
                    old, new = _bits(self._copies[name]), _bits(tensor)
                    if not torch.equal(new, old):
                        changed = int(new.ne(old).sum())
                        problems.append(f"{name}: {changed:,} of {tensor.numel():,} entries changed")
                    continue
                checksum = self._checksums[name]
                chunks = checksum.changed_chunks(tensor)
                if chunks:
                    shown = ", ".join(f"{k} (entries {checksum.entries(k)})" for k in chunks[:_MAX_REPORTED])
                    more = f" and {len(chunks) - _MAX_REPORTED} more" if len(chunks) > _MAX_REPORTED else ""
                    problems.append(
                        f"{name}: checksum of chunk(s) {shown}{more} changed (number of changed "
                        "entries unknown: the tensor is checked by checksum, not kept as a copy)"
                    )
        if problems:
            where = f" ({self.context})" if self.context else ""
            more = f"; and {len(problems) - _MAX_REPORTED} more tensors" if len(problems) > _MAX_REPORTED else ""
            raise FrozenWeightsChanged(
                f"frozen weights changed after an optimizer step{where}: {len(problems)} tensor(s): "
                + "; ".join(problems[:_MAX_REPORTED]) + more
            )
        return 0


# What a task after T1 trains (``scope``), besides what its owner map view allows:
#   all      the backbone (masked by the owner map when there is one) and the task's head
#   head     only the task's head (FineSmax: the backbone is a fixed feature extractor)
#   patches  only the task's patches and head (PeterRec)
#   joint    the whole backbone, the task's head and T1's head (MTL: T1's objective trains too)
SCOPES = ("all", "head", "patches", "joint")


def stage_trainable(
    name: str, owners: OwnerMap | None, task: str, number: int, stage: Stage, scope: str = "all",
    first: str | None = None,
) -> bool | torch.Tensor:
    """Which entries of parameter ``name`` task ``task`` (number ``number``) may change.

    A bool for whole tensors, a bool tensor for prunable ones. ``owners=None`` means no masks
    (naive fine-tuning): the whole backbone trains in every task. ``scope`` (see
    :data:`SCOPES`) narrows or widens what a task after T1 trains; ``first`` names T1 (for
    ``joint``).
    """
    stage = Stage(stage)
    if scope not in SCOPES:
        raise ValueError(f"scope: one of {SCOPES}, got {scope!r}")
    training = stage is not Stage.SERVE
    if name.startswith("patches."):
        return training and scope == "patches" and name.split(".")[1] == task
    if name.startswith("heads."):
        head = name.split(".")[1]
        return training and (head == task or (scope == "joint" and head == first))
    if number > 1 and scope in ("head", "patches"):
        return False
    if owners is not None and name in owners.names:
        return owners.trainable(name, number, stage)
    return training and (number == 1 or owners is None)


def merge_stage_weights(
    committed: Mapping[str, torch.Tensor],
    trained: Mapping[str, torch.Tensor],
    owners: OwnerMap | None,
    task: str,
    number: int,
    stage: Stage,
    *,
    compute_dtype: torch.dtype = torch.float32,
    scope: str = "all",
    first: str | None = None,
) -> Weights:
    """Committed weights with the entries the stage trained replaced by the stage's values.

    ``compute_dtype`` is the precision the stage ran in (bf16 stages hold frozen values in
    bf16): frozen entries must come back equal to the committed ones in that precision.
    """
    merged: Weights = {}
    problems: list[str] = []
    for name in sorted(set(committed) | set(trained)):
        if name not in trained:
            merged[name] = committed[name]
            continue
        new = trained[name].detach().float().cpu()
        trainable = stage_trainable(name, owners, task, number, stage, scope, first)
        if name not in committed:
            if trainable is not True:
                problems.append(f"{name}: reported by the stage but neither trainable nor committed")
            merged[name] = new
            continue
        old = committed[name]
        if trainable is True:
            merged[name] = new
            continue
        if trainable is False:
            frozen = torch.ones_like(old, dtype=torch.bool)
        else:
            frozen = owners.used(name, number, stage) & ~trainable  # type: ignore[union-attr]
        expected = old.to(compute_dtype).float()
        bad = int((frozen & new.ne(expected)).sum())
        if bad:
            problems.append(f"{name}: {bad} frozen entries changed")
        merged[name] = old.clone() if trainable is False else torch.where(trainable, new, old)
    if problems:
        raise FrozenWeightsChanged(
            f"stage {stage.value} of task {task!r} changed frozen weights: " + "; ".join(problems[:10])
        )
    return merged
