"""File-backed tensors read by row ranges, and lazy linear combinations of them.

Every tensor is viewed as a matrix of `rows` x `row_numel` (its first dimension against the rest), so that any
element-wise expression (a merge, a difference) and any row-separable one (a low-rank product, a LoRA delta) can be
evaluated a few megabytes at a time. Nothing here holds a whole checkpoint in memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence

import torch

from capvector.errors import CapvectorError

# safetensors' dtype names; the format is documented at https://github.com/huggingface/safetensors
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def row_chunks(tensor: LazyTensor, chunk_elements: int) -> Iterator[tuple[int, int]]:
    """Row ranges of about `chunk_elements` elements each (at least one row); none for a tensor with no elements,
    whatever its number of rows."""
    if tensor.numel == 0:
        return
    step = max(1, chunk_elements // tensor.row_numel)
    for start in range(0, tensor.rows, step):
        yield start, min(start + step, tensor.rows)


class LazyTensor:
    """A tensor known by shape and dtype whose rows are produced on demand, in float32."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    name: str  # the parameter name, for messages
    origin: str  # where it comes from (a file), for messages

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as a float32 matrix (stop - start, row_numel), in a buffer the caller owns."""
        raise NotImplementedError

    def read_native(self, start: int, stop: int) -> torch.Tensor | None:
        """Rows [start, stop) in the stored dtype when they are stored as such (a pass-through copy), else None."""
        return None

    def materialize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole tensor, in `dtype` (default: its own)."""
        native = self.read_native(0, self.rows) if dtype in (None, self.dtype) else None
        full = native if native is not None else self.read(0, self.rows).to(dtype or self.dtype)
        return full.reshape(self.shape)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, shape={list(self.shape)}, dtype={self.dtype}, from {self.origin})"


class StoredTensor(LazyTensor):
    """A tensor stored contiguously in a file (safetensors), read with pread: no mmap, so reading a large checkpoint
    does not grow the process's resident memory."""

    def __init__(self, name: str, path: str, fd: int, offset: int, dtype: torch.dtype, shape: Sequence[int]) -> None:
        self.name, self.origin, self.fd, self.offset = name, path, fd, offset
        self.dtype, self.shape = dtype, tuple(shape)
        self.itemsize = torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def read_native(self, start: int, stop: int) -> torch.Tensor:
        row_bytes = self.row_numel * self.itemsize
        buffer = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
        wanted, done = buffer.numel(), 0
        view = buffer.numpy().data
        while done < wanted:
            got = os.preadv(self.fd, [view[done:]], self.offset + start * row_bytes + done)
            if got == 0:
                raise CapvectorError(
                    f"{self.origin}: file is truncated inside tensor '{self.name}' (expected {self.nbytes} bytes at "
                    f"offset {self.offset}); re-download or re-save this checkpoint"
                )
            done += got
        return buffer.view(self.dtype).view(stop - start, self.row_numel)

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.read_native(start, stop).to(torch.float32)


class InMemoryTensor(LazyTensor):
    """A tensor already in memory (a torch.load with mmap=True, or a test's tensor)."""

    def __init__(self, name: str, tensor: torch.Tensor, origin: str = "memory") -> None:
        self.name, self.origin, self.tensor = name, origin, tensor
        self.shape, self.dtype = tuple(tensor.shape), tensor.dtype

    def read_native(self, start: int, stop: int) -> torch.Tensor:
        return self.tensor.reshape(self.rows, self.row_numel)[start:stop]

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.read_native(start, stop).to(torch.float32, copy=True)


class LowRankTensor(LazyTensor):
    """left @ right, with left (m x r) and right (r x n): a truncated-SVD factorization of a 2-D tensor."""

    def __init__(
        self, name: str, left: LazyTensor, right: LazyTensor, dtype: torch.dtype, shape: Sequence[int]
    ) -> None:
        self.name, self.origin, self.left, self.right = name, left.origin, left, right
        self.dtype, self.shape = dtype, tuple(shape)
        factors_2d = len(left.shape) == len(right.shape) == 2
        if not factors_2d or left.shape[1] != right.shape[0] or (left.shape[0], right.shape[1]) != self.shape:
            raise CapvectorError(
                f"{self.origin}: low-rank factors of '{name}' have shapes {list(left.shape)} and {list(right.shape)}, "
                f"which do not multiply to {list(self.shape)}; the vector file is damaged: extract it again"
            )

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.left.read(start, stop) @ self.right.read(0, self.right.rows)


class LoraDelta(LazyTensor):
    """scaling * B @ A of a LoRA adapter, transposed for fan_in_fan_out layers and embeddings, never formed whole."""

    def __init__(self, name: str, lora_a: LazyTensor, lora_b: LazyTensor, scaling: float, transposed: bool) -> None:
        self.name, self.origin = name, lora_a.origin
        self.lora_a, self.lora_b, self.scaling, self.transposed = lora_a, lora_b, scaling, transposed
        if len(lora_a.shape) != 2 or len(lora_b.shape) != 2 or lora_a.shape[0] != lora_b.shape[1]:
            raise CapvectorError(
                f"{self.origin}: LoRA factors of '{name}' have shapes A {list(lora_a.shape)} and B "
                f"{list(lora_b.shape)}, which do not multiply (A must be r x in, B out x r); the adapter is damaged"
            )
        out_features, in_features = lora_b.shape[0], lora_a.shape[1]
        self.shape = (in_features, out_features) if transposed else (out_features, in_features)
        self.dtype = lora_a.dtype

    def read(self, start: int, stop: int) -> torch.Tensor:
        if self.transposed:  # rows of (B A)^T are columns of A
            a_columns = self.lora_a.read(0, self.lora_a.rows)[:, start:stop]
            return self.scaling * (a_columns.T @ self.lora_b.read(0, self.lora_b.rows).T)
        return self.scaling * (self.lora_b.read(start, stop) @ self.lora_a.read(0, self.lora_a.rows))


class Combination(LazyTensor):
    """sum_i coefficient_i * term_i, evaluated row chunk by row chunk in float32.

    Each product is rounded to float32 and then added, as the plain expression `a + alpha * b` does in float32 (a
    fused multiply-add, which torch.add(..., alpha=) uses in its vectorized body only, would round differently), so
    that a merge equals, bit for bit, the float32 arithmetic of mergekit or of a hand-written reference.
    """

    def __init__(self, terms: Sequence[tuple[float, LazyTensor]], dtype: torch.dtype | None = None) -> None:
        first = terms[0][1]
        for _, term in terms[1:]:
            if tuple(term.shape) != tuple(first.shape):
                raise CapvectorError(
                    f"shape mismatch for tensor '{first.name}': {list(first.shape)} in {first.origin} but "
                    f"{list(term.shape)} in {term.origin}; these checkpoints are not of the same architecture"
                )
        self.terms = list(terms)
        self.name, self.origin, self.shape = first.name, first.origin, first.shape
        self.dtype = dtype or first.dtype

    def read(self, start: int, stop: int) -> torch.Tensor:
        (coefficient, term), *rest = self.terms
        out = term.read(start, stop)  # a fresh buffer (see LazyTensor.read), so it may be updated in place
        if coefficient != 1.0:
            out.mul_(coefficient)
        for coefficient, term in rest:
            rows = term.read(start, stop)
            if coefficient == -1.0:
                out.sub_(rows)
            else:
                out.add_(rows if coefficient == 1.0 else rows.mul_(coefficient))
        return out

    def read_native(self, start: int, stop: int) -> torch.Tensor | None:
        """Stored rows of a single unscaled term, or a ± b of two terms stored in this dtype: torch computes a
        bfloat16/float16 a ± b in float32 and rounds once, which is exactly the float32 arithmetic and final rounding
        of `read`, in one pass instead of four."""
        if any(term.dtype != self.dtype for _, term in self.terms):
            return None
        (first, a), *rest = self.terms
        if first != 1.0 or len(rest) > 1 or (rest and rest[0][0] not in (1.0, -1.0)):
            return None
        a_rows = a.read_native(start, stop)
        if not rest or a_rows is None:
            return a_rows
        b_rows = rest[0][1].read_native(start, stop)
        return None if b_rows is None else torch.add(a_rows, b_rows, alpha=rest[0][0])


class LazyTensorMapping(Mapping[str, torch.Tensor]):
    """Names to tensors read only when asked for (`mapping[name]`); `lazy(name)` gives the tensor unread.
    Subclasses (a checkpoint, a capability vector) set `self.tensors`."""

    tensors: dict[str, LazyTensor]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name].materialize()

    def __contains__(self, name: object) -> bool:
        """Without reading: Mapping's own `in` (also behind `keys() - other.keys()`) reads the tensor."""
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def lazy(self, name: str) -> LazyTensor:
        return self.tensors[name]
