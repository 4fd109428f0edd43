"""Truncated SVD of capability-vector matrices, with the exact relative error of the truncation."""

from __future__ import annotations

import threading

import torch

from capvector.params.lazy import LazyTensor

OVERSAMPLE = 8
POWER_ITERATIONS = 4


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(left, right, relative Frobenius error) with left = U_r diag(S_r) (m x r) and right = V_r^T (r x n).

    Randomized SVD (torch.svd_lowrank): a full SVD of every matrix of a 7B model would take hours. The error is computed
    exactly from the factors: |G - LR|^2 = |G|^2 - 2 <L, G R^T> + <L^T L, R R^T>, without forming G - LR.
    """
    rank = min(rank, *matrix.shape)
    u, s, v = torch.svd_lowrank(matrix, q=min(rank + OVERSAMPLE, *matrix.shape), niter=POWER_ITERATIONS)
    left, right = u[:, :rank] * s[:rank], v[:, :rank].T.contiguous()
    total = matrix.double().square().sum()
    if total == 0:
        return left, right, 0.0
    residual = (
        total
        - 2 * (left.double() * (matrix.double() @ right.double().T)).sum()
        + ((left.double().T @ left.double()) * (right.double() @ right.double().T)).sum()
    )
    return left, right, float(residual.clamp(min=0).sqrt() / total.sqrt())


class Factorization:
    """The truncated SVD of one lazy 2-D tensor, computed once when either factor is first read."""

    def __init__(self, source: LazyTensor, rank: int, check_finite=None):
        self.source, self.rank = source, min(rank, *source.shape)
        self._lock = threading.Lock()
        self._check_finite = check_finite
        self.left: torch.Tensor | None = None
        self.right: torch.Tensor | None = None
        self.error = float("nan")
        self.norm = float("nan")

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            if self.left is None:
                matrix = self.source.read(0, self.source.rows)
                if self._check_finite:
                    self._check_finite(matrix)
                self.norm = float(torch.linalg.vector_norm(matrix.double()))
                self.left, self.right, self.error = truncated_svd(matrix, self.rank)
        return self.left, self.right

    def part(self, which: str) -> FactorTensor:
        return FactorTensor(self, which)


class FactorTensor(LazyTensor):
    """The left (m x r) or right (r x n) factor of a Factorization."""

    def __init__(self, factorization: Factorization, which: str):
        self.factorization, self.which = factorization, which
        source = factorization.source
        self.name, self.origin, self.dtype = f"{source.name}::{which}", source.origin, source.dtype
        self.shape = (source.shape[0], factorization.rank) if which == "left" else (factorization.rank, source.shape[1])

    def read(self, start: int, stop: int) -> torch.Tensor:
        left, right = self.factorization.factors()
        return (left if self.which == "left" else right)[start:stop].clone()
