"""Looking at a capability vector: per-tensor and per-layer norms, size relative to the base model, and cosine
similarity with another vector (gamma against the task vector tau, or two capability vectors)."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from capvector.params.checkpoints import open_checkpoint
from capvector.params.vectors import CapabilityVector, open_vector

_LAYER = re.compile(r"^(.*?\.(?:layers|layer|h|blocks|block)\.\d+)\.")


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
    layers: list[Row] = field(default_factory=list)
    total: Row | None = None

    def table(self, per_tensor: bool = False) -> str:
        rows = (self.tensors if per_tensor else self.layers) + [self.total]
        width = max(len(r.name) for r in rows)
        header = f"{'tensor' if per_tensor else 'layer':<{width}}  {'numel':>12}  {'norm':>11}  {'|g|/|base|':>10}  {'cosine':>7}"
        lines = [header, "-" * len(header)]
        for row in rows:
            relative = f"{row.relative:10.3e}" if row.relative is not None else f"{'-':>10}"
            cos = f"{row.cosine:7.3f}" if row.cosine is not None else f"{'-':>7}"
            lines.append(f"{row.name:<{width}}  {row.numel:>12,}  {row.norm:11.4e}  {relative}  {cos}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        def row(r: Row) -> dict:
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

    def plot(self, path: str | os.PathLike) -> Path:
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
        path = Path(path)
        figure.savefig(path, dpi=120)
        plt.close(figure)
        return path


def _aggregate(name: str, rows: list[Row]) -> Row:
    def total(values):
        values = list(values)
        return None if any(v is None for v in values) else sum(values)

    squares = lambda attr: total(getattr(r, attr) ** 2 if getattr(r, attr) is not None else None for r in rows)
    base_sq, other_sq = squares("base_norm"), squares("other_norm")
    return Row(
        name,
        sum(r.numel for r in rows),
        math.sqrt(sum(r.norm**2 for r in rows)),
        math.sqrt(base_sq) if base_sq is not None else None,
        math.sqrt(other_sq) if other_sq is not None else None,
        total(r.dot for r in rows),
    )


def inspect(
    vector: str | os.PathLike | CapabilityVector,
    against: str | os.PathLike | CapabilityVector | None = None,
    base: str | os.PathLike | None = None,
) -> InspectReport:
    """Norms of `vector` per tensor, per layer and in total; relative to `base`; cosine with `against`."""
    gamma = vector if isinstance(vector, CapabilityVector) else open_vector(vector)
    other = against if against is None or isinstance(against, CapabilityVector) else open_vector(against)
    base_vector = None
    if base is not None:
        checkpoint = open_checkpoint(base)
        base_vector = CapabilityVector(
            {n: checkpoint.lazy(n) for n in gamma if n in checkpoint}, checkpoints=[checkpoint]
        )
    products = gamma.tensor_products(other) if other else {}  # one pass over both for the shared tensors
    norms = {name: aa for name, (aa, _, _) in products.items()}
    norms |= CapabilityVector({n: t for n, t in gamma.tensors.items() if n not in products}).tensor_dots()
    other_norms = {name: bb for name, (_, bb, _) in products.items()}
    dots = {name: ab for name, (_, _, ab) in products.items()}
    base_norms = base_vector.tensor_dots() if base_vector else {}
    rows = []
    for name in gamma:
        rows.append(
            Row(
                name,
                gamma.lazy(name).numel,
                math.sqrt(norms[name]),
                math.sqrt(base_norms[name]) if name in base_norms else None,
                math.sqrt(other_norms[name]) if name in other_norms else None,
                dots.get(name),
            )
        )
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(layer_of(row.name), []).append(row)
    report = InspectReport(
        rows, [_aggregate(name, members) for name, members in groups.items()], _aggregate("total", rows)
    )
    for opened, given in ((gamma, vector), (other, against), (base_vector, None)):
        if opened is not None and opened is not given:
            opened.close()
    return report
