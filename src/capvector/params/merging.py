"""theta_meta = theta_pt + alpha * gamma, written as a complete checkpoint in the pretrained model's own layout."""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from capvector.errors import CapvectorError
from capvector.files import write_json
from capvector.params.checkpoints import Checkpoint, open_checkpoint, read_index, within
from capvector.params.lazy import Combination, LazyTensor
from capvector.params.streaming import OutputFile, OutputTensor, atomic_output, write_files
from capvector.params.vectors import CapabilityVector, check_patterns, open_vector

MERGE_RECORD = "capvector_merge.json"
SKIPPED_NAMES = {".git", ".cache", ".gitattributes"}


def alpha_for(name: str, alpha: float, patterns: Mapping[str, float]) -> float:
    """The scale of tensor `name`: the last pattern that matches it, else the global alpha."""
    value = alpha
    for pattern, pattern_alpha in patterns.items():
        if fnmatch.fnmatchcase(name, pattern):
            value = pattern_alpha
    return value


def parse_alpha_arguments(values: list[str]) -> tuple[float, dict[str, float]]:
    """CLI --alpha values: a number sets the global alpha, GLOB=VALUE a per-tensor one (later ones win)."""
    alpha, patterns = 1.0, {}
    for value in values:
        pattern, _, number = value.rpartition("=")
        try:
            parsed = float(number)
        except ValueError:
            raise CapvectorError(
                f"--alpha {value!r}: expected a number or GLOB=NUMBER (e.g. 'model.layers.*=0.5')"
            ) from None
        if pattern:
            patterns[pattern] = parsed
        else:
            alpha = parsed
    return alpha, patterns


def merge(
    pretrained: str | os.PathLike[str] | Checkpoint,
    vector: str | os.PathLike[str] | CapabilityVector,
    output: str | os.PathLike[str],
    *,
    alpha: float = 1.0,
    alpha_patterns: Mapping[str, float] | None = None,
) -> Path:
    """Write theta_pt + alpha * gamma to `output`: same files, shards and non-weight files as `pretrained`, and an
    index that names the output's own shards.

    Arithmetic in float32, rounded once to each tensor's pretrained dtype: with a float32 vector (extract's default)
    the result is, bit for bit, (pt.float() + alpha * (ao.float() - ft.float())).to(pt.dtype). Tensors the vector does
    not hold, or whose alpha is 0, are copied byte for byte.
    """
    patterns = dict(alpha_patterns or {})
    for value in (alpha, *patterns.values()):
        if not math.isfinite(value):
            raise CapvectorError(f"--alpha {value}: alpha must be a finite number")
    base = pretrained if isinstance(pretrained, Checkpoint) else open_checkpoint(pretrained)
    try:
        gamma = vector if isinstance(vector, CapabilityVector) else open_vector(vector)
    except BaseException:
        if base is not pretrained:
            base.close()
        raise
    try:
        unknown = sorted(gamma.keys() - base.keys())
        if unknown:
            raise CapvectorError(
                f"the vector holds '{unknown[0]}' ({len(unknown)} tensors in all) that {base.root} lacks; "
                "is --pretrained the model the vector was extracted from?"
            )
        check_patterns([("--alpha", p) for p in patterns], gamma.keys(), "the vector")
        scales = {name: alpha_for(name, alpha, patterns) for name in gamma}
        record = _record(base, gamma, alpha, patterns)
        header_record = {"capvector_merge": json.dumps(record, separators=(",", ":"))}
        files = []
        for file in base.files:
            tensors = []
            for name in file.keys:
                source = base.lazy(name)
                if scales.get(name, 0.0) != 0.0:
                    source = _merged(source, gamma.lazy(name), scales[name])
                tensors.append(OutputTensor(name, source, source.dtype))
            metadata = {**(file.metadata or {}), **header_record} if file.format == "safetensors" else None
            files.append(OutputFile(file.name, tensors, metadata, file.format))
        weights = _weights_checkpoint(base)
        inputs = base.input_paths() + gamma.input_paths()
        description = f"merging into {Path(output).name}"
        with atomic_output(Path(output), inputs, single_file=not weights.is_folder) as temporary:
            if not weights.is_folder:
                files[0].name = temporary.name
                write_files(temporary.parent, files, statistics=False, description=description)
            else:
                write_files(temporary, files, statistics=False, description=description)
                skipped = {file.name for file in files} | ({weights.index_name} if weights.index_name else set())
                _copy_other_files(weights.root, temporary, skipped)
                if weights.index_name:
                    _write_index(weights.root / weights.index_name, temporary / weights.index_name, files)
                write_json(temporary / MERGE_RECORD, record)
        return Path(output)
    finally:
        if gamma is not vector:
            gamma.close()
        if base is not pretrained:
            base.close()


def _merged(pretrained: LazyTensor, gamma: LazyTensor, alpha: float) -> LazyTensor:
    if not pretrained.dtype.is_floating_point:
        raise CapvectorError(
            f"tensor '{pretrained.name}' is {pretrained.dtype} in {pretrained.origin}, not floating point, but the "
            f"vector holds it; leave it out of the vector (extract --exclude '{pretrained.name}')"
        )
    return Combination([(1.0, pretrained), (alpha, gamma)], dtype=pretrained.dtype)


def _weights_checkpoint(checkpoint: Checkpoint) -> Checkpoint:
    """The checkpoint whose files hold the weights: a LoRA adapter's base, else the checkpoint itself."""
    return _weights_checkpoint(checkpoint.base) if checkpoint.base else checkpoint


def _record(base: Checkpoint, gamma: CapabilityVector, alpha: float, patterns: Mapping[str, float]) -> dict[str, Any]:
    return {
        "formula": "theta_meta = theta_pt + alpha * gamma",
        "pretrained": str(base.root.resolve()),
        "alpha": alpha,
        "alpha_patterns": dict(patterns),
        "vector": gamma.metadata,
    }


def _write_index(source: Path, destination: Path, files: list[OutputFile]) -> None:
    """The pretrained index, its weight map and total size those of the files written (and nothing else)."""
    index = read_index(source)
    metadata = index.get("metadata")
    index["metadata"] = {
        **(metadata if isinstance(metadata, dict) else {}),
        "total_size": sum(t.nbytes for f in files for t in f.tensors),
    }
    index["weight_map"] = {t.name: f.name for f in files for t in f.tensors}
    write_json(destination, index)


def _copy_other_files(source: Path, destination: Path, skipped: set[str]) -> None:
    """Everything but the weights (config.json, tokenizer and processor files, normalization statistics), in the same
    subfolders. Only files inside `source` are read: a link that leads out of it (or to a folder) is recreated as a
    link to the same target."""
    for folder, subfolders, names in os.walk(source):
        subfolders[:] = [name for name in subfolders if name not in SKIPPED_NAMES]
        for name in [*subfolders, *names]:
            path = Path(folder) / name
            relative = path.relative_to(source)
            if name in SKIPPED_NAMES or relative.as_posix() in skipped:
                continue
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.is_symlink() and not (path.is_file() and within(source, path)):
                target.symlink_to(os.path.realpath(path))
            elif path.is_dir():
                target.mkdir(exist_ok=True)
            else:
                shutil.copy2(path, target)
