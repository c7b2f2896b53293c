"""Task heads. Each belongs to one task, is trained in that task's stages, frozen afterwards."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ItemScorer(nn.Module):
    """Scores items of a label space: ``score(h, y) = h . W[y] + b[y]``.

    Used for T1 (the output embedding over the whole item vocabulary, row 0 = padding, never a
    target) and for item tasks (a dense layer over the task's label space). Scoring a subset of
    rows keeps sampled softmax and BPR proportional to the sample, not the vocabulary.
    """

    def __init__(self, dim: int, num_labels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_labels, dim) * 0.02)
        self.bias = nn.Parameter(torch.zeros(num_labels))

    @property
    def num_labels(self) -> int:
        return self.weight.shape[0]

    def score(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``h`` [N, d], ``labels`` [N] or [N, k] -> scores of the same shape as ``labels``."""
        return self.score_rows(h, self.weight[labels], self.bias[labels])

    @staticmethod
    def score_rows(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """:meth:`score` with the labels' rows already taken: ``w`` [N, d] or [N, k, d], ``b``
        [N] or [N, k]."""
        if w.dim() == 2:
            return (h * w).sum(-1) + b
        return torch.einsum("nd,nkd->nk", h, w) + b

    def score_shared(self, h: torch.Tensor, labels: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of every row of ``h`` [N, d] against the same labels [S] -> [N, S] (one GEMM
        with the bias), in fp32, plus ``shift`` [S] if given."""
        return self.score_rows_shared(h, self.weight[labels], self.bias[labels], shift)

    @staticmethod
    def score_rows_shared(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`score_shared` with the labels' rows already taken (``w`` [S, d], ``b`` [S]). In
        fp32 the shift joins the bias of the GEMM (no extra pass over [N, S]); in lower precision
        it is added in fp32 after."""
        low = h.dtype != torch.float32 or torch.is_autocast_enabled(h.device.type)
        if shift is None or low:
            scores = F.linear(h, w, b).float()
            return scores if shift is None else scores + shift[None, :]
        return F.linear(h, w, b + shift)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Scores over the whole label space: [N, d] -> [N, num_labels] (one fused GEMM with the
        bias: 1.6x faster than a matmul and an add over 646K items on CPU, BENCHMARKS.md)."""
        return F.linear(h, self.weight, self.bias)


class ClassHead(nn.Module):
    """Dense layer over the classes of a profile task (softmax cross-entropy)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h)
