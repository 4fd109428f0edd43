"""theta_meta = theta_pt + alpha * gamma, written as a complete checkpoint in the pretrained model's own layout."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from capvector.errors import CapvectorError
from capvector.params.checkpoints import Checkpoint, open_checkpoint
from capvector.params.lazy import Combination
from capvector.params.streaming import OutputFile, OutputTensor, atomic_output, write_files
from capvector.params.vectors import CapabilityVector, open_vector

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
    pretrained: str | os.PathLike | Checkpoint,
    vector: str | os.PathLike | CapabilityVector,
    output: str | os.PathLike,
    *,
    alpha: float = 1.0,
    alpha_patterns: Mapping[str, float] | None = None,
) -> Path:
    """Write theta_pt + alpha * gamma to `output`: same files, shards, index and non-weight files as `pretrained`.

    Arithmetic in float32, stored in each tensor's pretrained dtype. Tensors the vector does not hold, or whose alpha
    is 0, are copied byte for byte.
    """
    patterns = dict(alpha_patterns or {})
    base = pretrained if isinstance(pretrained, Checkpoint) else open_checkpoint(pretrained)
    gamma = vector if isinstance(vector, CapabilityVector) else open_vector(vector)
    try:
        unknown = sorted(gamma.keys() - base.keys())
        if unknown:
            raise CapvectorError(
                f"the vector holds '{unknown[0]}' ({len(unknown)} tensors in all) that {base.root} lacks; "
                "is --pretrained the model the vector was extracted from?"
            )
        scales = {name: alpha_for(name, alpha, patterns) for name in gamma}
        record = _record(base, gamma, alpha, patterns)
        header_record = {"capvector_merge": json.dumps(record, separators=(",", ":"))}
        files = []
        for file in base.files:
            tensors = []
            for name in file.keys:
                source = base.lazy(name)
                if scales.get(name, 0.0) != 0.0:
                    source = Combination([(1.0, source), (scales[name], gamma.lazy(name))], dtype=source.dtype)
                tensors.append(OutputTensor(name, source, source.dtype))
            metadata = {**(file.metadata or {}), **header_record} if file.format == "safetensors" else None
            files.append(OutputFile(file.name, tensors, metadata, file.format))
        output = Path(output)
        if not base.is_folder:
            files[0].name = output.name
        inputs = base.input_paths() + [p for c in gamma._checkpoints for p in c.input_paths()]
        with atomic_output(output, inputs, single_file=not base.is_folder) as folder:
            write_files(folder, files, statistics=False, description=f"merging into {output.name}")
            if base.is_folder:
                _copy_other_files(_weights_folder(base), folder, base)
                (folder / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        return output
    finally:
        if not isinstance(vector, CapabilityVector):
            gamma.close()
        if not isinstance(pretrained, Checkpoint):
            base.close()


def _weights_folder(checkpoint: Checkpoint) -> Path:
    return _weights_folder(checkpoint.base) if checkpoint.base else checkpoint.root


def _record(base: Checkpoint, gamma: CapabilityVector, alpha: float, patterns: Mapping[str, float]) -> dict:
    return {
        "formula": "theta_meta = theta_pt + alpha * gamma",
        "pretrained": str(base.root.resolve()),
        "alpha": alpha,
        "alpha_patterns": dict(patterns),
        "vector": gamma.metadata,
    }


def _copy_other_files(source: Path, destination: Path, checkpoint: Checkpoint) -> None:
    """Everything but the weights: config.json, tokenizer and processor files, normalization statistics."""
    weights = {file.name for file in checkpoint.files} | ({checkpoint.index_name} if checkpoint.index_name else set())
    for entry in source.iterdir():
        if entry.name in weights or entry.name in SKIPPED_NAMES:
            continue
        if entry.is_dir():
            shutil.copytree(entry, destination / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, destination / entry.name)
    if checkpoint.index_name:  # the index as it was: same weight map; its metadata (total_size) is unchanged too
        shutil.copy2(source / checkpoint.index_name, destination / checkpoint.index_name)
