"""Layers whose ``weight`` is prunable: part trainable, part frozen, part unused.

A prunable layer keeps three tensors for its weight:

- ``weight`` (the parameter): the optimizer's copy. Only its *trainable* entries are ever read.
- ``weight_frozen`` (buffer): the values of the entries that take part in the forward pass but
  must not change (owned by earlier tasks), and 0 for unused entries.
- ``weight_trainable`` (bool buffer): which entries the current stage may change.

The forward pass reads ``where(weight_trainable, weight, weight_frozen)``. Autograd then sends
gradient only to trainable entries, and no optimizer holds the frozen values at all: Adam state,
weight decay, ZeRO partitioning or bf16 master copies of ``weight`` cannot reach them. The cost
is one ``where`` over the weight per forward pass (measured in BENCHMARKS.md).

Only :mod:`conure_dist.model.network` fills these buffers, from the owner map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PrunableWeight(nn.Module):
    """Mixin for a module with one prunable parameter named ``weight``."""

    weight: nn.Parameter

    def _init_mask(self) -> None:
        self.register_buffer("weight_frozen", torch.zeros_like(self.weight.detach()))
        self.register_buffer("weight_trainable", torch.ones_like(self.weight.detach(), dtype=torch.bool))
        self.masked = False  # off: the plain weight is used (no owner map, e.g. naive fine-tuning)

    def set_mask(self, used: torch.Tensor | None, trainable: torch.Tensor | None) -> None:
        """Switch the view; ``None`` turns masking off. Takes frozen values from ``weight`` now."""
        if used is None or trainable is None:
            self.masked = False
            self.weight_trainable.fill_(True)
            self.weight_frozen.zero_()
            return
        with torch.no_grad():
            device = self.weight.device
            used, trainable = used.to(device), trainable.to(device)
            keep = used & ~trainable
            self.weight_trainable.copy_(trainable)
            self.weight_frozen.copy_(torch.where(keep, self.weight, torch.zeros_like(self.weight)))
        self.masked = True

    def effective_weight(self) -> torch.Tensor:
        if not self.masked:
            return self.weight
        return torch.where(self.weight_trainable, self.weight, self.weight_frozen)


class CausalConv1d(PrunableWeight):
    """Dilated causal 1-D convolution over ``[batch, length, channels]``.

    Left-pads by ``(kernel - 1) * dilation`` so position j only sees positions <= j.

    Computed as a 2-D convolution over a ``[batch, channels, 1, length]`` *view* of the
    ``[batch, length, channels]`` activations: that view is already in channels-last memory
    order, so oneDNN/cuDNN take it as is and return channels-last output, which is again a
    contiguous ``[batch, length, channels]`` tensor. No transpose copies, and the 2-D kernels
    run about 1.5x faster than ``conv1d`` on CPU (BENCHMARKS.md, ``jobs/bench.py backbone``).
    """

    def __init__(self, channels: int, kernel_size: int, dilation: int):
        super().__init__()
        self.kernel_size, self.dilation = kernel_size, dilation
        self.weight = nn.Parameter(torch.empty(channels, channels, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv1d's default
        self._init_mask()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 0, (self.kernel_size - 1) * self.dilation, 0))  # left-pad the length
        y = F.conv2d(x.transpose(1, 2).unsqueeze(2), self.effective_weight().unsqueeze(2), self.bias,
                     dilation=(1, self.dilation))
        return y.squeeze(2).transpose(1, 2)


class PrunableLinear(PrunableWeight):
    """``y = x W^T + b`` with a prunable ``W`` (Transformer projections)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self._init_mask()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


class ItemEmbedding(PrunableWeight):
    """Item embedding table; row 0 is padding and stays zero.

    Prunable only when the model is configured so (paper Table 5); otherwise it is a shared
    tensor, trained in T1 and frozen afterwards, and its mask stays off.
    """

    def __init__(self, num_rows: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_rows, dim) * 0.02)
        with torch.no_grad():
            self.weight[0].zero_()
        self._init_mask()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.effective_weight(), padding_idx=0)
