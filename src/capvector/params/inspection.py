"""Looking at a capability vector: per-tensor and per-layer norms, size relative to the base model, and cosine
similarity with another vector (gamma against the task vector tau, or two capability vectors)."""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capvector.errors import CapvectorError
from capvector.files import atomic_path
from capvector.params.checkpoints import open_checkpoint
from capvector.params.vectors import CapabilityVector, open_vector

_LAYER = re.compile(r"^(.*?\.(?:layers|layer|h|blocks|block)\.\d+)\.")
_NUMBER = re.compile(r"([0-9]+)")


def model_order(name: str) -> tuple[tuple[int, int | str], ...]:
    """A sort key that puts parameters in model order: numbers compared as numbers (layers.2 before layers.10)."""
    parts = _NUMBER.split(name)  # text, number, text, ..., text
    return tuple((0, int(part)) if i % 2 else (1, part) for i, part in enumerate(parts))


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: 'model.layers.3' for 'model.layers.3.mlp.up_proj.weight', else its module."""
    match = _LAYER.match(name)
    return match[1] if match else name.rpartition(".")[0] or name


@dataclass
class Row:
    name: str
    numel: int
    norm: float
    base_norm: float | None = None
    other_norm: float | None = None
    dot: float | None = None

    @property
    def relative(self) -> float | None:
        return self.norm / self.base_norm if self.base_norm else None

    @property
    def cosine(self) -> float | None:
        if self.dot is None or not self.norm or not self.other_norm:
            return None
        return self.dot / (self.norm * self.other_norm)


@dataclass
class InspectReport:
    tensors: list[Row]
    layers: list[Row]
    total: Row

    def table(self, per_tensor: bool = False) -> str:
        rows = (self.tensors if per_tensor else self.layers) + [self.total]
        width = max(len(r.name) for r in rows)
        kind = "tensor" if per_tensor else "layer"
        header = f"{kind:<{width}}  {'numel':>12}  {'norm':>11}  {'|g|/|base|':>10}  {'cosine':>7}"
        lines = [header, "-" * len(header)]
        for row in rows:
            relative = f"{row.relative:10.3e}" if row.relative is not None else f"{'-':>10}"
            cos = f"{row.cosine:7.3f}" if row.cosine is not None else f"{'-':>7}"
            lines.append(f"{row.name:<{width}}  {row.numel:>12,}  {row.norm:11.4e}  {relative}  {cos}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        def row(r: Row) -> dict[str, Any]:
            return {
                "name": r.name,
                "numel": r.numel,
                "norm": r.norm,
                "relative_to_base": r.relative,
                "cosine": r.cosine,
            }

        return {
            "tensors": [row(r) for r in self.tensors],
            "layers": [row(r) for r in self.layers],
            "total": row(self.total),
        }

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Per-layer bar plots, written atomically to `path` in the format its suffix names."""
        path = Path(path)
        image_format = plot_format(path)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        has_cosine = any(r.cosine is not None for r in self.layers)
        figure, axes = plt.subplots(
            2 if has_cosine else 1,
            1,
            figsize=(max(6, 0.35 * len(self.layers)), 6 if has_cosine else 3.5),
            squeeze=False,
        )
        names = [r.name for r in self.layers]
        axes[0][0].bar(range(len(names)), [r.relative if r.relative is not None else r.norm for r in self.layers])
        axes[0][0].set_ylabel(
            "|gamma| / |theta_pt|" if self.layers and self.layers[0].relative is not None else "|gamma|"
        )
        if has_cosine:
            axes[1][0].bar(range(len(names)), [r.cosine or 0.0 for r in self.layers], color="tab:orange")
            axes[1][0].axhline(0, color="black", linewidth=0.5)
            axes[1][0].set_ylabel("cosine with other")
        for ax in axes[:, 0]:
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        figure.tight_layout()
        with atomic_path(path) as temporary:
            figure.savefig(temporary, format=image_format, dpi=120)
        plt.close(figure)
        return path


def plot_format(path: str | os.PathLike[str]) -> str:
    """The image format a plot path's suffix names, refused when matplotlib cannot write it."""
    from matplotlib.backend_bases import FigureCanvasBase

    image_format = Path(path).suffix.removeprefix(".").lower()
    if image_format not in FigureCanvasBase.get_supported_filetypes():
        raise CapvectorError(f"--plot {path}: unknown image format {image_format!r}; name a .png, .pdf or .svg file")
    return image_format


def _sum_or_none(values: Iterable[float | None]) -> float | None:
    """The sum, or None when any value is unknown."""
    total = 0.0
    for value in values:
        if value is None:
            return None
        total += value
    return total


def _aggregate(name: str, rows: list[Row]) -> Row:
    def norm(attr: str) -> float | None:
        squares = _sum_or_none(None if getattr(r, attr) is None else getattr(r, attr) ** 2 for r in rows)
        return None if squares is None else math.sqrt(squares)

    return Row(
        name,
        sum(r.numel for r in rows),
        math.sqrt(sum(r.norm**2 for r in rows)),
        norm("base_norm"),
        norm("other_norm"),
        _sum_or_none(r.dot for r in rows),
    )


def inspect(
    vector: str | os.PathLike[str] | CapabilityVector,
    against: str | os.PathLike[str] | CapabilityVector | None = None,
    base: str | os.PathLike[str] | None = None,
) -> InspectReport:
    """Norms of `vector` per tensor, per layer and in total, in model order; relative to `base`; cosine with
    `against`."""
    with contextlib.ExitStack() as opened:
        gamma = _opened(vector, opened)
        other = None if against is None else _opened(against, opened)
        base_norms: dict[str, float] = {}
        if base is not None:
            checkpoint = opened.enter_context(open_checkpoint(base))
            for name in gamma.keys() & checkpoint.keys():
                if checkpoint.lazy(name).shape != gamma.lazy(name).shape:
                    raise CapvectorError(
                        f"tensor '{name}' has shape {list(checkpoint.lazy(name).shape)} in {base} but "
                        f"{list(gamma.lazy(name).shape)} in the vector; --base must be the model the vector belongs to"
                    )
            base_vector = CapabilityVector({n: checkpoint.lazy(n) for n in gamma.keys() & checkpoint.keys()})
            base_norms = base_vector.tensor_dots()
        products = gamma.tensor_products(other) if other else {}  # one pass over both for the shared tensors
        norms = {name: aa for name, (aa, _, _) in products.items()}
        norms |= CapabilityVector({n: t for n, t in gamma.tensors.items() if n not in products}).tensor_dots()
        rows = [
            Row(
                name,
                gamma.lazy(name).numel,
                math.sqrt(norms[name]),
                math.sqrt(base_norms[name]) if name in base_norms else None,
                math.sqrt(products[name][1]) if name in products else None,
                products[name][2] if name in products else None,
            )
            for name in sorted(gamma, key=model_order)
        ]
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(layer_of(row.name), []).append(row)
    return InspectReport(
        rows, [_aggregate(name, members) for name, members in groups.items()], _aggregate("total", rows)
    )


def _opened(vector: str | os.PathLike[str] | CapabilityVector, stack: contextlib.ExitStack) -> CapabilityVector:
    """`vector`, opened (and closed with `stack`) when it is a path."""
    if isinstance(vector, CapabilityVector):
        return vector
    opened = open_vector(vector)
    stack.callback(opened.close)
    return opened
