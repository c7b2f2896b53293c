"""Task losses: sampled softmax (T1), BPR with popularity negatives (item), cross-entropy (class).

A batch is a dict of int64 tensors: ``seq`` [B, L] left-padded item ids, ``label`` [B] for
item/class tasks. Padding rows (``label == -1``, or no item pairs) contribute nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from conure_dist.config import L2_SCOPES, TaskSpec, TrainConfig
from conure_dist.model import ConureModel
from conure_dist.model.backbones import CausalTransformer
from conure_dist.model.heads import ItemScorer
from conure_dist.model.masked import ItemEmbedding
from conure_dist.train.samplers import NegativeSampler, lambdafm_sampler, log_uniform_sampler, uniform_sampler

Batch = Mapping[str, torch.Tensor]
# Never under L2: normalisation gains and biases (shrinking them only distorts the scale the
# next layer sees) and item-vocabulary tables (a whole-table penalty every step would shrink
# rows the batch never saw).
L2_EXCLUDED_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, ItemEmbedding)
# Embedding tables held as bare parameters of a larger module (by that module's type).
L2_EXCLUDED_TABLES: dict[type, tuple[str, ...]] = {CausalTransformer: ("position",)}


class TaskLoss(Protocol):
    def __call__(self, model: ConureModel, batch: Batch, generator: torch.Generator) -> torch.Tensor: ...


def sampled_softmax_loss(
    h: torch.Tensor,
    targets: torch.Tensor,
    scorer: ItemScorer,
    sampled: torch.Tensor,
    log_q_sampled: torch.Tensor,
    log_q_targets: torch.Tensor,
) -> torch.Tensor:
    """Softmax cross-entropy of each target against negatives shared by the batch.

    Logits are corrected by ``-log Q`` (expected count of each id in the sample) and a
    sampled id equal to the row's own target is removed (an accidental hit). The loss is
    ``logsumexp([true, sampled]) - true``, without concatenating the logits. The hits are
    found by searching the targets among the sorted sample, no ``[rows, samples]`` comparison
    mask. In fp32 the sampled logits' log-sum-exp is :class:`SharedLogSumExp` (one buffer,
    no extra passes over it); in lower precision, the logits in fp32 with the hits set to
    ``-inf`` in place, then ``torch.logsumexp``.
    """
    # The targets' and the sample's rows in one gather: one dense gradient of the whole item
    # table in backward (646K x 256 at TTL size, a zero fill and a scatter), not two and a sum.
    n = targets.numel()
    ids = torch.cat([targets, sampled])
    weight, bias = scorer.weight[ids], scorer.bias[ids]
    true_logit = scorer.score_rows(h, weight[:n], bias[:n]).float() - log_q_targets
    rows, cols = accidental_hits(sampled, targets)
    if h.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled(h.device.type):
        lse = SharedLogSumExp.apply(h, weight[n:], bias[n:] - log_q_sampled, rows, cols)
    else:
        logits = scorer.score_rows_shared(h, weight[n:], bias[n:], shift=-log_q_sampled)
        logits[rows, cols] = float("-inf")
        lse = torch.logsumexp(logits, dim=1)
    return (torch.logaddexp(true_logit, lse) - true_logit).mean()


class SharedLogSumExp(torch.autograd.Function):
    """``logsumexp`` of each row of ``h @ w.T + b`` [N, S] with the entries ``(rows[i], cols[i])``
    left out, in fp32, over one [N, S] buffer: it holds the logits, then (in place) the softmax
    that backward needs, then (in place) the logits' gradient. Autograd's ``addmm``,
    ``index_put_`` and ``logsumexp`` allocate and pass over that size four more times (the
    hits' gradient is a copy; the shift by the row maximum, the exponential and the product
    with the incoming gradient each a new buffer), the largest tensors of a T1 step at 646K items
    (``[3,168 x 44,364]``, 0.56 GB in fp32). Backward can be taken once (its buffer is used up)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, rows: torch.Tensor,
                cols: torch.Tensor) -> torch.Tensor:
        p = torch.addmm(b, h, w.t())  # S >= 1 here: a sample is never empty (SequenceLoss draws >= 1)
        p[rows, cols] = float("-inf")
        # A row of hits only is all -inf: a finite maximum keeps it at exp(-inf) = 0, lse -inf.
        m = p.amax(dim=1, keepdim=True).clamp_min(torch.finfo(p.dtype).min)
        p.sub_(m).exp_()
        s = p.sum(dim=1, keepdim=True)
        p.div_(s.clamp_min(torch.finfo(p.dtype).tiny))
        ctx.save_for_backward(h, w, p)
        ctx.used = False
        return (m + s.log()).squeeze(1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        if ctx.used:
            raise RuntimeError("SharedLogSumExp: backward through the same graph twice (its buffer is used up)")
        ctx.used = True
        h, w, p = ctx.saved_tensors
        g = p.mul_(grad[:, None])  # d lse / d logits = softmax (0 at the hits)
        grad_h = g @ w if ctx.needs_input_grad[0] else None
        grad_w = g.t() @ h if ctx.needs_input_grad[1] else None
        grad_b = g.sum(dim=0) if ctx.needs_input_grad[2] else None
        return grad_h, grad_w, grad_b, None, None


def accidental_hits(sampled: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ``(row, column)`` with ``sampled[column] == targets[row]`` (repeated ids included)."""
    ordered, order = torch.sort(sampled)
    left = torch.searchsorted(ordered, targets, side="left")
    counts = torch.searchsorted(ordered, targets, side="right") - left
    rows = torch.repeat_interleave(torch.arange(targets.numel(), device=targets.device), counts)
    starts = torch.cumsum(counts, 0) - counts  # where each row's hits begin in ``rows``
    within = torch.arange(rows.numel(), device=targets.device) - starts[rows]
    return rows, order[left[rows] + within]


def full_softmax_loss(h: torch.Tensor, targets: torch.Tensor, scorer: ItemScorer) -> torch.Tensor:
    """Exact softmax over items 1..V (id 0 is padding, never a class)."""
    logits = scorer(h).float()
    logits[:, 0] = float("-inf")
    return F.cross_entropy(logits, targets)


def next_item_pairs(model: ConureModel, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states and next-item targets of every position that has an item and a successor."""
    inputs, targets = seq[:, :-1], seq[:, 1:]
    hidden = model.hidden(inputs)
    valid = (inputs != 0) & (targets != 0)
    return hidden[valid], targets[valid]


@dataclass
class SequenceLoss:
    """T1: next-item prediction with sampled softmax (``sampler=None``: the exact softmax).

    The ``num_sampled`` draws (with replacement) are scored as distinct ids, an id drawn ``c``
    times taking ``+ log c`` on its logit: the same softmax as one column per draw
    (``exp(l + log c) = c exp(l)``), with a third to a half of the columns at 646K items and a
    20 % sample (BENCHMARKS.md)."""

    task: str
    sampler: NegativeSampler | None
    num_sampled: int

    def __call__(self, model: ConureModel, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        h, targets = next_item_pairs(model, batch["seq"])
        scorer = model.heads[self.task]
        if targets.numel() == 0:
            return h.sum() * 0.0
        if self.sampler is None:
            return full_softmax_loss(h, targets, scorer)
        draws = self.sampler.sample(self.num_sampled, generator).to(targets.device)
        sampled, counts = torch.unique(draws, return_counts=True)  # a Zipfian sample repeats popular items
        log_q = self.sampler.log_expected_count(sampled, self.num_sampled) - torch.log(counts.float())
        return sampled_softmax_loss(h, targets, scorer, sampled, log_q,
                                    self.sampler.log_expected_count(targets, self.num_sampled))


@dataclass
class ItemLoss:
    """Item task: BPR, one negative per positive from the LambdaFM popularity sampler."""

    task: str
    sampler: NegativeSampler

    def __call__(self, model: ConureModel, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        valid = batch["label"] >= 0
        seq, pos = batch["seq"][valid], batch["label"][valid]
        h = model.user_representation(seq)
        if pos.numel() == 0:
            return h.sum() * 0.0
        neg = self.sampler.sample(pos.numel(), generator).to(pos.device)
        scorer = model.heads[self.task]
        diff = scorer.score(h, pos).float() - scorer.score(h, neg).float()
        keep = (neg != pos).float()  # a negative equal to the positive teaches nothing
        return -(F.logsigmoid(diff) * keep).sum() / keep.sum().clamp(min=1.0)


@dataclass
class ClassLoss:
    """Class task: softmax cross-entropy over the classes."""

    task: str

    def __call__(self, model: ConureModel, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        valid = batch["label"] >= 0
        h = model.user_representation(batch["seq"][valid])
        if h.shape[0] == 0:
            return h.sum() * 0.0
        return F.cross_entropy(model.heads[self.task](h).float(), batch["label"][valid])


def make_loss(task: TaskSpec, train: TrainConfig, num_items: int, popularity: np.ndarray | None) -> TaskLoss:
    """The loss of a task. ``popularity``: counts per id (items for T1, labels otherwise)."""
    if task.kind == "sequence":
        if train.sample_ratio >= 1.0:
            return SequenceLoss(task.name, None, num_items)
        num_sampled = max(1, int(round(train.sample_ratio * num_items)))
        if train.sampler == "log_uniform":
            if popularity is None:
                raise ValueError(f"task {task.name}: the log_uniform sampler needs item popularity counts")
            sampler = log_uniform_sampler(popularity, exclude=(0,))
        else:
            sampler = uniform_sampler(num_items + 1, exclude=(0,))
        return SequenceLoss(task.name, sampler, num_sampled)
    if task.kind == "item":
        counts = popularity if popularity is not None else np.ones(task.num_labels)
        if len(counts) != task.num_labels:
            raise ValueError(f"task {task.name}: {len(counts)} popularity counts for {task.num_labels} labels")
        return ItemLoss(task.name, lambdafm_sampler(counts, train.bpr_rho))
    return ClassLoss(task.name)


def l2_parameters(model: ConureModel, scope: str) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters an L2 term of ``scope`` (see :data:`~conure_dist.config.L2_SCOPES`) covers.

    Trainable or not: :func:`l2_penalty` keeps the entries the current stage trains. Biases
    are never covered, nor is the sequence task's head (it is the item vocabulary).
    """
    if scope not in L2_SCOPES:
        raise ValueError(f"L2 scope must be one of {L2_SCOPES}, got {scope!r}")
    if scope == "none":
        return []
    sequence_heads = {id(model.heads[t.name]) for t in model.tasks if t.kind == "sequence"}
    if scope == "head":
        roots = [(f"heads.{t.name}", model.heads[t.name]) for t in model.tasks if t.kind != "sequence"]
    else:
        roots = [("", model)]
    found = []
    for root, top in roots:
        for prefix, module in top.named_modules(prefix=root):
            if id(module) in sequence_heads or isinstance(module, L2_EXCLUDED_MODULES):
                continue
            skip = L2_EXCLUDED_TABLES.get(type(module), ())
            for local, p in module.named_parameters(recurse=False):
                if local == "bias" or local in skip:
                    continue
                found.append((f"{prefix}.{local}" if prefix else local, p))
    return found


def l2_penalty(model: ConureModel, l2: float, scope: str = "head") -> torch.Tensor | None:
    """``l2 * 0.5 * sum(w^2)`` over the entries of :func:`l2_parameters` this stage trains.

    ``None`` when nothing is covered (e.g. T1 with ``scope="head"``: the authors' code has no
    L2 in T1). Frozen entries of prunable weights are excluded entry by entry.
    """
    if l2 <= 0:
        return None
    masks = {name: m.weight_trainable for name, m in model.masked_modules()}
    total = None
    for name, p in l2_parameters(model, scope):
        if not p.requires_grad:
            continue
        w = p * masks[name] if name in masks else p
        term = w.float().pow(2).sum()
        total = term if total is None else total + term
    return None if total is None else 0.5 * l2 * total
