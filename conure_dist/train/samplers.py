"""Negative samplers over a label space, with the probabilities log-Q correction needs.

All samplers draw with replacement by inverse-CDF lookup (``searchsorted``), so a draw costs
O(S log V) whatever the vocabulary size.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class NegativeSampler:
    """Draws ids from a fixed distribution ``p`` over ``0..len(p)-1``.

    ``log_expected_count(ids, n)`` is ``log(n * p[id])``: the log-Q term of sampled softmax
    when ``n`` ids are drawn with replacement.
    """

    def __init__(self, probs: torch.Tensor):
        probs = probs.to(torch.float64)
        if probs.dim() != 1 or probs.numel() == 0 or bool((probs < 0).any()) or float(probs.sum()) <= 0:
            raise ValueError("sampler probabilities must be a non-empty, non-negative vector with a positive sum")
        self.probs = probs / probs.sum()
        self._cdf = torch.cumsum(self.probs, 0)
        self._log_probs = torch.log(self.probs).to(torch.float32)

    @property
    def size(self) -> int:
        return self.probs.numel()

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        u = torch.rand(n, generator=generator, dtype=torch.float64) * self._cdf[-1]
        ids = torch.searchsorted(self._cdf, u, right=True)
        return ids.clamp_(max=self.size - 1)

    def log_expected_count(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        return self._log_probs.to(ids.device)[ids] + math.log(n)

    def to(self, device: torch.device | str) -> "NegativeSampler":
        self._log_probs = self._log_probs.to(device)
        return self


def _by_rank(popularity: np.ndarray | torch.Tensor, weight_of_rank: torch.Tensor, exclude: tuple[int, ...]) -> torch.Tensor:
    """Probabilities per id from weights per popularity rank (most popular = rank 0, ties by id)."""
    pop = torch.as_tensor(np.asarray(popularity), dtype=torch.float64)
    mask = torch.ones_like(pop, dtype=torch.bool)
    for i in exclude:
        mask[i] = False
    ids = torch.nonzero(mask).reshape(-1)
    order = ids[torch.sort(-pop[ids], stable=True).indices]
    probs = torch.zeros_like(pop)
    probs[order] = weight_of_rank[: order.numel()]
    return probs


def uniform_sampler(size: int, exclude: tuple[int, ...] = ()) -> NegativeSampler:
    probs = torch.ones(size, dtype=torch.float64)
    for i in exclude:
        probs[i] = 0.0
    return NegativeSampler(probs)


def log_uniform_sampler(popularity: np.ndarray, exclude: tuple[int, ...] = ()) -> NegativeSampler:
    """Zipfian by popularity rank r: p(r) = (log(r + 2) - log(r + 1)) / log(V + 1)."""
    n = len(popularity) - len(exclude)
    r = torch.arange(n, dtype=torch.float64)
    weights = (torch.log(r + 2) - torch.log(r + 1)) / math.log(n + 1)
    return NegativeSampler(_by_rank(popularity, weights, exclude))


def lambdafm_sampler(popularity: np.ndarray, rho: float = 0.3) -> NegativeSampler:
    """LambdaFM static sampler: p(rank r) proportional to exp(-(r + 1) / (rho * |Y|))."""
    n = len(popularity)
    r = torch.arange(n, dtype=torch.float64)
    return NegativeSampler(_by_rank(popularity, torch.exp(-(r + 1) / (rho * n)), ()))
