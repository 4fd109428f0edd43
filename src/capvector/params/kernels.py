"""One compiled pass for the merge's common case: a bfloat16 model plus a float32 vector, rounded once to bfloat16.

torch evaluates `(pt.float() + alpha * gamma).to(torch.bfloat16)` and the NaN check in four passes over every element,
each at memory speed, which made merge CPU-bound (see the README's merge figures). Here the same arithmetic is one loop
compiled by numba (the `fast` extra): widen the bfloat16 bits to float32, multiply gamma by alpha in float32, add (two
roundings, as torch does: no fused multiply-add), round to nearest even, and track the largest magnitude so that NaN
and Inf are caught in the same pass. The result is bit for bit torch's. Without numba, `add_scaled_bf16` returns None
and the caller evaluates the expression with torch.

numba loads with this module, so it is imported only where a merge needs it (Combination.read_fused); the compiled
loop is cached on disk (numba's cache, beside this file or in the user's cache folder).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import torch

NUMBA = importlib.util.find_spec("numba") is not None
# Magnitude bits (sign cleared) below which a float32 is finite and rounds to a finite bfloat16.
FINITE_BF16_BOUND = 0x7F7F8000


def available() -> bool:
    return NUMBA


if NUMBA:
    import numba
    from numba import types
    from numba.extending import intrinsic

    def _bitcast(source: Any, target: Any) -> Any:
        """An intrinsic reinterpreting a scalar's bits as another type of the same width (numba has no scalar view)."""

        def typer(typingctx: Any, value: Any) -> Any:
            def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
                return builder.bitcast(args[0], context.get_value_type(target))

            return target(source), codegen

        return intrinsic(typer)

    _as_float32 = _bitcast(types.uint32, types.float32)
    _as_uint32 = _bitcast(types.float32, types.uint32)

    @numba.njit(nogil=True, cache=True)
    def _add_scaled(a: Any, b: Any, alpha: Any, out: Any) -> Any:
        largest = np.uint32(0)
        for i in range(a.size):
            bits = _as_uint32(_as_float32(np.uint32(a[i]) << np.uint32(16)) + alpha * b[i])
            largest = max(largest, bits & np.uint32(0x7FFFFFFF))
            even = (bits >> np.uint32(16)) & np.uint32(1)
            out[i] = np.uint16((bits + np.uint32(0x7FFF) + even) >> np.uint32(16))
        return largest < np.uint32(FINITE_BF16_BOUND)


def _bits(tensor: torch.Tensor) -> np.ndarray:
    return tensor.reshape(-1).view(torch.int16).numpy().view(np.uint16)


def add_scaled_bf16(a: torch.Tensor, b: torch.Tensor, alpha: float) -> tuple[torch.Tensor, bool] | None:
    """(a + alpha * b rounded to bfloat16, whether every element is finite) for contiguous bfloat16 `a` and float32
    `b` of the same size, equal bit for bit to `(a.float() + alpha * b).to(torch.bfloat16)` where finite; None without
    numba. Where not finite the values are unspecified: the caller reports the input at fault."""
    if not available():
        return None
    out = torch.empty_like(a)
    finite = _add_scaled(_bits(a), b.reshape(-1).numpy(), np.float32(alpha), _bits(out))
    return out, bool(finite)
