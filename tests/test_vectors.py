"""extract / merge / inspect on real checkpoint files, checked bit for bit against independent float32 arithmetic."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from capvector.cli import main
from capvector.errors import CapvectorError
from capvector.params.checkpoints import open_checkpoint
from capvector.params.inspection import inspect, layer_of
from capvector.params.lowrank import truncated_svd
from capvector.params.merging import alpha_for, merge, parse_alpha_arguments
from capvector.params.vectors import LEFT, RIGHT, extract, open_vector

SHAPES = {
    "model.embed.weight": (40, 16),
    "model.layers.0.attn.weight": (16, 16),
    "model.layers.0.attn.bias": (16,),
    "model.layers.1.mlp.weight": (32, 16),
    "model.layers.1.norm.weight": (16,),
    "action_head.weight": (7, 16),
}


@pytest.fixture
def three_models(random_state, perturbed, write_checkpoint):
    """three_models(tmp_path, layout, dtype) -> (paths, pt, ft, ao): a base, a finetune and an auxiliary finetune
    with one tensor of its own, saved in `layout`."""

    def build(tmp_path, layout="single", dtype=torch.float32):
        pt = random_state(SHAPES, dtype)
        ft, ao = perturbed(pt, 1), perturbed(pt, 2, scale=0.02)
        ao["aux_projector.weight"] = torch.randn(4, 16).to(dtype)  # only in the auxiliary model
        states = (("pt", pt), ("ft", ft), ("ao", ao))
        return {name: write_checkpoint(tmp_path / name, state, layout) for name, state in states}, pt, ft, ao

    return build


def reference_merge(pt, ao, ft, alpha, keys):
    """pt + alpha * (ao - ft) in float32, rounded once to the model's dtype (what mergekit's task_arithmetic writes);
    tensors outside `keys` or with alpha 0 as they are."""
    out = {}
    for name, tensor in pt.items():
        scale = alpha(name)
        if name in keys and scale != 0:
            out[name] = (tensor.float() + scale * (ao[name].float() - ft[name].float())).to(tensor.dtype)
        else:
            out[name] = tensor
    return out


def assert_states_equal(actual, expected):
    """Same names, dtypes, shapes and bytes."""
    assert actual.keys() == expected.keys()
    for name in expected:
        a, e = actual[name], expected[name]
        assert (a.dtype, a.shape) == (e.dtype, e.shape), name
        assert torch.equal(a.reshape(-1).view(torch.uint8), e.reshape(-1).view(torch.uint8)), name


@pytest.mark.parametrize("layout", ["single", "sharded", "bin", "file"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_of_extract_equals_float32_arithmetic_bitwise(tmp_path, layout, dtype, read_state, three_models):
    paths, pt, ft, ao = three_models(tmp_path, layout, dtype)
    gamma = extract(paths["ao"], paths["ft"], tmp_path / "gamma")
    assert set(gamma) == set(SHAPES)
    assert gamma.metadata["skipped"]["only_in_aux"] == ["aux_projector.weight"]
    out = tmp_path / ("meta.safetensors" if layout == "file" else "meta")
    merge(paths["pt"], tmp_path / "gamma", out)
    expected = reference_merge(pt, ao, ft, lambda n: 1.0, set(SHAPES))
    assert_states_equal(read_state(out), expected)
    assert gamma.metadata["dtype"] == "float32" and not gamma.metadata["rounded_below_float32"]
    if layout != "file":  # the same layout, and every non-weight file
        inputs = sorted(p.relative_to(paths["pt"]) for p in paths["pt"].rglob("*"))
        outputs = sorted(p.relative_to(out) for p in out.rglob("*"))
        assert set(inputs) <= set(outputs)
        assert {str(p) for p in set(outputs) - set(inputs)} == {"capvector_merge.json"}
        assert (out / "normalization" / "stats.json").read_text() == (
            paths["pt"] / "normalization" / "stats.json"
        ).read_text()
        record = json.loads((out / "capvector_merge.json").read_text())
        assert record["alpha"] == 1.0 and record["vector"]["formula"] == "gamma = theta_ao - theta_ft"
    if layout == "sharded":
        assert json.loads((out / "model.safetensors.index.json").read_text()) == json.loads(
            (paths["pt"] / "model.safetensors.index.json").read_text()
        )


def test_alpha_scalar_and_patterns(tmp_path, read_state, three_models):
    paths, pt, ft, ao = three_models(tmp_path, "single", torch.bfloat16)
    extract(paths["ao"], paths["ft"], tmp_path / "gamma")
    alpha, patterns = parse_alpha_arguments(["0.5", "model.layers.*=2", "model.layers.1.*=-1", "action_head.*=0"])
    merge(paths["pt"], tmp_path / "gamma", tmp_path / "meta", alpha=alpha, alpha_patterns=patterns)

    def scale(name):
        return alpha_for(name, alpha, patterns)

    assert (
        scale("model.layers.1.mlp.weight") == -1
        and scale("model.layers.0.attn.bias") == 2
        and scale("model.embed.weight") == 0.5
    )
    expected = reference_merge(pt, ao, ft, scale, set(SHAPES))
    actual = read_state(tmp_path / "meta")
    assert_states_equal(actual, expected)
    assert torch.equal(actual["action_head.weight"], pt["action_head.weight"])  # alpha 0: copied byte for byte


def test_include_exclude_and_dtype(tmp_path, three_models):
    paths, _, ft, ao = three_models(tmp_path)
    gamma = extract(
        paths["ao"], paths["ft"], tmp_path / "gamma", include=["model.*"], exclude=["*.bias"], dtype="bfloat16"
    )
    assert set(gamma) == {
        "model.embed.weight",
        "model.layers.0.attn.weight",
        "model.layers.1.mlp.weight",
        "model.layers.1.norm.weight",
    }
    assert sorted(gamma.metadata["skipped"]["excluded"]) == ["action_head.weight", "model.layers.0.attn.bias"]
    assert all(gamma.lazy(name).dtype == torch.bfloat16 for name in gamma)
    header = json.loads(open_checkpoint(tmp_path / "gamma").files[0].metadata["capvector"])
    assert header["include"] == ["model.*"] and header["exclude"] == ["*.bias"]
    for name in gamma:
        torch.testing.assert_close(gamma[name], (ao[name] - ft[name]).to(torch.bfloat16))
        assert header["norms"][name] == pytest.approx(float(gamma[name].double().norm()), rel=1e-5)
    assert (
        header["sources"]["aux"]["sha256"]["model.safetensors"]
        == __import__("hashlib").sha256((paths["ao"] / "model.safetensors").read_bytes()).hexdigest()
    )


def test_task_vector_and_inspect(tmp_path, three_models):
    paths, pt, ft, ao = three_models(tmp_path)
    extract(paths["ao"], paths["ft"], tmp_path / "gamma", pretrained=paths["pt"], task_vector_output=tmp_path / "tau")
    tau = open_vector(tmp_path / "tau")
    for name in SHAPES:
        torch.testing.assert_close(tau[name], ft[name] - pt[name])
    report = inspect(tmp_path / "gamma", against=tmp_path / "tau", base=paths["pt"])
    gamma_flat = torch.cat([(ao[n].double() - ft[n].double()).flatten() for n in SHAPES])
    tau_flat = torch.cat([(ft[n].double() - pt[n].double()).flatten() for n in SHAPES])
    pt_flat = torch.cat([pt[n].double().flatten() for n in SHAPES])
    assert report.total.norm == pytest.approx(float(gamma_flat.norm()), rel=1e-5)
    assert report.total.relative == pytest.approx(float(gamma_flat.norm() / pt_flat.norm()), rel=1e-5)
    assert report.total.cosine == pytest.approx(
        float(torch.nn.functional.cosine_similarity(gamma_flat, tau_flat, dim=0)), abs=1e-5
    )
    assert {row.name for row in report.layers} == {"model.embed", "model.layers.0", "model.layers.1", "action_head"}
    assert "model.layers.1" in report.table()
    assert report.plot(tmp_path / "plot.png").stat().st_size > 1000


def test_vector_arithmetic_is_lazy_and_exact(tmp_path, three_models):
    paths, pt, ft, ao = three_models(tmp_path)
    gamma = extract(paths["ao"], paths["ft"])
    tau = extract(paths["ft"], paths["pt"])
    combined = 2.0 * gamma - tau
    for name in SHAPES:
        torch.testing.assert_close(
            combined[name].double(),
            2 * (ao[name].double() - ft[name].double()) - (ft[name].double() - pt[name].double()),
            rtol=1e-5,
            atol=1e-6,
        )
    expected_dot = sum(
        float(((ao[n].double() - ft[n].double()) * (ft[n].double() - pt[n].double())).sum()) for n in SHAPES
    )
    assert gamma.dot(tau) == pytest.approx(expected_dot, rel=1e-4)
    assert gamma.cosine(gamma) == pytest.approx(1.0)
    saved = combined.save(tmp_path / "combined")
    torch.testing.assert_close(saved["model.embed.weight"], combined["model.embed.weight"])


def test_layer_names():
    assert layer_of("model.layers.12.self_attn.q_proj.weight") == "model.layers.12"
    assert layer_of("trunk.layers.3.mlp.fc1.bias") == "trunk.layers.3"
    assert layer_of("lm_head.weight") == "lm_head"


# --- low rank -----------------------------------------------------------------------------------------------------


def test_truncated_svd_error_matches_dropped_singular_values():
    generator = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(60, 30, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(40, 30, generator=generator))
    singular = torch.logspace(0, -3, 30)
    matrix = (u * singular) @ v.T
    for rank in (1, 5, 12):
        left, right, error = truncated_svd(matrix, rank)
        expected = float(singular[rank:].square().sum().sqrt() / singular.square().sum().sqrt())
        assert error == pytest.approx(expected, rel=1e-3, abs=1e-6)
        assert float(
            torch.linalg.matrix_norm(matrix - left @ right) / torch.linalg.matrix_norm(matrix)
        ) == pytest.approx(error, rel=1e-3, abs=1e-6)


def test_low_rank_vector_round_trip_and_merge(tmp_path, random_state, read_state, write_checkpoint):
    pt = random_state({"a.weight": (48, 32), "a.bias": (48,)})
    generator = torch.Generator().manual_seed(3)
    delta = torch.randn(48, 3, generator=generator) @ torch.randn(3, 32, generator=generator)  # rank 3 exactly
    ft = {name: t.clone() for name, t in pt.items()}
    ao = {"a.weight": pt["a.weight"] + delta, "a.bias": pt["a.bias"] + 0.1}
    for name, state in (("pt", pt), ("ft", ft), ("ao", ao)):
        write_checkpoint(tmp_path / name, state)
    gamma = extract(tmp_path / "ao", tmp_path / "ft", tmp_path / "gamma", rank=3)
    stored = open_checkpoint(tmp_path / "gamma")
    assert set(stored) == {"a.weight" + LEFT, "a.weight" + RIGHT, "a.bias"}  # 1-D tensors stay dense
    assert gamma.metadata["lowrank_relative_error"]["a.weight"] < 1e-5
    torch.testing.assert_close(gamma["a.weight"], delta, rtol=1e-4, atol=1e-4)
    merge(tmp_path / "pt", tmp_path / "gamma", tmp_path / "meta")
    torch.testing.assert_close(read_state(tmp_path / "meta")["a.weight"], ao["a.weight"], rtol=1e-4, atol=1e-4)


def test_low_rank_norms_are_those_of_the_stored_vector(tmp_path, capsys, read_state, write_checkpoint):
    """The norms recorded and printed are of left @ right as stored (rounded to the stored dtype), beside the exact
    relative error of that stored product against the full difference."""
    generator = torch.Generator().manual_seed(4)
    pt = {"w.weight": torch.randn(40, 24, generator=generator), "w.bias": torch.randn(40, generator=generator)}
    ao = {name: t + 0.1 * torch.randn(t.shape, generator=generator) for name, t in pt.items()}  # full rank
    for name, state in (("ft", pt), ("ao", ao)):
        write_checkpoint(tmp_path / name, state)
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"gamma_{dtype}"
        argv = ["extract", "--aux", tmp_path / "ao", "--sft", tmp_path / "ft", "-o", out, "--rank", 3, "--dtype", dtype]
        assert main([str(a) for a in argv]) == 0
        printed = capsys.readouterr().out
        stored = read_state(out)
        product = stored["w.weight" + LEFT].double() @ stored["w.weight" + RIGHT].double()
        full = ao["w.weight"].double() - pt["w.weight"].double()
        metadata = open_vector(out).metadata
        assert metadata["norms"]["w.weight"] == pytest.approx(float(product.norm()), rel=1e-9)
        assert metadata["norms"]["w.weight"] < 0.9 * float(full.norm())  # not the full difference's norm
        error = float((full - product).norm() / full.norm())
        assert metadata["lowrank_relative_error"]["w.weight"] == pytest.approx(error, rel=1e-9)
        bias = stored["w.bias"].double()
        global_norm = (product.square().sum() + bias.square().sum()).sqrt()
        assert metadata["global_norm"] == pytest.approx(float(global_norm), rel=1e-6)
        lost = float((full - product).norm() / (full.square().sum() + bias.square().sum()).sqrt())
        assert metadata["global_lowrank_relative_error"] == pytest.approx(lost, rel=1e-3)
        assert f"|gamma| = {metadata['global_norm']:.6g} as stored at rank 3" in printed
        assert f"relative error {metadata['global_lowrank_relative_error']:.3g}" in printed


@pytest.mark.parametrize("rank", ["0", "-3"])
def test_rank_must_be_a_positive_integer(tmp_path, capsys, rank, random_state, write_checkpoint):
    write_checkpoint(tmp_path / "ft", random_state({"w": (8, 4)}))
    write_checkpoint(tmp_path / "ao", random_state({"w": (8, 4)}, seed=1))
    argv = ["extract", "--aux", tmp_path / "ao", "--sft", tmp_path / "ft", "-o", tmp_path / "g", "--rank", rank]
    assert main([str(a) for a in argv]) == 2
    assert "--rank must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()
    with pytest.raises(SystemExit) as exit_info:  # not an integer at all: argparse's usage error, also exit 2
        main([str(a) for a in argv[:-1]] + ["1.5"])
    assert exit_info.value.code == 2


def test_lossy_dtype_rounds_twice_and_says_so(tmp_path, capsys, perturbed, random_state, read_state, write_checkpoint):
    """--dtype bfloat16 halves the vector but rounds gamma; merging it rounds again, so some elements end one bf16
    step off the exact result. The CLI says so; the default float32 vector is exact (tested above)."""
    shapes = {"w": (256, 64)}
    pt = random_state(shapes, torch.bfloat16)
    ft, ao = perturbed(pt, 1, scale=0.3), perturbed(pt, 2, scale=0.3)
    for name, state in (("pt", pt), ("ft", ft), ("ao", ao)):
        write_checkpoint(tmp_path / name, state)
    argv = ["extract", "--aux", tmp_path / "ao", "--sft", tmp_path / "ft", "-o", tmp_path / "g", "--dtype", "bf16"]
    assert main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    assert "rounded to bfloat16" in printed and "merge rounds again" in printed and "float32" in printed
    assert open_vector(tmp_path / "g").metadata["rounded_below_float32"] is True
    merge(tmp_path / "pt", tmp_path / "g", tmp_path / "meta", alpha=0.7)
    merged, exact = read_state(tmp_path / "meta")["w"], reference_merge(pt, ao, ft, lambda n: 0.7, {"w"})["w"]
    twice = (pt["w"].float() + 0.7 * (ao["w"].float() - ft["w"].float()).bfloat16().float()).bfloat16()
    assert torch.equal(merged.view(torch.int16), twice.view(torch.int16))  # what it documents, exactly
    assert (merged != exact).float().mean() > 0.01  # and it is not the exact result
    assert main([str(a) for a in [*argv[:-2], "-o", tmp_path / "g32"]]) == 0
    assert "note:" not in capsys.readouterr().out


def test_zero_size_tensors(tmp_path, perturbed, random_state, read_state, write_checkpoint):
    shapes = {"empty.weight": (0, 16), "empty.bias": (0,), "wide.weight": (16, 0), "w.weight": (16, 8)}
    pt = random_state(shapes, torch.bfloat16)
    ft, ao = perturbed(pt, 1), perturbed(pt, 2)
    for name, state in (("pt", pt), ("ft", ft), ("ao", ao)):
        write_checkpoint(tmp_path / name, state, "sharded")
    gamma = extract(
        tmp_path / "ao",
        tmp_path / "ft",
        tmp_path / "gamma",
        pretrained=tmp_path / "pt",
        task_vector_output=tmp_path / "tau",
    )
    assert set(gamma) == set(shapes) and gamma.metadata["norms"]["empty.weight"] == 0.0
    assert gamma["empty.weight"].shape == (0, 16) and gamma["wide.weight"].shape == (16, 0)
    merge(tmp_path / "pt", tmp_path / "gamma", tmp_path / "meta", alpha=0.5)
    assert_states_equal(read_state(tmp_path / "meta"), reference_merge(pt, ao, ft, lambda n: 0.5, set(shapes)))
    report = inspect(tmp_path / "gamma", against=tmp_path / "tau", base=tmp_path / "pt")
    rows = {row.name: row for row in report.tensors}
    assert rows["empty.weight"].numel == 0 and rows["empty.weight"].norm == 0.0 and rows["empty.weight"].cosine is None
    assert "empty" in report.table(per_tensor=True)
    low_rank = extract(tmp_path / "ao", tmp_path / "ft", tmp_path / "gamma_r2", rank=2)
    assert set(low_rank) == set(shapes) and low_rank["wide.weight"].shape == (16, 0)
    for folder in ("gamma", "tau", "meta", "gamma_r2"):
        for file in (tmp_path / folder).glob("*.safetensors"):
            with safe_open(file, "pt") as f:  # every file written opens with safetensors' own reader
                for key in f.keys():  # noqa: SIM118 (a safe_open handle is not a mapping)
                    f.get_tensor(key)


def test_inspect_lists_tensors_in_model_order(tmp_path, capsys, random_state, write_checkpoint):
    numbers = [10, 2, 1, 11, 0]
    shapes = {f"model.layers.{i}.mlp.weight": (4, 4) for i in numbers} | {"model.layers.2.attn.weight": (4, 4)}
    write_checkpoint(tmp_path / "ft", random_state(shapes))
    write_checkpoint(tmp_path / "ao", random_state(shapes, seed=1))
    extract(tmp_path / "ao", tmp_path / "ft", tmp_path / "gamma")
    report = inspect(tmp_path / "gamma")
    assert [row.name for row in report.layers] == [f"model.layers.{i}" for i in sorted(numbers)]
    assert [row.name for row in report.tensors][2:4] == ["model.layers.2.attn.weight", "model.layers.2.mlp.weight"]
    assert main(["inspect", str(tmp_path / "gamma")]) == 0
    table = capsys.readouterr().out
    assert [table.index(f"model.layers.{i} ") for i in sorted(numbers)] == sorted(
        table.index(f"model.layers.{i} ") for i in numbers
    )


# --- property-based ---------------------------------------------------------------------------------------------

shape = st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shapes=st.dictionaries(
        st.from_regex(r"[a-z]{1,6}(\.[0-9]){0,2}\.weight", fullmatch=True), shape, min_size=1, max_size=5
    ),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    extra_ft=st.booleans(),
    alpha=st.floats(-2, 2, allow_nan=False),
    layout=st.sampled_from(["single", "sharded", "bin"]),
    seed=st.integers(0, 1000),
)
def test_property_merge_extract(
    tmp_path_factory,
    shapes,
    dtype,
    extra_ft,
    alpha,
    layout,
    seed,
    perturbed,
    random_state,
    read_state,
    write_checkpoint,
):
    tmp_path = tmp_path_factory.mktemp("prop")
    pt = random_state(shapes, dtype, seed)
    ft, ao = perturbed(pt, seed + 1), perturbed(pt, seed + 2)
    if extra_ft:
        ft["only_in_ft.weight"] = torch.zeros(2, dtype=dtype)
    for name, state in (("pt", pt), ("ft", ft), ("ao", ao)):
        write_checkpoint(tmp_path / name, state, layout, extra_files=False)
    gamma = extract(tmp_path / "ao", tmp_path / "ft", tmp_path / "gamma", hash_sources=False)
    assert set(gamma) == set(shapes)
    assert gamma.metadata["skipped"]["only_in_sft"] == (["only_in_ft.weight"] if extra_ft else [])
    merge(tmp_path / "pt", tmp_path / "gamma", tmp_path / "meta", alpha=alpha)
    expected = reference_merge(pt, ao, ft, lambda n: alpha, set(shapes))
    assert_states_equal(read_state(tmp_path / "meta"), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_native_fast_path_equals_float32_arithmetic_bitwise(dtype, sign):
    """a ± b computed in the stored dtype must round exactly like float32 arithmetic followed by one rounding."""
    from capvector.params.lazy import Combination, InMemoryTensor

    generator = torch.Generator().manual_seed(0)
    a = InMemoryTensor("w", torch.randn(512, 1024, generator=generator).to(dtype))
    b = InMemoryTensor("w", (0.01 * torch.randn(512, 1024, generator=generator)).to(dtype))
    combined = Combination([(1.0, a), (sign, b)])
    fast = combined.read_native(0, 512)
    assert fast is not None and fast.dtype == dtype
    assert torch.equal(fast.view(torch.int16), combined.read(0, 512).to(dtype).view(torch.int16))
    assert Combination([(1.0, a), (0.5, b)]).read_native(0, 512) is None  # other scales go through float32


def test_membership_reads_no_tensor(tmp_path, monkeypatch, random_state, write_checkpoint):
    """`name in checkpoint` and `a.keys() - b.keys()` look at names only (Mapping's own `in` reads the tensor: it made
    every extract read the whole SFT model twice before writing anything)."""
    from capvector.params.lazy import StoredTensor
    from capvector.params.vectors import difference

    write_checkpoint(tmp_path / "a", random_state({"w": (4, 4), "only_a": (2,)}))
    write_checkpoint(tmp_path / "b", random_state({"w": (4, 4)}, seed=1))
    a, b = open_checkpoint(tmp_path / "a"), open_checkpoint(tmp_path / "b")

    def no_reading(self, start, stop):
        raise AssertionError(f"read {self.name}")

    monkeypatch.setattr(StoredTensor, "read_native", no_reading)
    assert "w" in a and "only_a" not in b and a.keys() - b.keys() == {"only_a"}
    assert difference(a, b).metadata["skipped"]["only_in_aux"] == ["only_a"]


FAULTS_OF_REUSED_BUFFERS = """
import resource, sys, torch
if sys.argv[1] == "retain":
    from capvector.params.streaming import retain_freed_memory
    retain_freed_memory()
torch.empty(40 << 20, dtype=torch.uint8).fill_(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.empty(40 << 20, dtype=torch.uint8).fill_(1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_retain_freed_memory_reuses_freed_buffers():
    """What `capvector extract` and `merge` call first: a freed 40 MB buffer (above glibc's largest dynamic mmap
    threshold, so by default returned to the kernel on every free) is then reused more often than faulted in anew."""
    faults = {
        mode: int(
            subprocess.run(
                [sys.executable, "-c", FAULTS_OF_REUSED_BUFFERS, mode], capture_output=True, text=True, check=True
            ).stdout
        )
        for mode in ("default", "retain")
    }
    pages = 10 * (40 << 20) // resource.getpagesize()
    assert faults["default"] >= 0.9 * pages
    assert faults["retain"] <= 0.7 * faults["default"]


@pytest.mark.parametrize(
    ("dtype", "pretrained", "added", "problem"),
    [
        (torch.float16, 65000.0, 2000.0, "overflows to Inf when combined"),  # finite in float32, Inf in float16
        (torch.bfloat16, 1.0, float("nan"), "contains NaN or Inf"),
        (torch.bfloat16, 1e30, 1.0, None),  # squares overflow float32: looked at element by element, and fine
        (torch.float16, 1.0, 0.5, None),
    ],
)
def test_merged_rows_that_round_to_inf_or_hold_nan_are_refused(dtype, pretrained, added, problem):
    """The cheap finiteness check of computed rows (sum of squares before rounding) catches NaN and a value that only
    rounding to the output dtype makes infinite, and a large but finite tensor still passes."""
    from capvector.params.lazy import Combination, InMemoryTensor
    from capvector.params.streaming import OutputTensor, evaluate_chunk

    pt = InMemoryTensor("w", torch.full((4, 8), pretrained).to(dtype), "pt")
    gamma = torch.zeros(4, 8)
    gamma[2, 5] = added
    tensor = OutputTensor("w", Combination([(1.0, pt), (0.5, InMemoryTensor("w", gamma, "gamma"))], dtype), dtype)
    if problem is None:
        data, _ = evaluate_chunk(tensor, 0, 4, statistics=False)
        assert torch.isfinite(data.view(dtype)).all()
    else:
        with pytest.raises(CapvectorError, match=problem):
            evaluate_chunk(tensor, 0, 4, statistics=False)


def _direct_io_supported(folder) -> bool:
    import os

    try:
        fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0))
    except OSError:
        return False
    os.close(fd)
    return hasattr(os, "O_DIRECT")


@pytest.mark.parametrize("direct", [True, False])
def test_output_files_hold_the_same_bytes_written_direct_or_through_the_page_cache(tmp_path, monkeypatch, direct):
    """Writes of any size, across staging-buffer boundaries and ending mid-block, give exactly the bytes written, past
    the page cache where the file system allows it (the last block padded, then cut off) or through it."""
    from capvector.params import streaming

    monkeypatch.setattr(streaming, "STAGING_BYTES", 3 * streaming.DIRECT_ALIGNMENT)
    pieces = [torch.randint(0, 256, (n,), dtype=torch.uint8).numpy().tobytes() for n in (5, 4096, 9000, 1, 12288, 77)]
    stream = streaming.OutputStream(tmp_path / "out.bin", direct=direct)
    assert stream.direct == (direct and _direct_io_supported(tmp_path))
    with stream:
        for index, piece in enumerate(pieces):
            stream.write(memoryview(piece), f"piece {index}")
    assert (tmp_path / "out.bin").read_bytes() == b"".join(pieces)
    with streaming.OutputStream(tmp_path / "empty.bin", direct=direct):
        pass
    assert (tmp_path / "empty.bin").read_bytes() == b""


def test_a_file_system_that_refuses_direct_writes_is_written_through_the_page_cache(tmp_path, monkeypatch):
    """Some file systems accept O_DIRECT when the file is opened and refuse the first write (EINVAL): the stream then
    goes on through the page cache with the same bytes."""
    import errno
    import fcntl
    import os

    from capvector.params import streaming

    if not _direct_io_supported(tmp_path):
        pytest.skip("this file system has no direct I/O")
    write = os.write

    def refusing_direct(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return write(fd, data)

    monkeypatch.setattr(streaming.os, "write", refusing_direct)
    payload = bytes(range(256)) * 100
    with streaming.OutputStream(tmp_path / "out.bin") as stream:
        stream.write(memoryview(payload), "payload")
    assert not stream.direct and (tmp_path / "out.bin").read_bytes() == payload
