"""Reading checkpoints tensor by tensor: Hugging Face folders (single or sharded safetensors), single safetensors files,
PyTorch state dicts (only through torch.load(weights_only=True)), and PEFT LoRA adapters applied to their base.

`open_checkpoint(path)` returns a `Checkpoint`: a read-only mapping from parameter name to tensor whose values are
read from disk only when asked for, plus the file layout, so that a merged model can be written in the same layout.

Everything is checked before any tensor data is read, and every problem is a CapvectorError naming the file and the
fix: a safetensors header as strictly as the safetensors library checks it (plus duplicate names and absurd
dimensions, which it lets through), an index's file names against the folder it lies in, an adapter's config against
its tensors.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from capvector.errors import CapvectorError
from capvector.params.lazy import (
    DTYPE_NAMES,
    SAFETENSORS_DTYPES,
    Combination,
    InMemoryTensor,
    LazyTensor,
    LazyTensorMapping,
    LoraDelta,
    StoredTensor,
)

SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
ADAPTER_CONFIG = "adapter_config.json"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
MAX_DIMENSION = 1 << 40  # longer than any real tensor's: a larger one is a corrupted header, even with 0 elements
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8}  # peft.LoraConfig's defaults, used when adapter_config.json omits them


@dataclass
class WeightFile:
    """One weight file of a checkpoint: its name relative to the checkpoint folder, its tensors in stored order."""

    name: str
    keys: list[str]
    metadata: dict[str, str] | None = None
    format: str = "safetensors"  # or "torch"


@dataclass
class Checkpoint(LazyTensorMapping):
    """A lazily read checkpoint. `checkpoint[name]` reads one tensor; `checkpoint.lazy(name)` gives it unread."""

    root: Path  # a folder, or the file itself for single-file checkpoints
    files: list[WeightFile]
    tensors: dict[str, LazyTensor]
    index_name: str | None = None  # e.g. "model.safetensors.index.json" for sharded checkpoints
    base: Checkpoint | None = None  # the base model of a LoRA adapter
    sources: list[Path] = field(default_factory=list)  # every file whose bytes make up the tensors
    _fds: list[int] = field(default_factory=list, repr=False)

    @property
    def is_folder(self) -> bool:
        return self.root.is_dir()

    def weight_paths(self) -> list[Path]:
        """Every file whose bytes make up this checkpoint's tensors (the base's too, for an adapter)."""
        return list(self.sources)

    def input_paths(self) -> list[Path]:
        """The paths an output must stay out of: the weight files and the checkpoint folders."""
        return self.weight_paths() + [self.root] + (self.base.input_paths() if self.base else [])

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        if self.base:
            self.base.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- safetensors headers --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a safetensors header; begin and end are offsets into the data section."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


class _DuplicateKey(ValueError):
    pass


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook: a name given twice is an error (Python's json, and safetensors, keep the last)."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def parse_json(raw: bytes, path: Path, what: str) -> Any:
    """The JSON value in `raw` (the contents of `path`, which is `what`), as strict as serde_json, which the
    safetensors library uses: UTF-8, no name given twice, no lone surrogate escapes; a CapvectorError otherwise."""
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=_refuse_duplicates)
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # a lone surrogate ("\ud800") cannot be encoded
    except _DuplicateKey as key:
        raise CapvectorError(f"{path}: {what} names '{key}' twice; the file is corrupted") from None
    except (UnicodeError, ValueError, RecursionError) as error:  # a JSONDecodeError is a ValueError
        raise CapvectorError(f"{path}: {what} is not valid JSON ({error}); the file is corrupted") from None
    return value


def load_json(path: Path, what: str) -> Any:
    """The JSON value in the file `path` (see parse_json)."""
    return parse_json(path.read_bytes(), path, what)


def _naturals(value: object) -> list[int] | None:
    """`value` if it is a list of non-negative integers (not booleans), else None."""
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return value
    return None


def _header_entry(path: Path, name: str, entry: object) -> HeaderEntry:
    def corrupted(problem: str) -> CapvectorError:
        return CapvectorError(f"{path}: tensor '{name}' {problem}; the file is corrupted or not safetensors")

    if not isinstance(entry, dict):
        raise corrupted("is not described by a JSON object")
    dtype_name = entry.get("dtype")
    dtype = SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise CapvectorError(
            f"{path}: tensor '{name}' has unsupported dtype {dtype_name!r}; capvector reads "
            f"{', '.join(SAFETENSORS_DTYPES)}"
        )
    shape, offsets = _naturals(entry.get("shape")), _naturals(entry.get("data_offsets"))
    if shape is None:
        raise corrupted(f"has shape {entry.get('shape')!r}, not a list of non-negative integers")
    if offsets is None or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise corrupted(f"has data_offsets {entry.get('data_offsets')!r}, not [begin, end] with 0 <= begin <= end")
    if any(dim > MAX_DIMENSION for dim in shape):
        raise corrupted(f"has shape {shape}, with a dimension over 2^40 that no real tensor has")
    expected = torch.empty((), dtype=dtype).element_size() * math.prod(shape)
    if offsets[1] - offsets[0] != expected:
        raise corrupted(f"is {offsets[1] - offsets[0]} bytes, its shape {shape} needs {expected}")
    return HeaderEntry(dtype, tuple(shape), offsets[0], offsets[1])


def read_safetensors_header(path: Path) -> tuple[dict[str, HeaderEntry], dict[str, str] | None, int]:
    """(tensor entries in data order, __metadata__, offset of the data section), validated without reading any tensor
    data: the tensors must tile the data section exactly, in order, as the safetensors library requires."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CapvectorError(f"{path}: not a safetensors file (only {size} bytes); the file is truncated")
        header_size = int.from_bytes(prefix, "little")
        if header_size > min(size - 8, MAX_HEADER_BYTES):
            raise CapvectorError(
                f"{path}: safetensors header claims {header_size} bytes but the file has {size}; "
                "the file is truncated or not safetensors"
            )
        raw = f.read(header_size)
    header = parse_json(raw, path, "safetensors header")
    if not isinstance(header, dict):
        raise CapvectorError(f"{path}: safetensors header is not a JSON object; the file is corrupted")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CapvectorError(
            f"{path}: safetensors __metadata__ must map names to strings (the safetensors library refuses anything "
            "else); re-save the file with string metadata"
        )
    entries = {name: _header_entry(path, name, entry) for name, entry in header.items()}
    ordered = dict(sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)))
    position, data_size = 0, size - 8 - header_size
    for name, entry in ordered.items():
        if entry.begin != position:
            raise CapvectorError(
                f"{path}: tensor '{name}' starts at data byte {entry.begin}, where {position} was expected (tensors "
                "overlap or leave a gap); the file is corrupted"
            )
        if entry.end > data_size:
            raise CapvectorError(
                f"{path}: file is truncated: tensor '{name}' ends at byte {8 + header_size + entry.end} of {size}; "
                "re-download or re-save this checkpoint"
            )
        position = entry.end
    if position != data_size:
        raise CapvectorError(
            f"{path}: {data_size - position} bytes follow the last tensor's data; the file is corrupted "
            "(the safetensors library refuses it too)"
        )
    return ordered, metadata, 8 + header_size


def _open_safetensors_file(
    path: Path, name: str, checkpoint_fds: list[int]
) -> tuple[WeightFile, dict[str, LazyTensor]]:
    header, metadata, data_start = read_safetensors_header(path)
    fd = os.open(path, os.O_RDONLY)
    checkpoint_fds.append(fd)
    tensors: dict[str, LazyTensor] = {
        key: StoredTensor(key, str(path), fd, data_start + entry.begin, entry.dtype, entry.shape)
        for key, entry in header.items()
    }
    return WeightFile(name, list(header), metadata, "safetensors"), tensors


# --- PyTorch state dicts --------------------------------------------------------------------------------------------


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as error:  # torch raises several types for a bad or unsafe file
        first_line = (str(error).splitlines() or [""])[0][:200]
        raise CapvectorError(
            f"{path}: cannot be read as a PyTorch state dict with weights_only=True ({type(error).__name__}: "
            f"{first_line}); convert it to safetensors, or re-save it with torch.save(state_dict)"
        ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict) and len(state) <= 4:
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CapvectorError(f"{path}: is not a state dict (a mapping from names to tensors)")
    for key, tensor in state.items():
        if not isinstance(key, str) or tensor.layout != torch.strided or tensor.dtype not in DTYPE_NAMES:
            raise CapvectorError(
                f"{path}: entry {key!r} is a {tensor.layout} {tensor.dtype} tensor; capvector reads dense tensors "
                f"of the dtypes safetensors stores, under string names"
            )
    return state


def _open_torch_file(path: Path, name: str) -> tuple[WeightFile, dict[str, LazyTensor]]:
    state = _load_torch_file(path)
    tensors: dict[str, LazyTensor] = {key: InMemoryTensor(key, tensor, str(path)) for key, tensor in state.items()}
    return WeightFile(name, list(state), None, "torch"), tensors


# --- folders, indexes -----------------------------------------------------------------------------------------------


def within(folder: Path, path: Path) -> bool:
    """Whether `path`, links resolved, lies in `folder`, or in the blob store of the Hugging Face cache repository
    that `folder` is a snapshot of (a snapshot's files are links to ../../blobs/HASH)."""
    real, home = path.resolve(), folder.resolve()
    roots = [home, home.parent.parent / "blobs"] if home.parent.name == "snapshots" else [home]
    return any(real.is_relative_to(root) for root in roots)


def member(folder: Path, name: str, listed_in: str | None = None) -> Path:
    """folder / name, for a name a checkpoint lists; refused if it leads out of the folder (an absolute name, a `..`,
    a link to elsewhere), so that a checkpoint can make capvector read only its own files."""
    where = f" (named in {listed_in})" if listed_in else ""
    relative = PurePosixPath(name)
    if not relative.parts or "\0" in name:
        raise CapvectorError(f"{folder}: {name!r}{where} is not a file name; fix the index")
    path = folder / relative
    if relative.is_absolute() or ".." in relative.parts or not within(folder, path):
        raise CapvectorError(
            f"{folder}: weight file '{name}'{where} lies outside the checkpoint folder (it resolves to "
            f"{path.resolve()}); a checkpoint may only name files inside its folder: copy the file in, or fix the index"
        )
    return path


def _open_files(
    root: Path, names: list[str], index_name: str | None = None, weight_map: dict[str, str] | None = None
) -> Checkpoint:
    """The checkpoint made of the weight files `names` (relative to `root`'s folder, as an index gives them)."""
    folder = root if root.is_dir() else root.parent
    checkpoint = Checkpoint(root=root, files=[], tensors={}, index_name=index_name)
    try:
        for name in names:
            path = member(folder, name, index_name) if root.is_dir() else root
            if not path.is_file():
                where = f" (listed in {index_name})" if index_name else ""
                raise CapvectorError(f"{path}: weight file is missing{where}; the checkpoint is incomplete")
            relative = str(PurePosixPath(name))
            if name.endswith(SAFETENSORS_SUFFIX):
                weight_file, tensors = _open_safetensors_file(path, relative, checkpoint._fds)
            else:
                weight_file, tensors = _open_torch_file(path, relative)
            twice = next((key for key in tensors if key in checkpoint.tensors), None)
            if twice is not None:
                raise CapvectorError(
                    f"{path}: tensor '{twice}' is stored a second time here (first in "
                    f"{checkpoint.tensors[twice].origin}); each tensor must be stored once: fix the index, or remove "
                    "the extra file"
                )
            if weight_map is not None:
                listed = {key for key, shard in weight_map.items() if shard == name}
                missing = sorted(listed - tensors.keys())
                if missing:
                    raise CapvectorError(
                        f"{path}: tensor '{missing[0]}' is listed in {index_name} but missing from this shard "
                        f"({len(missing)} missing); the shard or the index is from another checkpoint"
                    )
            checkpoint.files.append(weight_file)
            checkpoint.tensors.update(tensors)
            checkpoint.sources.append(path)
        if index_name:
            checkpoint.sources.append(folder / index_name)
    except BaseException:
        checkpoint.close()
        raise
    return checkpoint


def read_index(index_path: Path) -> dict[str, Any]:
    """A shard index: a JSON object whose 'weight_map' maps tensor names to shard file names."""
    index = load_json(index_path, "shard index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise CapvectorError(
            f"{index_path}: not a valid shard index: needs a non-empty 'weight_map' object from tensor names to "
            "shard file names"
        )
    return dict(index)


def _open_index(index_path: Path) -> Checkpoint:
    weight_map = {key: str(PurePosixPath(shard)) for key, shard in read_index(index_path)["weight_map"].items()}
    shards = list(dict.fromkeys(weight_map.values()))  # "./a" and "a" are one file
    return _open_files(index_path.parent, shards, index_path.name, weight_map)


def _find_weights(folder: Path) -> Path:
    """The weight file or shard index of a Hugging Face-style folder, preferring safetensors as transformers does."""
    candidates = [
        *sorted(folder.glob("*.safetensors.index.json")),
        folder / "model.safetensors",
        *sorted(folder.glob("*.safetensors")),
        *sorted(folder.glob("*.bin.index.json")),
        folder / "pytorch_model.bin",
        *[path for suffix in TORCH_SUFFIXES for path in sorted(folder.glob(f"*{suffix}"))],
    ]
    for candidate in candidates:
        if candidate.is_file():
            return member(folder, candidate.name)
    present = ", ".join(sorted(p.name for p in folder.iterdir())[:12]) or "nothing"
    raise CapvectorError(
        f"{folder}: no weights found (looked for *.safetensors.index.json, model.safetensors, *.safetensors, "
        f"pytorch_model.bin[.index.json], *.bin, *.pt); the folder holds: {present}"
    )


def open_checkpoint(
    path: str | os.PathLike[str], base: str | os.PathLike[str] | Checkpoint | None = None
) -> Checkpoint:
    """Open a checkpoint folder or file. A PEFT adapter folder is applied to `base` (or to the local folder its
    adapter_config.json names as base_model_name_or_path)."""
    path = Path(path)
    if not path.exists():
        raise CapvectorError(f"{path}: no such file or folder")
    if path.is_dir() and (path / ADAPTER_CONFIG).is_file():
        return open_lora_adapter(path, base)
    weights = _find_weights(path) if path.is_dir() else path
    if weights.name.endswith(".index.json"):
        return _open_index(weights)
    if not weights.name.endswith((SAFETENSORS_SUFFIX, *TORCH_SUFFIXES)):
        raise CapvectorError(f"{path}: unknown checkpoint format; expected .safetensors, .bin, .pt or a folder")
    return _open_files(path, [weights.name])


# --- PEFT LoRA adapters -------------------------------------------------------------------------------------------

_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?$"
)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name suffix as a regular expression."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_rank(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _adapter_config(adapter: Path) -> dict[str, Any]:
    """adapter_config.json, with every field capvector uses checked as PEFT's LoraConfig would take it."""
    path = adapter / ADAPTER_CONFIG
    config = load_json(path, "adapter config")

    def refuse(problem: str) -> CapvectorError:
        return CapvectorError(f"{path}: {problem}; fix the config or re-save the adapter with peft")

    if not isinstance(config, dict):
        raise refuse("not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise CapvectorError(
            f"{adapter}: PEFT type {config.get('peft_type')!r} is not supported; only LoRA adapters are"
        )
    if config.get("use_dora"):
        raise CapvectorError(f"{adapter}: DoRA adapters are not supported; merge it with peft's merge_and_unload first")
    config = {**PEFT_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    if not _is_rank(config["r"]):
        raise refuse(f"'r' is {config['r']!r}, not a positive integer")
    if not _is_number(config["lora_alpha"]):
        raise refuse(f"'lora_alpha' is {config['lora_alpha']!r}, not a number")
    for flag in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(config.get(flag, False), bool):
            raise refuse(f"'{flag}' is {config[flag]!r}, not true or false")
    for key, valid, kind in (("rank_pattern", _is_rank, "positive integers"), ("alpha_pattern", _is_number, "numbers")):
        patterns = config.get(key, {})
        if not isinstance(patterns, dict) or not all(valid(v) for v in patterns.values()):
            raise refuse(f"'{key}' must map module-name patterns to {kind}")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as error:
                raise refuse(f"'{key}' pattern {pattern!r} is not a regular expression ({error})") from None
    if not isinstance(config.get("base_model_name_or_path", ""), str):
        raise refuse("'base_model_name_or_path' is not a string")
    return config


def _resolve_base(
    adapter: Path, config: dict[str, Any], base: str | os.PathLike[str] | Checkpoint | None
) -> Checkpoint:
    if isinstance(base, Checkpoint):
        return base
    if base is None:
        named = config.get("base_model_name_or_path")
        if not named or not Path(named).exists():
            raise CapvectorError(
                f"{adapter}: LoRA adapter's base {named!r} is not a local folder; pass the base checkpoint "
                "with --pretrained DIR (Python: base=...)"
            )
        return open_checkpoint(named)
    return open_checkpoint(base)


def open_lora_adapter(adapter: Path, base: str | os.PathLike[str] | Checkpoint | None = None) -> Checkpoint:
    """The full weights of base + adapter: each adapted matrix is base + scaling * B @ A, read row chunk by row chunk,
    with PEFT's scaling: lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), per module through the patterns."""
    config = _adapter_config(adapter)
    weights = next(
        (adapter / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (adapter / n).is_file()), None
    )
    if weights is None:
        raise CapvectorError(f"{adapter}: adapter_config.json found but no adapter_model.safetensors (or .bin)")
    adapter_checkpoint = _open_files(adapter, [weights.name])
    base_checkpoint: Checkpoint | None = None
    try:
        base_checkpoint = _resolve_base(adapter, config, base)
        tensors = dict(base_checkpoint.tensors)
        factors: dict[str, dict[str, LazyTensor]] = {}
        embeddings: set[str] = set()  # PEFT stores embedding factors transposed relative to linear ones
        for key, tensor in adapter_checkpoint.tensors.items():
            match = _LORA_KEY.match(key)
            if match:
                factors.setdefault(match["module"], {})[match["part"].replace("embedding_", "")] = tensor
                if "embedding" in match["part"]:
                    embeddings.add(match["module"])
            else:  # modules_to_save: a full replacement of a base tensor
                name = key.removeprefix("base_model.model.")
                _check_base_tensor(adapter, base_checkpoint, name, tuple(tensor.shape))
                tensors[name] = tensor
        for module, parts in factors.items():
            if set(parts) != {"lora_A", "lora_B"}:
                raise CapvectorError(
                    f"{weights}: module '{module}' has {sorted(parts)} but LoRA needs both lora_A and lora_B"
                )
            rank = _pattern_value(config.get("rank_pattern", {}), module, config["r"])
            if parts["lora_A"].shape[:1] != (rank,):
                raise CapvectorError(
                    f"{adapter}: {ADAPTER_CONFIG} gives module '{module}' rank {rank} but its lora_A has shape "
                    f"{list(parts['lora_A'].shape)}; the config and the weights are from different adapters"
                )
            alpha = _pattern_value(config.get("alpha_pattern", {}), module, config["lora_alpha"])
            scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
            name = f"{module}.weight"
            delta = LoraDelta(
                name,
                parts["lora_A"],
                parts["lora_B"],
                scaling,
                transposed=module in embeddings or bool(config.get("fan_in_fan_out")),
            )
            _check_base_tensor(adapter, base_checkpoint, name, delta.shape)
            tensors[name] = Combination(
                [(1.0, base_checkpoint.tensors[name]), (1.0, delta)], dtype=base_checkpoint.tensors[name].dtype
            )
    except BaseException:
        adapter_checkpoint.close()
        if base_checkpoint is not None and base_checkpoint is not base:
            base_checkpoint.close()
        raise
    return Checkpoint(
        root=adapter,
        files=base_checkpoint.files,
        tensors=tensors,
        index_name=base_checkpoint.index_name,
        base=base_checkpoint,
        sources=[weights, adapter / ADAPTER_CONFIG, *base_checkpoint.sources],
        _fds=adapter_checkpoint._fds,
    )


def _check_base_tensor(adapter: Path, base: Checkpoint, name: str, shape: tuple[int, ...]) -> None:
    if name not in base.tensors:
        raise CapvectorError(
            f"{adapter}: the adapter changes '{name}' but the base checkpoint {base.root} has no such tensor; "
            "this adapter was trained on another base model: pass the right one with --pretrained"
        )
    if tuple(base.tensors[name].shape) != tuple(shape):
        raise CapvectorError(
            f"{adapter}: the adapter's update of '{name}' has shape {list(shape)} but the base {base.root} has "
            f"{list(base.tensors[name].shape)}; this adapter was trained on another base model"
        )
