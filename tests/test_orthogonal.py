"""The orthogonal regularizer against direct float64 computations, and its effect on a regression problem."""

import itertools
import os
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from capvector.errors import CapvectorError
from capvector.training.orthogonal import build_regularizer


def mlp(widths, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(a, b) for a, b in itertools.pairwise(widths)]
    return nn.Sequential(*layers).to(dtype)


def random_gamma(model, seed=1, scale=1e-2, skip=()):
    generator = torch.Generator().manual_seed(seed)
    return {
        k: scale * torch.randn(v.shape, generator=generator, dtype=v.dtype)
        for k, v in model.state_dict().items()
        if k not in skip
    }


def perturb_(params, seed=2, scale=0.1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def reference_reduction(ds, norms, reduction):
    ds, norms = torch.stack(ds), torch.stack(norms)
    return {"abs": ds.abs().sum(), "square": (ds**2).sum(), "normalized": ((ds / norms) ** 2).sum()}[reduction]


def grads(params):
    return [p.grad.clone() for p in params]


def check_fused_matches(reg, params, weight, expected_value, expected_grads):
    for p in params:
        p.grad = None
    value = reg.add_grad_(weight)
    torch.testing.assert_close(value.double(), expected_value.double(), rtol=1e-6, atol=1e-12)
    for got, want in zip(grads(params), expected_grads):
        torch.testing.assert_close(got, weight * want.to(got.dtype), rtol=1e-6, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(
    widths=st.lists(st.integers(1, 9), min_size=2, max_size=4),
    reduction=st.sampled_from(["abs", "square", "normalized"]),
    seed=st.integers(0, 1000),
)
def test_full_value_and_gradient_match_float64(widths, reduction, seed):
    model = mlp(widths, seed=seed)
    gamma = random_gamma(model, seed=seed + 1, skip=("0.bias",))
    meta = {k: v.detach().clone() for k, v in model.named_parameters()}
    reg = build_regularizer(model, gamma, reduction=reduction)
    perturb_(model.parameters(), seed=seed + 2)

    # independent reference: keeps theta_meta and forms the update explicitly
    theta = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    ds = [((theta[k] - meta[k]) * g).sum() for k, g in gamma.items()]
    expected = reference_reduction(ds, [g.norm() for g in gamma.values()], reduction)
    expected.backward()
    expected_grads = [theta[k].grad if theta[k].grad is not None else torch.zeros_like(theta[k]) for k in meta]

    value = reg.loss()
    torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-15)
    value.backward()
    params = list(model.parameters())
    for p, want in zip(params, expected_grads):
        torch.testing.assert_close(p.grad if p.grad is not None else torch.zeros_like(p), want, rtol=1e-9, atol=1e-15)
    check_fused_matches(
        reg, [p for k, p in model.named_parameters() if k in gamma], 3.0, expected, [theta[k].grad for k in gamma]
    )


def test_full_float32_close_to_float64():
    model = mlp([16, 32, 8], dtype=torch.float32)
    gamma = random_gamma(model)
    meta = {k: v.detach().double() for k, v in model.named_parameters()}
    reg = build_regularizer(model, gamma)
    perturb_(model.parameters())
    ds = [((p.detach().double() - meta[k]) * gamma[k].double()).sum() for k, p in model.named_parameters()]
    expected = reference_reduction(ds, [g.double().norm() for g in gamma.values()], "normalized")
    torch.testing.assert_close(reg.loss().double(), expected, rtol=1e-4, atol=0)


class TwoLayer(nn.Module):
    def __init__(self, transposed=False):
        super().__init__()
        if transposed:  # GPT-2 style Conv1D: weight is (in, out); PEFT needs fan_in_fan_out
            from transformers.pytorch_utils import Conv1D

            self.up, self.down = Conv1D(40, 24), Conv1D(20, 40)
        else:
            self.up, self.down = nn.Linear(24, 40), nn.Linear(40, 20)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def lora_model(transposed=False, seed=0):
    peft = pytest.importorskip("peft")  # an optional extra
    torch.manual_seed(seed)
    base = TwoLayer(transposed).double()
    gamma = random_gamma(base, seed=seed + 1)
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["up", "down"], fan_in_fan_out=transposed)
    model = peft.get_peft_model(base, config)
    perturb_([p for n, p in model.named_parameters() if "lora_B" in n], seed=seed + 3)  # start from non-zero B A
    return model, gamma


def adapters(model):
    """base key -> (A, B, scaling, transposed), read from PEFT independently of the regularizer."""
    out = {}
    for name in ("up", "down"):
        layer = getattr(model.base_model.model, name)
        out[f"{name}.weight"] = (
            layer.lora_A["default"].weight,
            layer.lora_B["default"].weight,
            layer.scaling["default"],
            layer.fan_in_fan_out,
        )
    return out


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("reduction", ["abs", "square", "normalized"])
def test_lora_exact_matches_formed_update(transposed, reduction):
    model, gamma = lora_model(transposed)
    layers = adapters(model)
    start = {k: (s * b @ a).detach().clone() for k, (a, b, s, _) in layers.items()}
    reg = build_regularizer(model, gamma, lora_form="exact", reduction=reduction)
    assert reg.counts["lora"] == 2 and reg.counts["frozen"] == 2  # the biases are frozen base parameters
    perturb_([p for n, p in model.named_parameters() if "lora_" in n], seed=7)

    ds, leaves = [], []
    for k, (a, b, s, t) in layers.items():
        a64, b64 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        update = s * b64 @ a64 - start[k]
        ds.append(((update.T if t else update) * gamma[k]).sum())
        leaves += [a64, b64]
    expected = reference_reduction(ds, [gamma[k].norm() for k in layers], reduction)
    expected.backward()

    params = [t for a, b, _, _ in layers.values() for t in (a, b)]
    value = reg.loss()
    torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-15)
    value.backward()
    for p, leaf in zip(params, leaves):
        torch.testing.assert_close(p.grad, leaf.grad, rtol=1e-9, atol=1e-15)
    check_fused_matches(reg, params, 0.5, expected, [leaf.grad for leaf in leaves])


def gapped_gamma(out_features, in_features, rank, seed):
    """A gamma with a clear spectral gap after `rank` singular values, so its top subspace is well defined."""
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_features, out_features, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_features, in_features, generator=generator, dtype=torch.float64))
    k = min(out_features, in_features)
    spectrum = torch.cat([torch.linspace(3, 2, rank), torch.linspace(0.1, 0.01, k - rank)]).double()
    return 1e-2 * (u[:, :k] * spectrum) @ v[:, :k].T


@pytest.mark.parametrize("rank", [1, 2])
def test_olora_matches_explicit_svd(rank):
    model, _ = lora_model()
    gamma = {"up.weight": gapped_gamma(40, 24, rank, 1), "down.weight": gapped_gamma(20, 40, rank, 2)}
    layers = adapters(model)
    start = {k: (s * b @ a).detach().clone() for k, (a, b, s, _) in layers.items()}
    reg = build_regularizer(model, gamma, lora_form="olora", rank=rank)
    perturb_([p for n, p in model.named_parameters() if "lora_" in n], seed=7)

    # independent reference: forms the update s B A - (s B A at construction) and its part in gamma's top inputs
    leaves, expected = [], 0
    for k, (a, b, s, _) in layers.items():
        v = torch.linalg.svd(gamma[k]).Vh[:rank].T
        a64, b64 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        expected = expected + (((s * b64 @ a64 - start[k]) @ v) ** 2).sum()
        leaves += [a64, b64]
    expected.backward()
    value = reg.loss()
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-12)  # a randomized SVD: close, not exact
    value.backward()
    params = [t for a, b, _, _ in layers.values() for t in (a, b)]
    for p, leaf in zip(params, leaves):
        torch.testing.assert_close(p.grad, leaf.grad, rtol=1e-5, atol=1e-10)
    check_fused_matches(reg, params, 2.0, value.detach(), [p.grad.clone() for p in params])


def adapter_seeded_like_gamma(seed=0):
    """A fresh PEFT adapter (B = 0) on a 64 -> 48 layer whose A lies inside gamma's input subspace: gamma = B' A
    as when gamma comes from runs whose adapters were seeded like this one (A moves little in training)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    model = peft.get_peft_model(nn.Sequential(nn.Linear(64, 48)), peft.LoraConfig(r=8, target_modules=["0"]))
    a = model.base_model.model[0].lora_A["default"].weight
    gamma = {"0.weight": 1e-2 * torch.randn(48, 8) @ a.detach()}
    return model, gamma, a, model.base_model.model[0].lora_B["default"].weight


def share_in(a, gamma, rank=8):
    """The share of A's energy in gamma's top-`rank` input subspace."""
    v = torch.linalg.svd(gamma).Vh[:rank].T
    return float((a.detach() @ v).square().sum() / a.detach().square().sum())


def test_olora_penalty_stays_small_next_to_the_task_when_the_adapter_starts_in_gammas_subspace():
    from capvector.training.config import TrainConfig

    model, gamma, a, _ = adapter_seeded_like_gamma()
    assert share_in(a, gamma["0.weight"]) > 0.99  # the case that made L_orth 148 against a task loss of 0.29
    config = TrainConfig()  # the default lambda and subspace rank
    reg = build_regularizer(model, gamma, lora_form=config.lora_form, rank=config.orth_rank)
    assert reg.loss().item() == 0  # zero at theta_meta, wherever A starts
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    y = x @ torch.randn(64, 48, generator=torch.Generator().manual_seed(2)) * 0.1
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(50):
        optimizer.zero_grad()
        task = nn.functional.mse_loss(model(x), y)
        task.backward()
        orth = config.orth_lambda * reg.add_grad_(config.orth_lambda)
        assert orth.item() < 0.1 * task.item(), (orth.item(), task.item())
        optimizer.step()
    assert orth.item() > 0  # the adapter did move inside gamma's subspace, and was charged for it


def test_olora_pushes_the_adapter_out_of_gammas_subspace():
    model, _, a, b = adapter_seeded_like_gamma()
    gamma = {"0.weight": 1e-2 * torch.randn(48, 4) @ a.detach()[:4]}  # A's first 4 rows span gamma's inputs
    reg = build_regularizer(model, gamma, lora_form="olora", rank=4)
    v = torch.linalg.svd(gamma["0.weight"]).Vh[:4].T
    inside, outside = (lambda: (a.detach() @ v).norm()), (lambda: (a.detach() - a.detach() @ v @ v.T).norm())
    with torch.no_grad():  # as after some training: B passes A's output on
        b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(3)))
    before, penalty = (inside(), outside()), reg.loss().item()
    optimizer = torch.optim.SGD([a, b], lr=1e-3)
    for _ in range(300):  # the penalty alone
        optimizer.zero_grad()
        reg.add_grad_(1.0)
        optimizer.step()
    assert inside() < 1e-2 * before[0]  # A's part in gamma's subspace is gone ...
    torch.testing.assert_close(outside(), before[1], rtol=1e-4, atol=0)  # ... and the rest of A is untouched
    assert reg.loss().item() < 1e-3 * penalty


def test_olora_leaves_the_training_rng_alone():
    model, gamma = lora_model()
    torch.manual_seed(5)
    before = torch.get_rng_state()
    build_regularizer(model, gamma, lora_form="olora", rank=2)
    assert torch.equal(torch.get_rng_state(), before)


@settings(max_examples=10, deadline=None)
@given(widths=st.lists(st.integers(1, 40), min_size=2, max_size=4), seed=st.integers(0, 1000))
def test_hard_variant_leaves_update_orthogonal(widths, seed):
    model = mlp(widths, dtype=torch.float32, seed=seed)
    gamma = random_gamma(model, seed=seed + 1)
    meta = {k: v.detach().clone() for k, v in model.named_parameters()}
    reg = build_regularizer(model, gamma)
    for step in range(3):  # as after optimizer steps
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        sizes = {k: p.grad.norm() for k, p in model.named_parameters()}
        reg.project_grad_()
        for k, p in model.named_parameters():
            assert abs((p.grad.double() * gamma[k]).sum()) <= 1e-6 * sizes[k] * gamma[k].norm(), k
        perturb_(model.parameters(), seed=seed + 2 + step)
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        reg.project_()
        for k, p in model.named_parameters():
            update, g = (p.detach() - meta[k]).double(), gamma[k].double()
            # float32 rounding of theta itself is the floor: relative to |theta| |gamma|; d_l = <theta, gamma> - c_l
            # cancels, so a one-element tensor can keep ~10 float32 ulps (seen: 8.5 for widths [40, 1], seed 0)
            assert abs((update * g).sum()) <= 1e-5 * p.detach().double().norm() * g.norm(), k
            removed = (before[k] - p.detach()).double().reshape(-1)
            # only the component along gamma was taken out
            assert torch.linalg.matrix_rank(torch.stack([removed, g.reshape(-1)]), rtol=1e-4) <= 1


def test_hard_variant_lora():
    model, gamma = lora_model()
    layers = adapters(model)
    start = {k: (s * b @ a).detach().clone() for k, (a, b, s, _) in layers.items()}
    reg = build_regularizer(model, gamma, lora_form="exact")
    perturb_([p for n, p in model.named_parameters() if "lora_" in n], seed=9)

    for a, b, _, _ in layers.values():
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    reg.project_grad_()
    for k, (a, b, s, _) in layers.items():  # the first-order change of <s B A, gamma> along the gradient is zero
        change = s * (b.grad @ a + b @ a.grad)
        assert abs((change * gamma[k]).sum()) <= 1e-10 * change.norm() * gamma[k].norm()

    reg.project_()
    for k, (a, b, s, _) in layers.items():
        update = (s * b @ a).detach() - start[k]
        assert abs((update * gamma[k]).sum()) <= 1e-10 * update.norm() * gamma[k].norm()
    assert reg.loss().item() < 1e-20


def test_counts_and_skips():
    model = mlp([4, 5, 3])
    model[1].bias.requires_grad_(False)
    gamma = random_gamma(model, skip=("0.bias",))
    gamma["0.weight"] = torch.zeros_like(gamma["0.weight"])
    reg = build_regularizer(model, gamma)
    # 0.weight: zero gamma; 0.bias: not in gamma; 1.weight: regularized; 1.bias: frozen
    assert reg.counts == {"full": 1, "lora": 0, "zero_gamma": 1, "frozen": 1, "trainable_unregularized": 2}


@pytest.mark.parametrize(
    "change, kwargs, message",
    [
        (lambda g: g.update({"2.weight": torch.ones(1)}), {}, "'2.weight' is not a parameter"),
        (lambda g: g.update({"0.weight": torch.ones(3, 3)}), {}, "'0.weight' has shape (3, 3)"),
        (lambda g: g.update({"0.weight": torch.ones(5, 4, dtype=torch.int64)}), {}, "'0.weight' is not a floating"),
        (lambda g: [g.__setitem__(k, torch.zeros_like(v)) for k, v in g.items()], {}, "regularizes no trainable"),
        (lambda g: None, {"reduction": "l1"}, "reduction 'l1'"),
        (lambda g: None, {"mode": "lora"}, "no LoRA adapters"),
        (lambda g: None, {"rank": 0}, "rank 0"),
    ],
)
def test_bad_input(change, kwargs, message):
    model = mlp([4, 5, 3])
    gamma = random_gamma(model)
    change(gamma)
    with pytest.raises(CapvectorError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_regularizer(model, gamma, **kwargs)


def test_ddp_wrapped_model_uses_unwrapped_names():
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            model = mlp([4, 5, 3])
            gamma = random_gamma(model)
            wrapped = nn.parallel.DistributedDataParallel(model)
            reg = build_regularizer(wrapped, gamma)
            assert reg.counts["full"] == 4
            perturb_(model.parameters())
            wrapped(torch.randn(2, 4, dtype=torch.float64)).sum().backward()
            assert reg.add_grad_(1.0).item() > 0
        finally:
            dist.destroy_process_group()


# ---- behaviour: the regularizer keeps a capability that plain SFT erases ---------------------------------------


def train_regression(variant: str, steps: int = 300) -> tuple[float, float]:
    """Linear model y = <w, x> from theta_meta = w_pt + gamma (gamma = 1.5 u, u a unit capability direction).

    The downstream targets come from w_pt + v with v orthogonal to u: the task needs v and knows nothing of the
    capability, so its gradient pulls the weights back along -u. Returns (projection on u kept, i.e.
    <w - w_pt, u> / 1.5, and the distance to the downstream solution off u).
    """
    torch.manual_seed(0)
    dim = 8
    u = torch.nn.functional.normalize(torch.randn(dim), dim=0)
    v = torch.randn(dim)
    v -= (v @ u) * u
    w_pt = torch.randn(dim)
    model = nn.Linear(dim, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w_pt + 1.5 * u)
    reg = build_regularizer(model, {"weight": 1e-2 * u[None]})  # gamma's scale does not matter (normalized)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.0)
    x = torch.linalg.qr(torch.randn(256, dim)).Q * 16  # whitened inputs: the directions do not interact
    y = x @ (w_pt + v)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x).squeeze(1), y)
        if variant == "loss":
            loss = loss + 100.0 * reg.loss()
        loss.backward()
        if variant == "fused":
            reg.add_grad_(100.0)
        if variant == "hard":
            reg.project_grad_()
        optimizer.step()
        if variant == "hard":
            reg.project_()
    w = model.weight.detach()[0]
    kept = float((w - w_pt) @ u) / 1.5
    off = w - w_pt - v
    return kept, float((off - (off @ u) * u).norm())


def test_sft_erases_the_capability():
    kept, fit = train_regression("sft")
    assert kept < 0.05 and fit < 0.05


@pytest.mark.parametrize("variant", ["loss", "fused", "hard"])
def test_regularizer_keeps_the_capability(variant):
    kept, fit = train_regression(variant)
    assert kept > 0.9, kept  # plain SFT leaves < 0.05 of it
    assert fit < 0.05  # while the downstream task is still learned
