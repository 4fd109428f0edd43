"""CapVector's orthogonal regularizer: keep the downstream update Delta' = theta - theta_meta off gamma.

Build it once, when the model still holds theta_meta, then use one of three ways per step::

    reg = build_regularizer(model, gamma)     # gamma: {base parameter name: tensor}, may be lazy
    # soft, any training loop (autograd):
    (task_loss + lam * reg.loss()).backward(); optimizer.step()
    # soft, fused (same gradient, no autograd graph; call after backward, after DDP's all-reduce and any
    # GradScaler.unscale_, once per optimizer step):
    task_loss.backward(); value = reg.add_grad_(lam); optimizer.step()
    # hard (exact, no lambda):
    task_loss.backward(); reg.project_grad_(); optimizer.step(); reg.project_()

Per regularized tensor l, d_l = <Delta'_l, gamma_l> is computed as <theta_l, gamma_l> - c_l with
c_l = <theta_meta_l, gamma_l> fixed at construction, so no copy of theta_meta is kept. Reductions over l:

- "normalized" (default): sum_l (d_l / |gamma_l|)^2, the squared length of Delta'_l along gamma_l/|gamma_l|.
  It is in the units of the weights, weighs every tensor alike and does not change when gamma is rescaled
  (by alpha, or by how long the extraction runs trained), so lambda carries over between vectors: against
  a task loss of curvature h along gamma_l, about lambda / (lambda + h) of the capability is kept.
- "square": sum_l d_l^2 = sum_l |gamma_l|^2 (d_l / |gamma_l|)^2: the same, weighted by |gamma_l|^2, which with
  elements of 1e-3..1e-2 spans numel * 1e-6..1e-4 (a bias next to nothing, an embedding a lot), so lambda
  depends on gamma's scale and on which tensors dominate.
- "abs": sum_l |d_l|, the paper's form. Also weighted by |gamma_l|, and its gradient lambda * sign(d_l) *
  gamma_l does not shrink as d_l -> 0, so the update chatters across the constraint instead of settling.

LoRA (a PEFT model; mode "auto" picks it when adapters are present): the base weight W_l is frozen and the
update is Delta'_l = scaling * B_l A_l - U_l (U_l: the adapters' product at construction, zero for a fresh PEFT
adapter). Two forms:

- "olora" (default, O-LoRA style): sum_l ||Delta'_l V_l||_F^2, V_l the top-`rank` right-singular vectors of
  gamma_l (a seeded randomized SVD at construction): the update may not read the inputs gamma_l acts on, so the
  adapter's A is pushed out of that subspace (as far as B passes it on). Like "normalized" it is in the units of
  the weights, zero at theta_meta and unchanged when gamma is rescaled (only V_l is used), so the same lambda
  fits both; when V_l spans gamma_l's rows it bounds "normalized" from above (<Delta', gamma> <= |Delta' V| |gamma|).
  It does not depend on where A starts: an adapter seeded like the runs gamma came from has A inside gamma's
  subspace, yet its penalty starts at zero and grows only with the update.
- "exact": d_l = scaling * sum((B_l^T gamma_l) * A_l) - c_l, never forming B_l A_l, with the reductions above.

Hard variant: after each optimizer step, theta_l -= (d_l / |gamma_l|^2) gamma_l, which leaves Delta'_l
orthogonal to gamma_l up to the rounding of theta's dtype (for LoRA, the smallest change to A_l that does
the same: A_l -= d_l / (scaling |M_l|^2) M_l with M_l = B_l^T gamma_l). Before the step, project_grad_
drops the gradient's component that would move d_l; without it Adam keeps stepping along gamma, project_
keeps undoing it, and the rest of the update stalls.

Gamma keys must name parameters of the model with the same shape (else CapvectorError); trainable parameters
absent from gamma are left alone, frozen ones and all-zero gamma tensors are skipped; `reg.counts` says how
many of each (full: tensors, lora: adapters, zero_gamma, frozen, trainable_unregularized: parameters).

Sharded parameters (FSDP2, capvector.training.sharding): each process keeps only its rows of gamma (a lazy vector
reads just those), computes its shards' inner products and sums them over the processes (one all-reduce of the L
values) before any reduction squares them, so the value and the gradient are the one-process ones; the fused and
hard forms work on the shards in place. loss() (autograd) and the LoRA forms need whole tensors and are refused.

Cost: each tensor's dot product is one pass with no temporary, so loss() reads the regularized parameters
and gamma once, and add_grad_ adds one read-modify-write of their gradients (about half the traffic of
autograd's backward through loss(), which allocates gamma-sized gradients and then adds them).
All regularized tensors must share one device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, cast, get_args

import torch
import torch.distributed as dist
from torch import nn

from capvector.errors import CapvectorError
from capvector.params.lazy import LazyTensor, LazyTensorMapping
from capvector.training.sharding import group, is_sharded, local, shard_rows

Reduction = Literal["normalized", "square", "abs"]
LoraForm = Literal["olora", "exact"]
Mode = Literal["auto", "full", "lora"]
REDUCTIONS: tuple[Reduction, ...] = get_args(Reduction)
LORA_FORMS: tuple[LoraForm, ...] = get_args(LoraForm)
MODES: tuple[Mode, ...] = get_args(Mode)
LoraPair = tuple[nn.Parameter, nn.Parameter, float]  # (A, B, scaling) of one adapter


# ---- the math, over plain tensors ----------------------------------------------------------------------------


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> as a scalar; half-precision products are summed in float32 (the d_l are small differences)."""
    if a.dtype in (torch.float32, torch.float64):
        return torch.dot(a.reshape(-1), b.reshape(-1))
    return (a * b).sum(dtype=torch.float32)


def penalty(d: torch.Tensor, norms: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """The reduction of the per-tensor projections d (norms: |gamma_l|)."""
    if reduction == "abs":
        return d.abs().sum()
    if reduction == "square":
        return d.square().sum()
    return (d / norms).square().sum()


def slope(d: torch.Tensor, norms: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """d penalty / d d_l, per tensor."""
    if reduction == "abs":
        return d.sign()
    if reduction == "square":
        return 2 * d
    return 2 * d / norms.square()


def top_right_singular(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The top-`rank` right-singular vectors (in x rank), from a randomized SVD seeded so every process agrees."""
    k = min(rank, *matrix.shape)
    matrix = matrix.detach().to("cpu", torch.promote_types(matrix.dtype, torch.float32))
    with torch.random.fork_rng(devices=[]):  # svd_lowrank draws a random sketch: keep the training RNG untouched
        torch.manual_seed(0)
        right: torch.Tensor
        if k + 10 >= min(matrix.shape):
            right = torch.linalg.svd(matrix, full_matrices=False).Vh.T
        else:
            right = torch.svd_lowrank(matrix, q=k + 10, niter=4)[2]
    return right[:, :k]


def total(values: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(values)).sum()


# ---- the model side -----------------------------------------------------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = cast(nn.Module, model._orig_mod)
        else:
            return model


def base_name(name: str, peft: bool) -> str:
    """A PEFT model's parameter or module name as the base model calls it (the name gamma uses)."""
    if not peft:
        return name
    name = name.removeprefix("base_model.model.")
    parts = name.split(".")
    out = []
    i = 0
    while i < len(parts):
        if parts[i] in ("base_layer", "original_module"):
            i += 1
        elif parts[i] == "modules_to_save":
            i += 2  # ".modules_to_save.<adapter>."
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


def lora_layers(model: nn.Module, peft: bool) -> dict[str, nn.Module]:
    """Base weight name -> PEFT LoRA layer, for every module carrying adapters."""
    return {
        base_name(name, peft) + ".weight": module
        for name, module in model.named_modules()
        if isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and hasattr(module, "scaling")
    }


def read_gamma(gamma: Mapping[str, torch.Tensor], params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Each gamma tensor read once (for a sharded parameter only this process's rows), checked against the
    model, in its parameter's dtype and device."""
    out = {}
    for key in gamma:
        if key not in params:
            raise CapvectorError(
                f"capability vector: tensor '{key}' is not a parameter of the model; extract gamma from checkpoints "
                "of this model, or drop the tensor from the vector"
            )
        param = params[key]
        source: torch.Tensor | LazyTensor = gamma.lazy(key) if isinstance(gamma, LazyTensorMapping) else gamma[key]
        if not isinstance(source, (torch.Tensor, LazyTensor)) or not source.dtype.is_floating_point:
            raise CapvectorError(f"capability vector: tensor '{key}' is not a floating-point tensor; re-extract gamma")
        if tuple(source.shape) != tuple(param.shape):
            raise CapvectorError(
                f"capability vector: tensor '{key}' has shape {tuple(source.shape)} but the model's parameter has "
                f"{tuple(param.shape)}; extract gamma from checkpoints of this model architecture"
            )
        tensor = rows_of(source, *shard_rows(param)) if is_sharded(param) else gamma[key]
        out[key] = tensor.detach().to(param.device, param.dtype).contiguous()
    return out


def rows_of(source: torch.Tensor | LazyTensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of dim 0; a lazy tensor reads only those from its file."""
    if isinstance(source, LazyTensor):
        return source.read(start, stop).reshape(stop - start, *source.shape[1:])
    return source[start:stop]


class FullTerm:
    """Tensors finetuned in full: d_l = <theta_l, gamma_l> - c_l. Sharded parameters (all or none) come with
    this process's rows of gamma_l."""

    def __init__(self, params: list[nn.Parameter], gammas: list[torch.Tensor], reduction: Reduction):
        self.params, self.gammas, self.reduction = params, gammas, reduction
        self.group = group(params[0]) if is_sharded(params[0]) else None
        with torch.no_grad():
            self.norms = self.summed([dot(g, g) for g in gammas]).sqrt()
            self.c = self.dots(params)

    def summed(self, values: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-tensor values of the shards, summed over the processes: the whole tensors' values."""
        out = torch.stack(list(values))
        if self.group is not None:
            dist.all_reduce(out, group=self.group)
        return out

    def dots(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.summed([dot(local(t), g) for t, g in zip(tensors, self.gammas, strict=True)])

    def loss(self) -> torch.Tensor:
        if self.group is not None:
            raise CapvectorError(
                "orthogonal regularizer: loss() is not differentiable across FSDP shards; use add_grad_ (the same "
                "gradient, fused)"
            )
        return penalty(self.dots(self.params) - self.c, self.norms, self.reduction)

    @torch.no_grad()
    def add_grad_(self, weight: float) -> torch.Tensor:
        d = self.dots(self.params) - self.c
        self.add_along_gamma_([_grad_of(p) for p in self.params], weight * slope(d, self.norms, self.reduction))
        return penalty(d, self.norms, self.reduction)

    @torch.no_grad()
    def project_grad_(self) -> None:
        grads = [_grad_of(p) for p in self.params]
        self.add_along_gamma_(grads, -self.dots(grads) / self.norms.square())

    @torch.no_grad()
    def project_(self) -> None:
        self.add_along_gamma_(self.params, -(self.dots(self.params) - self.c) / self.norms.square())

    def add_along_gamma_(self, tensors: Sequence[torch.Tensor], coefs: torch.Tensor) -> None:
        """tensors[l] += coefs[l] * gamma_l (one host sync for the coefficients)."""
        for t, g, coef in zip(tensors, self.gammas, coefs.tolist(), strict=True):
            local(t).add_(g, alpha=coef)


class LoraTerm:
    """LoRA-adapted linear layers: the update scaling * B A - U of each frozen base weight."""

    def __init__(
        self, pairs: list[LoraPair], gammas: list[torch.Tensor], form: LoraForm, reduction: Reduction, rank: int
    ):
        self.pairs, self.gammas, self.form, self.reduction = pairs, gammas, form, reduction
        with torch.no_grad():
            self.norms = torch.stack([dot(g, g) for g in gammas]).sqrt()
            self.c = self.projections()[0]
            if form == "olora":
                self.bases = [top_right_singular(g, rank).to(g.device, g.dtype) for g in gammas]
                self.start = [s * b @ (a @ v) for (a, b, s), v in zip(pairs, self.bases, strict=True)]  # U_l V_l

    def projections(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """d_l + c_l = scaling * <B^T gamma_l, A>, and the M_l = B^T gamma_l it used."""
        ms = [b.T @ g for (_, b, _), g in zip(self.pairs, self.gammas, strict=True)]
        d = torch.stack([s * dot(m, a) for (a, _, s), m in zip(self.pairs, ms, strict=True)])
        return d, ms

    def subspace_updates(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """olora: per adapter (Delta'_l V_l, A_l V_l)."""
        out = []
        for (a, b, s), v, start in zip(self.pairs, self.bases, self.start, strict=True):
            av = a @ v
            out.append((s * b @ av - start, av))
        return out

    def loss(self) -> torch.Tensor:
        if self.form == "olora":
            return total([dot(r, r) for r, _ in self.subspace_updates()])
        return penalty(self.projections()[0] - self.c, self.norms, self.reduction)

    @torch.no_grad()
    def add_grad_(self, weight: float) -> torch.Tensor:
        if self.form == "olora":
            # d ||s B A V - U V||^2 = 2 s (B^T R V^T) dA + 2 s (R (A V)^T) dB, with R = s B A V - U V
            updates = self.subspace_updates()
            for (a, b, s), v, (r, av) in zip(self.pairs, self.bases, updates, strict=True):
                _grad_of(a).addmm_(b.T @ r, v.T, alpha=2 * weight * s)
                _grad_of(b).addmm_(r, av.T, alpha=2 * weight * s)
            return total([dot(r, r) for r, _ in updates])
        d, ms = self.projections()
        d -= self.c
        coefs = (weight * slope(d, self.norms, self.reduction)).tolist()
        for (a, b, s), g, m, coef in zip(self.pairs, self.gammas, ms, coefs, strict=True):
            _grad_of(a).add_(m, alpha=s * coef)
            _grad_of(b).addmm_(g, a.T, alpha=s * coef)
        return penalty(d, self.norms, self.reduction)

    @torch.no_grad()
    def project_grad_(self) -> None:
        # the gradient of d_l in (A, B) is scaling * (M_l, gamma_l A^T): take the gradients' component along it
        for (a, b, s), g in zip(self.pairs, self.gammas, strict=True):
            normal_a, normal_b = s * (b.T @ g), s * (g @ a.T)
            grad_a, grad_b = _grad_of(a), _grad_of(b)
            size = dot(normal_a, normal_a) + dot(normal_b, normal_b)
            if size > 0:
                step = -(dot(grad_a, normal_a) + dot(grad_b, normal_b)) / size
                grad_a.add_(normal_a * step)
                grad_b.add_(normal_b * step)

    @torch.no_grad()
    def project_(self) -> None:
        d, ms = self.projections()
        d -= self.c
        for (a, _, s), m, d_l in zip(self.pairs, ms, d.tolist(), strict=True):
            mm = dot(m, m).item()
            if mm > 0:  # B^T gamma = 0: A cannot move the update along gamma; nothing to remove
                a.add_(m, alpha=-d_l / (s * mm))


Term = FullTerm | LoraTerm


def _grad_of(p: nn.Parameter) -> torch.Tensor:
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad


class OrthogonalRegularizer:
    """L_orth over the model's tensors named in gamma; see the module docstring for the three ways to use it."""

    def __init__(self, terms: list[Term], counts: dict[str, int]):
        self.terms, self.counts = terms, counts

    def loss(self) -> torch.Tensor:
        """The penalty as a differentiable scalar (add lambda times it to the task loss)."""
        return total([term.loss() for term in self.terms])

    def add_grad_(self, weight: float) -> torch.Tensor:
        """Add weight * d penalty / d theta to the parameters' .grad; returns the penalty (for logging)."""
        return total([term.add_grad_(weight) for term in self.terms])

    def project_grad_(self) -> None:
        """Hard variant, before optimizer.step(): drop the gradient's component that would move d_l.

        Without it an adaptive optimizer (Adam) keeps stepping along gamma, project_ keeps undoing it, and
        Adam's second moments, filled by that component, shrink every other step: training stalls."""
        for term in self.terms:
            term.project_grad_()

    def project_(self) -> None:
        """Hard variant, after optimizer.step(): remove each tensor's update component along gamma."""
        for term in self.terms:
            term.project_()

    def __repr__(self) -> str:
        return "OrthogonalRegularizer(" + ", ".join(f"{k}={v}" for k, v in self.counts.items()) + ")"


def build_regularizer(
    model: nn.Module,
    gamma: Mapping[str, torch.Tensor],
    mode: Mode = "auto",
    reduction: Reduction = "normalized",
    lora_form: LoraForm = "olora",
    rank: int = 8,
) -> OrthogonalRegularizer:
    """The regularizer for `model` as it is now (theta_meta), against capability vector `gamma`.

    mode: "full" regularizes every trainable parameter named in gamma; "lora" the LoRA adapters of the
    layers named in gamma (plus trainable non-LoRA parameters in gamma, e.g. PEFT's modules_to_save);
    "auto": "lora" if the model has LoRA adapters, else "full". rank: the O-LoRA subspace size.
    """
    allowed: tuple[str, ...]
    for field, value, allowed in (
        ("mode", mode, MODES),
        ("reduction", reduction, REDUCTIONS),
        ("lora_form", lora_form, LORA_FORMS),
    ):
        if value not in allowed:
            raise CapvectorError(f"orthogonal regularizer: {field} '{value}' is not one of {', '.join(allowed)}")
    if rank < 1:
        raise CapvectorError(f"orthogonal regularizer: rank {rank} must be at least 1")
    model = unwrap(model)
    peft = hasattr(model, "peft_config")
    params: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters():
        key = base_name(name, peft)
        # a trainable copy (PEFT's modules_to_save) wins over the frozen original
        if not (peft and ".lora_" in name) and (key not in params or p.requires_grad):
            params[key] = p
    layers = lora_layers(model, peft)
    if mode == "auto":
        mode = "lora" if layers else "full"
    if mode == "lora" and not layers:
        raise CapvectorError("orthogonal regularizer: mode 'lora' but the model has no LoRA adapters; use mode 'full'")
    sharded = [p for p in params.values() if is_sharded(p)]
    if sharded and (layers or len(sharded) < len(params)):
        raise CapvectorError(
            "orthogonal regularizer: under FSDP every parameter must be sharded and LoRA is not supported (its "
            "forms need whole adapters); shard the whole model with fully_shard, or use DDP"
        )
    gammas = read_gamma(gamma, params)
    squares = torch.stack([dot(g, g) for g in gammas.values()]) if gammas else torch.zeros(0)
    if sharded:  # whole tensors' |gamma_l|^2 from the shards'
        dist.all_reduce(squares, group=group(sharded[0]))

    counts = {"full": 0, "lora": 0, "zero_gamma": 0, "frozen": 0}
    full_params: list[nn.Parameter] = []
    full_gammas: list[torch.Tensor] = []
    pairs: list[LoraPair] = []
    lora_gammas: list[torch.Tensor] = []
    for (key, g), square in zip(gammas.items(), squares.tolist(), strict=True):
        if square == 0:
            counts["zero_gamma"] += 1
        elif mode == "lora" and key in layers:
            # the update is (B A)^T on transposed (Conv1D) layers
            oriented = g.T if getattr(layers[key], "fan_in_fan_out", False) else g
            for pair in lora_pairs(layers[key], key):
                pairs.append(pair)
                lora_gammas.append(oriented.to(pair[0].dtype).contiguous())  # adapters may be float32 on a bf16 base
                counts["lora"] += 1
        elif params[key].requires_grad:
            full_params.append(params[key])
            full_gammas.append(g)
            counts["full"] += 1
        else:
            counts["frozen"] += 1
    regularized = {id(p) for p in full_params} | {id(t) for a, b, _ in pairs for t in (a, b)}
    counts["trainable_unregularized"] = sum(p.requires_grad and id(p) not in regularized for p in model.parameters())

    terms: list[Term] = []
    if full_params:
        terms.append(FullTerm(full_params, full_gammas, reduction))
    if pairs:
        terms.append(LoraTerm(pairs, lora_gammas, lora_form, reduction, rank))
    if not terms:
        raise CapvectorError(
            f"orthogonal regularizer: gamma regularizes no trainable tensor of the model ({counts}); check that "
            "gamma is non-zero and that its tensors are trained (mode 'lora' needs adapters on gamma's layers)"
        )
    devices = {p.device for p in full_params} | {a.device for a, _, _ in pairs}
    if len(devices) > 1:
        raise CapvectorError(f"orthogonal regularizer: regularized tensors span devices {devices}; keep them on one")
    return OrthogonalRegularizer(terms, counts)


def lora_pairs(layer: nn.Module, key: str) -> list[LoraPair]:
    """(A, B, scaling) for each active adapter of a PEFT LoRA linear layer."""
    lora_a, lora_b = cast(nn.ModuleDict, layer.lora_A), cast(nn.ModuleDict, layer.lora_B)
    scaling = cast(dict[str, float], layer.scaling)
    pairs = []
    for adapter in cast(list[str], layer.active_adapters):
        if adapter not in lora_a:
            raise CapvectorError(
                f"orthogonal regularizer: LoRA adapter '{adapter}' on '{key}' is not a linear adapter (embedding "
                "or other); leave that module out of target_modules or use mode 'full'"
            )
        if getattr(layer, "use_dora", {}).get(adapter, False):
            raise CapvectorError(f"orthogonal regularizer: '{key}' uses DoRA, which is not supported; use plain LoRA")
        a, b = cast(nn.Parameter, lora_a[adapter].weight), cast(nn.Parameter, lora_b[adapter].weight)
        if a.dim() != 2 or b.dim() != 2:
            raise CapvectorError(
                f"orthogonal regularizer: LoRA on '{key}' is not on a linear layer (A has shape {tuple(a.shape)}); "
                "leave that module out of target_modules or use mode 'full'"
            )
        pairs.append((a, b, float(scaling[adapter])))
    return pairs
