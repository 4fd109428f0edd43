"""Truncated SVD of capability-vector matrices, with the exact norm and relative error of what is stored."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from capvector.params.lazy import LazyTensor

OVERSAMPLE = 8
POWER_ITERATIONS = 4


def factor_statistics(matrix: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> tuple[float, float]:
    """(|L R|, |G - L R| / |G|) for G = matrix, in float64, without forming L R or G - L R:
    |L R|^2 = <L^T L, R R^T> and |G - L R|^2 = |G|^2 - 2 <L, G R^T> + |L R|^2."""
    g, lf, rf = matrix.double(), left.double(), right.double()
    total = g.square().sum()
    product = ((lf.T @ lf) * (rf @ rf.T)).sum().clamp(min=0)
    if total == 0:
        return float(product.sqrt()), 0.0
    residual = total - 2 * (lf * (g @ rf.T)).sum() + product
    return float(product.sqrt()), float(residual.clamp(min=0).sqrt() / total.sqrt())


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(left, right, relative Frobenius error) with left = U_r diag(S_r) (m x r) and right = V_r^T (r x n).

    Randomized SVD (torch.svd_lowrank): a full SVD of every matrix of a 7B model would take hours.
    """
    rank = min(rank, *matrix.shape)
    u, s, v = torch.svd_lowrank(matrix, q=min(rank + OVERSAMPLE, *matrix.shape), niter=POWER_ITERATIONS)
    left, right = u[:, :rank] * s[:rank], v[:, :rank].T.contiguous()
    return left, right, factor_statistics(matrix, left, right)[1]


class Factorization:
    """The truncated SVD of one lazy 2-D tensor, computed once when either factor is first read, with its factors
    rounded to the dtype they are stored in; `norm` and `error` are those of the stored product, `full_norm` that of
    the tensor before truncation."""

    def __init__(
        self,
        source: LazyTensor,
        rank: int,
        dtype: torch.dtype,
        check_finite: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        self.source, self.rank, self.dtype = source, min(rank, *source.shape), dtype
        self._lock = threading.Lock()
        self._check_finite = check_finite
        self._factors: tuple[torch.Tensor, torch.Tensor] | None = None
        self.error = self.norm = self.full_norm = float("nan")

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            if self._factors is None:
                matrix = self.source.read(0, self.source.rows)
                if self._check_finite:
                    self._check_finite(matrix)
                left, right, _ = truncated_svd(matrix, self.rank)
                left, right = (f.to(self.dtype).to(torch.float32) for f in (left, right))  # as they will be stored
                self.full_norm = float(torch.linalg.vector_norm(matrix.double()))
                self.norm, self.error = factor_statistics(matrix, left, right)
                self._factors = left, right
        return self._factors

    def part(self, which: str) -> FactorTensor:
        return FactorTensor(self, which)


class FactorTensor(LazyTensor):
    """The left (m x r) or right (r x n) factor of a Factorization."""

    def __init__(self, factorization: Factorization, which: str) -> None:
        self.factorization, self.which = factorization, which
        source = factorization.source
        self.name, self.origin, self.dtype = f"{source.name}::{which}", source.origin, factorization.dtype
        self.shape = (source.shape[0], factorization.rank) if which == "left" else (factorization.rank, source.shape[1])

    def read(self, start: int, stop: int) -> torch.Tensor:
        left, right = self.factorization.factors()
        return (left if self.which == "left" else right)[start:stop].clone()
