"""Reading checkpoints tensor by tensor: Hugging Face folders (single or sharded safetensors), single safetensors files,
PyTorch state dicts (only through torch.load(weights_only=True)), and PEFT LoRA adapters applied to their base.

`open_checkpoint(path)` returns a `Checkpoint`: a read-only mapping from parameter name to tensor whose values are
read from disk only when asked for, plus the file layout, so that a merged model can be written in the same layout.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from capvector.errors import CapvectorError
from capvector.params.lazy import (
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

    def __exit__(self, *exc) -> None:
        self.close()


def read_safetensors_header(path: Path) -> tuple[dict, dict[str, str] | None, int]:
    """(tensor entries, __metadata__, offset of the data section), validated against the file's size."""
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
        try:
            header = json.loads(f.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CapvectorError(
                f"{path}: safetensors header is not valid JSON ({error}); the file is corrupted"
            ) from None
    metadata = header.pop("__metadata__", None)
    data_start, data_size = 8 + header_size, size - 8 - header_size
    for name, entry in header.items():
        dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise CapvectorError(f"{path}: tensor '{name}' has unsupported dtype {entry.get('dtype')!r}")
        begin, end = entry["data_offsets"]
        expected = torch.empty((), dtype=dtype).element_size() * _numel(entry["shape"])
        if end - begin != expected:
            raise CapvectorError(
                f"{path}: tensor '{name}' is {end - begin} bytes, its shape needs {expected}; the file is corrupted"
            )
        if end > data_size:
            raise CapvectorError(
                f"{path}: file is truncated: tensor '{name}' ends at byte {data_start + end} of {size}; "
                "re-download or re-save this checkpoint"
            )
    return header, metadata, data_start


def _numel(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _open_safetensors_file(path: Path, checkpoint_fds: list[int]) -> tuple[WeightFile, dict[str, LazyTensor]]:
    header, metadata, data_start = read_safetensors_header(path)
    fd = os.open(path, os.O_RDONLY)
    checkpoint_fds.append(fd)
    ordered = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    tensors = {
        name: StoredTensor(
            name,
            str(path),
            fd,
            data_start + entry["data_offsets"][0],
            SAFETENSORS_DTYPES[entry["dtype"]],
            entry["shape"],
        )
        for name, entry in ordered
    }
    return WeightFile(path.name, [name for name, _ in ordered], metadata, "safetensors"), tensors


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as error:  # torch raises several types for a bad or unsafe file
        raise CapvectorError(
            f"{path}: cannot be read as a PyTorch state dict with weights_only=True ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]}); convert it to safetensors, or re-save it with torch.save(state_dict)"
        ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict) and len(state) <= 4:
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CapvectorError(f"{path}: is not a state dict (a mapping from names to tensors)")
    return state


def _open_torch_file(path: Path) -> tuple[WeightFile, dict[str, LazyTensor]]:
    state = _load_torch_file(path)
    tensors = {name: InMemoryTensor(name, tensor, str(path)) for name, tensor in state.items()}
    return WeightFile(path.name, list(state), None, "torch"), tensors


def _open_files(root: Path, names: list[str], index_name: str | None, weight_map: dict[str, str] | None) -> Checkpoint:
    folder = root if root.is_dir() else root.parent
    checkpoint = Checkpoint(root=root, files=[], tensors={}, index_name=index_name)
    try:
        for name in names:
            path = folder / name
            if not path.is_file():
                where = f" (listed in {index_name})" if index_name else ""
                raise CapvectorError(f"{path}: weight file is missing{where}; the checkpoint is incomplete")
            if name.endswith(SAFETENSORS_SUFFIX):
                weight_file, tensors = _open_safetensors_file(path, checkpoint._fds)
            else:
                weight_file, tensors = _open_torch_file(path)
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


def _open_index(index_path: Path) -> Checkpoint:
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CapvectorError(f"{index_path}: not a valid shard index (needs a 'weight_map'): {error}") from None
    shards = list(dict.fromkeys(weight_map.values()))
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
            return candidate
    present = ", ".join(sorted(p.name for p in folder.iterdir())[:12]) or "nothing"
    raise CapvectorError(
        f"{folder}: no weights found (looked for *.safetensors.index.json, model.safetensors, *.safetensors, "
        f"pytorch_model.bin[.index.json], *.bin, *.pt); the folder holds: {present}"
    )


def open_checkpoint(path: str | os.PathLike, base: str | os.PathLike | Checkpoint | None = None) -> Checkpoint:
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
    return _open_files(path, [weights.name], None, None)


# --- PEFT LoRA adapters -------------------------------------------------------------------------------------------

_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?$"
)


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name suffix as a regular expression."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _resolve_base(adapter: Path, config: dict, base) -> Checkpoint:
    if isinstance(base, Checkpoint):
        return base
    if base is None:
        named = config.get("base_model_name_or_path")
        if not named or not Path(named).exists():
            raise CapvectorError(
                f"{adapter}: LoRA adapter's base {named!r} is not a local folder; pass the base checkpoint "
                "with --pretrained DIR (Python: base=...)"
            )
        base = named
    return open_checkpoint(base)


def open_lora_adapter(adapter: Path, base=None) -> Checkpoint:
    """The full weights of base + adapter: each adapted matrix is base + scaling * B @ A, read row chunk by row chunk."""
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise CapvectorError(
            f"{adapter}: PEFT type {config.get('peft_type')!r} is not supported; only LoRA adapters are"
        )
    if config.get("use_dora"):
        raise CapvectorError(f"{adapter}: DoRA adapters are not supported; merge it with peft's merge_and_unload first")
    weights = next(
        (adapter / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (adapter / n).is_file()), None
    )
    if weights is None:
        raise CapvectorError(f"{adapter}: adapter_config.json found but no adapter_model.safetensors (or .bin)")
    adapter_checkpoint = _open_files(weights, [weights.name], None, None)
    base_checkpoint = _resolve_base(adapter, config, base)
    try:
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
            rank = parts["lora_A"].shape[0]
            alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank))
            scaling = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
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
