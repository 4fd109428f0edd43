"""Evaluating lazy tensors into checkpoint files, a few megabytes at a time, with reading, arithmetic and writing
overlapped, and every output written to a temporary path that is renamed only when complete.

safetensors files are written here rather than with safetensors.torch.save_file, which needs every tensor of a file in
memory at once (a 5 GB shard would need 5 GB): the header is computed from the known shapes, then the data section is
streamed in order. Space is reserved in the header so that statistics known only at the end can be recorded in it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import math
import mmap
import os
import re
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from capvector import files
from capvector.errors import CapvectorError
from capvector.params.lazy import DTYPE_NAMES, Combination, LazyTensor, row_chunks

# Output bytes per unit of work. Small: a unit's buffers stay in the CPU's caches and are reused from malloc's
# arenas; with 8 MB units each one was mapped, faulted in and unmapped again, which cost more than the arithmetic
# (on a virtual machine, three to five times the time of the same copy in 1 MB pieces).
CHUNK_BYTES = 1 << 20
INFLIGHT_UNITS = 8
WORKERS = 2
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# Output files are written past the page cache (O_DIRECT) where the file system allows it, from staging buffers of
# whole aligned blocks (OutputStream). Written through the page cache, the same 1 GB took 0.5 to 6.9 s on the
# project's virtual machine, the kernel allocating and filling a cache page for every 4 KB, and a 7B model's output
# filled the cache too; written direct, 0.28-0.32 s with almost no CPU time (docs/results/JOURNAL.md, Benchmarks,
# stop 38).
STAGING_BYTES = 8 << 20
DIRECT_ALIGNMENT = 4096  # a multiple of every device's logical block size, which O_DIRECT offsets and sizes must be
# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def retain_freed_memory() -> None:
    """Let this process keep freed buffers for reuse instead of returning them to the kernel: for a process that
    streams a large checkpoint (`capvector extract` and `merge` call it; call it in your own such process).

    Under `perf record`, merge spent about as much CPU time faulting fresh zeroed pages into its per-unit buffers
    (glibc maps a block of 128 KB or more anew, or trims the heap, and so returns it on free) as in torch's
    arithmetic; on a virtual machine a returned page may also go back to the host and cost a host fault when touched
    again. With these thresholds a freed buffer below 64 MB is reused and up to 256 MB of free heap is kept, which
    cut merge's CPU time by about a quarter (docs/results/JOURNAL.md, Benchmarks). Process-wide and lasting, so the
    library does not call it for you; a no-op without glibc."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if os.name == "posix" else None
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 64 << 20)
        mallopt(_M_TRIM_THRESHOLD, 256 << 20)


@dataclass
class OutputTensor:
    name: str
    source: LazyTensor
    dtype: torch.dtype

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.source.numel * self.itemsize


@dataclass
class OutputFile:
    name: str  # relative to the output folder
    tensors: list[OutputTensor]
    metadata: dict[str, str] | None = None
    format: str = "safetensors"  # or "torch" (a state dict written with torch.save: one file's tensors in memory)


def safetensors_header(file: OutputFile, reserve: int = 0) -> bytes:
    entries: dict[str, Any] = {"__metadata__": file.metadata} if file.metadata is not None else {}
    offset = 0
    for tensor in file.tensors:
        entries[tensor.name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.source.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    padded = -(-(len(header) + reserve) // 8) * 8  # the data section starts 8-byte aligned
    return header + b" " * (padded - len(header))


def rewrite_safetensors_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Replace __metadata__ in a file written with reserved header space, without moving the data."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header["__metadata__"] = metadata
        encoded = json.dumps(header, separators=(",", ":")).encode()
        if len(encoded) > size:
            raise RuntimeError(f"{path}: metadata needs {len(encoded)} header bytes, {size} were reserved")
        f.seek(8)
        f.write(encoded + b" " * (size - len(encoded)))


def _non_finite_culprit(source: LazyTensor, start: int, stop: int) -> str:
    terms = source.terms if isinstance(source, Combination) else [(1.0, source)]
    for _, term in terms:
        if not torch.isfinite(term.read(start, stop)).all():
            return f"tensor '{term.name}' in {term.origin} contains NaN or Inf"
    return f"tensor '{source.name}' overflows to Inf when combined (from {source.origin})"


def rounds_to_finite(values: torch.Tensor, dtype: torch.dtype) -> bool:
    """True if every float32 value is finite and stays finite rounded to `dtype`: their sum of squares (one vectorized
    pass, about half the time of a min and max) is finite and below the square of dtype's largest value. False may
    also mean a sum too large for float32; the caller then looks element by element."""
    if not dtype.is_floating_point:
        return False
    flat = values.reshape(-1)
    square = float(torch.dot(flat, flat))
    return math.isfinite(square) and square < float(torch.finfo(dtype).max) ** 2


def evaluate_chunk(tensor: OutputTensor, start: int, stop: int, statistics: bool) -> tuple[torch.Tensor, float]:
    """(the rows' bytes in the output dtype, the sum of squares of the stored values or nan).

    Computed rows are checked for NaN/Inf through a cheap reduction (the stored values' sum of squares with
    `statistics`; else, for rows computed in float32, rounds_to_finite before rounding, and otherwise the stored
    values' min and max, which propagate NaN), and only searched element by element when that is not conclusive.
    Rows copied byte for byte are not checked.
    """
    source = tensor.source
    stored = source.read_native(start, stop) if source.dtype == tensor.dtype else None
    copied = stored is not None and not isinstance(source, Combination)
    computed = None
    if stored is None:
        computed = source.read(start, stop)
        stored = computed.to(tensor.dtype)
    stored = stored.reshape(-1)
    if copied:
        return stored.view(torch.uint8), math.nan
    sumsq = math.nan
    if statistics:
        values = stored.to(torch.float32)
        sumsq = float(torch.dot(values, values))
        finite = math.isfinite(sumsq)
    elif computed is not None:
        finite = rounds_to_finite(computed, tensor.dtype)
    else:
        finite = math.isfinite(float(torch.stack(torch.aminmax(stored)).float().sum()))
    if not finite:
        ensure_finite(source, stored, start, stop)
    return stored.view(torch.uint8), sumsq


def ensure_finite(source: LazyTensor, values: torch.Tensor, start: int, stop: int) -> None:
    """Raise, naming the input tensor and file, if rows [start, stop) of `source` (= values) hold NaN or Inf."""
    if not torch.isfinite(values).all():
        raise CapvectorError(
            f"{_non_finite_culprit(source, start, stop)}; fix or exclude it (--exclude '{source.name}')"
        )


def _raise_disk_full(error: OSError, path: Path, what: str) -> None:
    if error.errno in _DISK_FULL:
        raise CapvectorError(
            f"{path}: no space left while writing {what} ({error.strerror}); "
            "free disk space or choose another output folder"
        ) from None


class OutputStream:
    """A new file written front to back: past the page cache (O_DIRECT) where the file system allows it, else through
    it (tmpfs, other systems); the same bytes either way. Direct writes go out from two aligned staging buffers in
    turn, by a thread of their own, so that filling one overlaps writing the other."""

    def __init__(self, path: Path, direct: bool = True):
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        direct_flag = getattr(os, "O_DIRECT", 0) if direct else 0
        self.fd = -1
        if direct_flag:
            with contextlib.suppress(OSError):  # EINVAL: this file system has no direct I/O
                self.fd = os.open(path, flags | direct_flag, 0o644)
        self.direct = self.fd >= 0
        if not self.direct:
            self.fd = os.open(path, flags, 0o644)
        # page-aligned, as O_DIRECT needs; each with the write that last went out of it
        self.staging = [mmap.mmap(-1, STAGING_BYTES) for _ in range(2)] if self.direct else []
        self.writes: list[Future[None] | None] = [None, None]
        self.writer = ThreadPoolExecutor(1) if self.direct else None
        self.current = 0  # the staging buffer being filled
        self.filled = 0  # bytes waiting in it
        self.size = 0  # bytes of the file so far, staged ones included
        self.last = "the header"  # what was written last, for a disk-full error in close

    def write(self, data: memoryview, what: str) -> None:
        """Append `data` (bytes, 'B' format); `what` names it in a disk-full error."""
        self.size += len(data)
        self.last = what
        if self.writer is None:
            self._write_out(data, what)
            return
        while data:
            if self.filled == 0:
                self._wait(self.current)  # its previous write has gone out
            taken = min(len(data), STAGING_BYTES - self.filled)
            self.staging[self.current][self.filled : self.filled + taken] = data[:taken]
            self.filled += taken
            data = data[taken:]
            if self.filled == STAGING_BYTES:
                self._send(STAGING_BYTES, what)

    def __enter__(self) -> OutputStream:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.close(finish=kind is None)

    def close(self, finish: bool = True) -> None:
        """With `finish`, write what is staged (the last block padded to the alignment, then cut off); close the
        file."""
        try:
            if finish and self.writer is not None:
                if self.filled:
                    padded = -(-self.filled // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT
                    self.staging[self.current][self.filled : padded] = bytes(padded - self.filled)
                    self._send(padded, self.last)
                self._wait(0)
                self._wait(1)
                os.ftruncate(self.fd, self.size)
        except OSError as error:
            _raise_disk_full(error, self.path, self.last)
            raise
        finally:
            if self.writer is not None:
                self.writer.shutdown(wait=True, cancel_futures=True)
            os.close(self.fd)
            self.staging = []  # freed with the last view of them (an error's traceback may hold one)

    def _send(self, nbytes: int, what: str) -> None:
        """Hand the current buffer's first `nbytes` to the writer thread and go on filling the other one."""
        assert self.writer is not None
        view = memoryview(self.staging[self.current])[:nbytes]
        self.writes[self.current] = self.writer.submit(self._write_out, view, what)
        self.current, self.filled = 1 - self.current, 0

    def _wait(self, buffer: int) -> None:
        write, self.writes[buffer] = self.writes[buffer], None
        if write is not None:
            write.result()  # raises what the write raised

    def _write_out(self, data: memoryview, what: str) -> None:
        try:
            while data:
                data = data[os.write(self.fd, data) :]
        except OSError as error:
            if error.errno == errno.EINVAL and self.direct:  # direct I/O refused at the first write: use the cache
                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                self.direct = False
                self._write_out(data, what)
                return
            _raise_disk_full(error, self.path, what)
            raise


_Pending = tuple[tuple[OutputTensor, int, int], "Future[tuple[torch.Tensor, float]]"]


def write_files(
    folder: Path,
    files: Sequence[OutputFile],
    *,
    statistics: bool = True,
    reserve: int = 0,
    description: str = "writing",
) -> dict[str, float]:
    """Write `files` into `folder`; returns each computed tensor's sum of squares (copies excluded), and raises if a
    computed tensor holds NaN or Inf (see evaluate_chunk)."""
    sums: dict[str, float] = {}
    total = sum(t.nbytes for f in files for t in f.tensors)
    with (
        tqdm(total=total, unit="B", unit_scale=True, desc=description, disable=None) as bar,
        ThreadPoolExecutor(WORKERS) as pool,
    ):
        for file in files:
            path = folder / file.name
            path.parent.mkdir(parents=True, exist_ok=True)
            if file.format == "torch":
                state = {t.name: t.source.materialize(t.dtype) for t in file.tensors}
                _torch_save(state, path)
                bar.update(sum(t.nbytes for t in file.tensors))
                continue
            header = safetensors_header(file, reserve)
            units = (
                (t, start, stop)
                for t in file.tensors
                for start, stop in row_chunks(t.source, CHUNK_BYTES // t.itemsize)
            )
            pending: deque[_Pending] = deque()
            with OutputStream(path) as stream:
                stream.write(memoryview(len(header).to_bytes(8, "little") + header), "the header")
                for unit in units:
                    pending.append((unit, pool.submit(evaluate_chunk, *unit, statistics)))
                    if len(pending) >= INFLIGHT_UNITS:
                        _drain_one(pending, stream, sums, bar)
                while pending:
                    _drain_one(pending, stream, sums, bar)
    return sums


def _drain_one(pending: deque[_Pending], stream: OutputStream, sums: dict[str, float], bar: tqdm[Any]) -> None:
    (tensor, _, _), future = pending.popleft()
    try:
        data, sumsq = future.result()
    except BaseException:
        for _, later in pending:
            later.cancel()
        raise
    stream.write(data.numpy().data, f"tensor '{tensor.name}'")
    if not math.isnan(sumsq):
        sums[tensor.name] = sums.get(tensor.name, 0.0) + sumsq
    bar.update(data.numel())


def _torch_save(state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        torch.save(state, path)
    except (OSError, RuntimeError) as error:
        if isinstance(error, OSError) and error.errno not in _DISK_FULL and "space" not in str(error):
            raise
        raise CapvectorError(
            f"{path}: could not be written ({error}); free disk space or choose another output"
        ) from None


def check_output_path(output: Path, inputs: Sequence[Path]) -> None:
    if os.path.lexists(output):
        raise CapvectorError(f"{output}: already exists; choose another output path or remove it first")
    ancestor = next(folder for folder in output.absolute().parents if folder.exists())
    if not ancestor.is_dir():
        raise CapvectorError(f"{output}: {ancestor} is a file, not a folder; choose an output path in a folder")
    resolved = output.resolve()
    for path in inputs:
        source = Path(path).resolve()
        if resolved == source or source.is_relative_to(resolved) or resolved.is_relative_to(source):
            raise CapvectorError(
                f"{output}: output path overlaps the input {path}; choose an output outside the inputs"
            )


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold `.NAME.lock` beside `output` for the block, or fail at once if another process holds it.

    flock, so that a killed holder's lock is released by the kernel and never goes stale. The lock file is removed at
    the end; a process that opened it just before holds a lock on a removed file, so a lock counts only once it is
    held on the file that is at the path.
    """
    lock = output.with_name(f".{output.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CapvectorError(
                f"{output}: another capvector process is writing it now (it holds {lock}); wait for it to finish, "
                "or choose another output path"
            ) from None
        held, present = os.fstat(fd), os.stat(lock) if lock.exists() else None
        if present is not None and (held.st_dev, held.st_ino) == (present.st_dev, present.st_ino):
            break
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


@contextlib.contextmanager
def atomic_output(output: Path, inputs: Sequence[Path] = (), single_file: bool = False) -> Iterator[Path]:
    """Yield the temporary path to build `output` at (an empty folder, or with single_file a file path), renamed to
    `output` only when the block succeeds; on any failure nothing is left at `output`.

    Only one process at a time may write an output (see output_lock): a second one fails at once, and the one that
    holds the lock removes what killed runs left behind for this output before it starts.
    """
    output = Path(output)
    check_output_path(output, inputs)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(output):
        check_output_path(output, inputs)  # another process may have finished it before we held the lock
        debris = re.compile(rf"\.{re.escape(output.name)}\.(tmp|old)-\d+")  # files.atomic_path's names
        for path in output.parent.iterdir():
            if debris.fullmatch(path.name):
                files.remove(path)
        try:
            with files.atomic_path(output, replace=False) as temporary:
                if not single_file:
                    temporary.mkdir()
                yield temporary
        except FileExistsError:
            if not os.path.lexists(output):
                raise
            raise CapvectorError(
                f"{output}: appeared while it was being written (by a program that does not take capvector's lock); "
                "nothing was written: choose another output path"
            ) from None
