"""Capability vectors: gamma = theta_ao - theta_ft, lazy and file-backed, with arithmetic, saving and loading.

A saved vector is a folder:
  capvector.safetensors            (or capvector-0000i-of-0000n.safetensors + capvector.safetensors.index.json)
  capvector.json                   the metadata, also stored in every safetensors header under "capvector"
Dense tensors are stored under their parameter names. A low-rank tensor `name` is stored as two factors,
`name::left` (m x r, = U_r diag(S_r)) and `name::right` (r x n, = V_r^T), with gamma ~= left @ right.
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import functools
import itertools
import json
import math
import os
import threading
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from capvector import __version__
from capvector.errors import CapvectorError
from capvector.files import sha256_file, write_json
from capvector.params.checkpoints import Checkpoint, load_json, open_checkpoint
from capvector.params.lazy import (
    SAFETENSORS_DTYPES,
    Combination,
    LazyTensor,
    LazyTensorMapping,
    LowRankTensor,
    row_chunks,
)
from capvector.params.lowrank import Factorization
from capvector.params.streaming import (
    OutputFile,
    OutputTensor,
    atomic_output,
    ensure_finite,
    rewrite_safetensors_metadata,
    write_files,
)

METADATA_FILE = "capvector.json"
WEIGHTS_STEM = "capvector"
FORMAT_VERSION = 1
LEFT, RIGHT = "::left", "::right"
MAX_SHARD_BYTES = 5_000_000_000
REDUCE_CHUNK_ELEMENTS = 1 << 18  # 1 MB of float32 per read: see streaming.CHUNK_BYTES


class CapabilityVector(LazyTensorMapping):
    """A mapping from parameter name to a tensor of the vector, read on demand.

    Arithmetic (`a + b`, `a - b`, `2.0 * a`) builds new lazy vectors without reading anything; reductions (`dot`,
    `norm`, `cosine`) stream through the files a few megabytes at a time; `save` writes one.
    """

    def __init__(
        self,
        tensors: Mapping[str, LazyTensor],
        metadata: dict[str, Any] | None = None,
        checkpoints: Sequence[Checkpoint] = (),
    ) -> None:
        self.tensors = dict(tensors)
        self.metadata = metadata or {}
        self._checkpoints = list(checkpoints)  # kept open while this vector (or one built from it) is used

    def close(self) -> None:
        for checkpoint in self._checkpoints:
            checkpoint.close()

    # --- arithmetic -------------------------------------------------------------------------------------------------

    def _combine(self, other: CapabilityVector, sign: float) -> CapabilityVector:
        """Keys of both are combined; a key in one only is kept as if the other were zero there."""
        tensors: dict[str, LazyTensor] = {}
        for name in dict.fromkeys([*self.tensors, *other.tensors]):
            terms = [*_terms(self.tensors.get(name), 1.0), *_terms(other.tensors.get(name), sign)]
            tensors[name] = terms[0][1] if len(terms) == 1 and terms[0][0] == 1.0 else Combination(terms)
        return CapabilityVector(tensors, {"formula": "combination"}, self._checkpoints + other._checkpoints)

    def __add__(self, other: CapabilityVector) -> CapabilityVector:
        return self._combine(other, 1.0)

    def __sub__(self, other: CapabilityVector) -> CapabilityVector:
        return self._combine(other, -1.0)

    def __mul__(self, scale: float) -> CapabilityVector:
        tensors: dict[str, LazyTensor] = {
            name: Combination(_terms(t, float(scale))) for name, t in self.tensors.items()
        }
        return CapabilityVector(tensors, {"formula": f"{scale} * vector"}, self._checkpoints)

    __rmul__ = __mul__

    def __neg__(self) -> CapabilityVector:
        return self * -1.0

    # --- reductions -------------------------------------------------------------------------------------------------

    def tensor_products(self, other: CapabilityVector) -> dict[str, tuple[float, float, float]]:
        """Per shared tensor (|self|^2, |other|^2, <self, other>), in one streamed pass over both."""
        products = {}
        for name in self.tensors.keys() & other.tensors.keys():
            a, b = self.tensors[name], other.tensors[name]
            if a.shape != b.shape:
                raise CapvectorError(
                    f"tensor '{name}' has shape {list(a.shape)} in one vector and {list(b.shape)} in the other"
                )
            aa = bb = ab = 0.0
            for start, stop in row_chunks(a, REDUCE_CHUNK_ELEMENTS):
                x = a.read(start, stop).reshape(-1)
                y = x if b is a else b.read(start, stop).reshape(-1)
                aa, bb, ab = aa + float(torch.dot(x, x)), bb + float(torch.dot(y, y)), ab + float(torch.dot(x, y))
            products[name] = (aa, bb, ab)
        return products

    def tensor_dots(self, other: CapabilityVector | None = None) -> dict[str, float]:
        """Per shared tensor, <self, other> (or |self|^2 when other is None)."""
        return {name: ab for name, (_, _, ab) in self.tensor_products(other or self).items()}

    def dot(self, other: CapabilityVector) -> float:
        return sum(self.tensor_dots(other).values())

    def norm(self) -> float:
        return math.sqrt(sum(self.tensor_dots().values()))

    def cosine(self, other: CapabilityVector) -> float:
        return cosine(self, other)

    # --- saving -----------------------------------------------------------------------------------------------------

    def input_paths(self) -> list[Path]:
        """The files and folders this vector is read from, which an output must stay out of."""
        return [p for checkpoint in self._checkpoints for p in checkpoint.input_paths()]

    def save(
        self,
        output: str | os.PathLike[str],
        *,
        dtype: torch.dtype | str | None = None,
        rank: int | None = None,
        max_shard_bytes: int = MAX_SHARD_BYTES,
        hash_sources: bool = True,
    ) -> CapabilityVector:
        """Write the vector to a new folder (atomically) and return it opened from there. Each tensor is stored in
        `dtype`, by default its own (a difference of bfloat16 or float16 models: float32, exact)."""
        with atomic_output(Path(output), self.input_paths()) as folder:
            self.write(folder, dtype=dtype, rank=rank, max_shard_bytes=max_shard_bytes, hash_sources=hash_sources)
        return open_vector(output)

    def write(
        self,
        folder: Path,
        *,
        dtype: torch.dtype | str | None = None,
        rank: int | None = None,
        max_shard_bytes: int = MAX_SHARD_BYTES,
        hash_sources: bool = True,
    ) -> None:
        """Write the vector's files into the empty `folder` (see save)."""
        dtype = parse_dtype(dtype) if dtype is not None else None
        if rank is not None and not (isinstance(rank, int) and not isinstance(rank, bool) and rank > 0):
            raise CapvectorError(f"--rank must be a positive integer (singular vectors kept per matrix), not {rank!r}")
        factorizations: dict[str, Factorization] = {}
        entries: list[OutputTensor] = []
        for name, tensor in self.tensors.items():
            out_dtype = dtype or tensor.dtype
            if rank and len(tensor.shape) == 2 and min(tensor.shape) > rank:
                job = Factorization(tensor, rank, out_dtype, functools.partial(_ensure_finite_matrix, tensor))
                factorizations[name] = job
                entries += [
                    OutputTensor(name + LEFT, job.part("left"), out_dtype),
                    OutputTensor(name + RIGHT, job.part("right"), out_dtype),
                ]
            else:
                entries.append(OutputTensor(name, tensor, out_dtype))
        files = _shard(entries, max_shard_bytes)
        stored_dtypes = sorted({str(entry.dtype).removeprefix("torch.") for entry in entries})
        metadata = {
            **self.metadata,
            "format": "capvector",
            "format_version": FORMAT_VERSION,
            "tool": f"capvector {__version__}",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "dtype": ", ".join(stored_dtypes),
            # a merge rounds once more to the model's dtype: exact only if gamma itself was not rounded below float32
            "rounded_below_float32": any(entry.dtype.itemsize < 4 for entry in entries),
            "rank": rank,
        }
        sources = metadata.get("sources", {})
        reserve = len(_header_metadata(_worst_case(metadata, self.tensors, factorizations))["capvector"]) + 1024
        hasher = _SourceHasher(sources) if hash_sources else None
        sums = write_files(folder, files, reserve=reserve, description="saving the vector")
        norms = {
            name: factorizations[name].norm if name in factorizations else math.sqrt(sums.get(name, 0.0))
            for name in self.tensors
        }
        metadata["norms"] = norms
        metadata["global_norm"] = math.sqrt(sum(n * n for n in norms.values()))
        if factorizations:
            metadata["lowrank_relative_error"] = {name: job.error for name, job in factorizations.items()}
            full = {name: job.full_norm for name, job in factorizations.items()}
            lost = math.sqrt(sum((factorizations[n].error * full[n]) ** 2 for n in full))
            full_total = math.sqrt(sum(full.get(n, norms[n]) ** 2 for n in norms))
            metadata["global_lowrank_relative_error"] = lost / full_total if full_total else 0.0
        if hasher:
            hasher.finish()
        for file in files:
            rewrite_safetensors_metadata(folder / file.name, _header_metadata(metadata))
        if len(files) > 1:
            write_json(
                folder / f"{WEIGHTS_STEM}.safetensors.index.json",
                {
                    "metadata": {"total_size": sum(e.nbytes for e in entries)},
                    "weight_map": {t.name: f.name for f in files for t in f.tensors},
                },
            )
        write_json(folder / METADATA_FILE, metadata)


def _ensure_finite_matrix(tensor: LazyTensor, matrix: torch.Tensor) -> None:
    ensure_finite(tensor, matrix, 0, tensor.rows)


def _terms(tensor: LazyTensor | None, scale: float) -> list[tuple[float, LazyTensor]]:
    if tensor is None:
        return []
    if isinstance(tensor, Combination):
        return [(scale * c, t) for c, t in tensor.terms]
    return [(scale, tensor)]


def cosine(a: CapabilityVector, b: CapabilityVector) -> float:
    """Cosine similarity over the tensors both vectors hold."""
    products = a.tensor_products(b).values()
    aa, bb, ab = (sum(p[i] for p in products) for i in range(3))
    denominator = math.sqrt(aa * bb)
    return ab / denominator if denominator else 0.0


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {
        "bf16": "bfloat16",
        "fp16": "float16",
        "half": "float16",
        "fp32": "float32",
        "float": "float32",
        "fp64": "float64",
        "double": "float64",
    }
    parsed = getattr(torch, aliases.get(dtype.lower(), dtype.lower()), None)
    if not isinstance(parsed, torch.dtype) or not parsed.is_floating_point or parsed not in SAFETENSORS_DTYPES.values():
        raise CapvectorError(f"unknown dtype {dtype!r}; use one of bfloat16, float16, float32, float64")
    return parsed


def _shard(entries: list[OutputTensor], max_shard_bytes: int) -> list[OutputFile]:
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    if len(shards) == 1:
        return [OutputFile(f"{WEIGHTS_STEM}.safetensors", shards[0], {})]
    count = len(shards)
    return [
        OutputFile(f"{WEIGHTS_STEM}-{i + 1:05d}-of-{count:05d}.safetensors", shard, {})
        for i, shard in enumerate(shards)
    ]


def _header_metadata(metadata: dict[str, Any]) -> dict[str, str]:
    return {"format": "pt", "capvector": json.dumps(metadata, separators=(",", ":"))}


def _worst_case(
    metadata: dict[str, Any], tensors: Mapping[str, LazyTensor], factorizations: Mapping[str, Factorization]
) -> dict[str, Any]:
    """The metadata with the longest values it can end with, to reserve header space before they are known."""
    longest = -1.2345678901234567e-300
    sources = {
        role: {**info, "sha256": {f: "f" * 64 for f in info.get("files", [])}}
        for role, info in metadata.get("sources", {}).items()
    }
    return {
        **metadata,
        "sources": sources,
        "norms": {name: longest for name in tensors},
        "global_norm": longest,
        "lowrank_relative_error": {name: longest for name in factorizations},
        "global_lowrank_relative_error": longest,
    }


class _SourceHasher:
    """SHA-256 of every source file, computed in a background thread while the vector is written."""

    def __init__(self, sources: dict[str, Any]) -> None:
        self.sources = sources
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for info in self.sources.values():
                folder = Path(info["path"])
                folder = folder if folder.is_dir() else folder.parent
                info["sha256"] = {name: sha256_file(folder / name) for name in info.get("files", [])}
        except OSError as error:
            self.error = error

    def finish(self) -> None:
        self.thread.join()
        if self.error:
            raise CapvectorError(f"could not hash a source file: {self.error}")


def _source_info(checkpoint: Checkpoint) -> dict[str, Any]:
    folder = checkpoint.root if checkpoint.is_folder else checkpoint.root.parent
    return {
        "path": str(checkpoint.root.resolve()),
        "files": [os.path.relpath(p, folder) for p in checkpoint.weight_paths()],
    }


# --- extraction ---------------------------------------------------------------------------------------------------


def check_patterns(patterns: Iterable[tuple[str, str]], names: Collection[str], where: str) -> None:
    """Every (option, pattern) must match at least one of `names`: a pattern that matches nothing is a typo."""
    for option, pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            example = min(names, key=len, default="")
            raise CapvectorError(
                f"{option} '{pattern}' matches no tensor of {where}; check the pattern (names look like '{example}')"
            )


def _selected(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    if include and not any(fnmatch.fnmatchcase(name, pattern) for pattern in include):
        return False
    return not any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)


def exact_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype that holds a difference of two `dtype` tensors as computed in float32: float32 for the half types,
    so that a merge rounds once, not twice."""
    return torch.promote_types(dtype, torch.float32)


def difference(
    minuend: Checkpoint,
    subtrahend: Checkpoint,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    dtype: torch.dtype | str | None = None,
    roles: tuple[str, str] = ("aux", "sft"),
    formula: str = "",
) -> CapabilityVector:
    """minuend - subtrahend over the floating-point tensors both hold with equal shapes; the rest is listed."""
    dtype = parse_dtype(dtype) if dtype is not None else None
    check_patterns(
        [*(("--include", p) for p in include), *(("--exclude", p) for p in exclude)],
        minuend.keys() | subtrahend.keys(),
        f"{minuend.root} or {subtrahend.root}",
    )
    skipped: dict[str, list[str]] = {
        f"only_in_{roles[0]}": sorted(minuend.keys() - subtrahend.keys()),
        f"only_in_{roles[1]}": sorted(subtrahend.keys() - minuend.keys()),
        "excluded": [],
        "not_floating_point": [],
    }
    tensors: dict[str, LazyTensor] = {}
    for name in minuend:
        if name not in subtrahend:
            continue
        a, b = minuend.lazy(name), subtrahend.lazy(name)
        if not _selected(name, include, exclude):
            skipped["excluded"].append(name)
            continue
        if tuple(a.shape) != tuple(b.shape):
            raise CapvectorError(
                f"shape mismatch for tensor '{name}': {list(a.shape)} in {a.origin} but {list(b.shape)} in {b.origin}; "
                f"check that both are finetunes of the same model, or leave it out with --exclude '{name}'"
            )
        if not (a.dtype.is_floating_point and b.dtype.is_floating_point):
            skipped["not_floating_point"].append(name)
            continue
        if a.dtype != b.dtype and dtype is None:
            raise CapvectorError(
                f"dtype mismatch for tensor '{name}': {a.dtype} in {a.origin} but {b.dtype} in {b.origin}; "
                "pass --dtype (Python: dtype=) to choose the vector's dtype"
            )
        tensors[name] = Combination([(1.0, a), (-1.0, b)], dtype=dtype or exact_dtype(a.dtype))
    if not tensors:
        raise CapvectorError(
            f"no tensor is shared by {minuend.root} and {subtrahend.root} (after include/exclude); "
            "check the paths and the patterns"
        )
    metadata = {
        "formula": formula,
        "sources": {roles[0]: _source_info(minuend), roles[1]: _source_info(subtrahend)},
        "include": list(include),
        "exclude": list(exclude),
        "skipped": skipped,
    }
    return CapabilityVector(tensors, metadata, [minuend, subtrahend])


def extract(
    aux: str | os.PathLike[str],
    sft: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    pretrained: str | os.PathLike[str] | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    dtype: torch.dtype | str | None = None,
    rank: int | None = None,
    task_vector_output: str | os.PathLike[str] | None = None,
    hash_sources: bool = True,
) -> CapabilityVector:
    """gamma = theta_ao - theta_ft. LoRA adapter folders are applied to their base (or to `pretrained`).

    With `output`, the vector is saved there and returned opened from disk; otherwise it is returned lazy. With
    `task_vector_output` (needs `pretrained`), tau = theta_ft - theta_pt is saved there too. The outputs appear
    together, only once both are complete.
    """
    opened: list[Checkpoint] = []

    def checkpoint(path: str | os.PathLike[str], base: str | os.PathLike[str] | None) -> Checkpoint:
        opened.append(open_checkpoint(path, base=base))
        return opened[-1]

    try:
        gamma = difference(
            checkpoint(aux, pretrained),
            checkpoint(sft, pretrained),
            include=include,
            exclude=exclude,
            dtype=dtype,
            formula="gamma = theta_ao - theta_ft",
        )
        outputs = [] if output is None else [(gamma, Path(output))]
        if task_vector_output is not None:
            if pretrained is None:
                raise CapvectorError("a task vector (tau = theta_ft - theta_pt) needs --pretrained DIR")
            tau = difference(
                checkpoint(sft, pretrained),
                checkpoint(pretrained, None),
                include=include,
                exclude=exclude,
                dtype=dtype,
                roles=("sft", "pretrained"),
                formula="tau = theta_ft - theta_pt",
            )
            outputs.append((tau, Path(task_vector_output)))
        _write_together(outputs, dtype=dtype, rank=rank, hash_sources=hash_sources)
    except BaseException:
        for opened_checkpoint in opened:
            opened_checkpoint.close()
        raise
    if task_vector_output is not None:
        tau.close()
    if output is None:
        return gamma
    gamma.close()
    return open_vector(output)


def _write_together(outputs: list[tuple[CapabilityVector, Path]], **options: Any) -> None:
    """Write each vector to its output path, all of them renamed into place only once every one is complete."""
    paths = [path.resolve() for _, path in outputs]
    if any(a.is_relative_to(b) for a, b in itertools.permutations(paths, 2)):
        raise CapvectorError("the vector and the task vector need two separate output folders (-o, --task-vector)")
    inputs = [p for vector, _ in outputs for p in vector.input_paths()]
    with contextlib.ExitStack() as stack:
        folders = [stack.enter_context(atomic_output(path, inputs)) for _, path in outputs]
        for (vector, _), folder in zip(outputs, folders, strict=True):
            vector.write(folder, **options)


def open_vector(path: str | os.PathLike[str]) -> CapabilityVector:
    """A saved capability vector (or any checkpoint, read as a dense vector), with low-rank factors recombined."""
    path = Path(path)
    checkpoint = open_checkpoint(path)
    try:
        tensors: dict[str, LazyTensor] = {}
        for name, tensor in checkpoint.tensors.items():
            if name.endswith(RIGHT):
                continue
            if name.endswith(LEFT):
                base = name.removesuffix(LEFT)
                right = checkpoint.tensors.get(base + RIGHT)
                if right is None:
                    raise CapvectorError(
                        f"{path}: '{name}' has no matching '{base + RIGHT}'; the vector file is damaged"
                    )
                shape = (tensor.shape[0] if tensor.shape else 0, right.shape[-1] if right.shape else 0)
                tensors[base] = LowRankTensor(base, tensor, right, tensor.dtype, shape)
            else:
                tensors[name] = tensor
        metadata = _vector_metadata(path, checkpoint)
    except BaseException:
        checkpoint.close()
        raise
    return CapabilityVector(tensors, metadata, [checkpoint])


def _vector_metadata(path: Path, checkpoint: Checkpoint) -> dict[str, Any]:
    """capvector.json, else the copy in the first file's header, else nothing (a checkpoint read as a vector)."""
    if path.is_dir() and (path / METADATA_FILE).is_file():
        metadata = load_json(path / METADATA_FILE, "vector metadata")
    else:
        header = checkpoint.files[0].metadata or {} if checkpoint.files else {}
        try:
            metadata = json.loads(header["capvector"]) if "capvector" in header else {}
        except (ValueError, RecursionError) as error:
            raise CapvectorError(f"{path}: the vector metadata in its header is not valid JSON ({error})") from None
    if not isinstance(metadata, dict):
        raise CapvectorError(f"{path}: the vector metadata is not a JSON object; the vector file is damaged")
    return metadata
