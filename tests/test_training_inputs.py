"""Bad input to `train` ends in one line and exit 2, before anything is touched: config values out of range, a
theta_meta merged from another vector, and anything a config file or an override may hold (hypothesis)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import typing

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import capvector.training.engine as engine
from capvector.cli import main
from capvector.errors import CapvectorError
from capvector.params.merging import merge
from capvector.params.vectors import extract
from capvector.training.config import TrainConfig, checked, load_config
from capvector.training.engine import train
from test_training import saved_policy, toy_config, weights


def run_cli(*arguments: str) -> tuple[int, str]:
    """`capvector train ...`: the exit code and what went to stderr."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            code = main(["train", *arguments])
        except SystemExit as exit:  # argparse's own errors
            code = exit.code
    return code, stderr.getvalue()


@pytest.mark.parametrize(
    "override, message",
    [
        ("keep_checkpoints=-1", "field 'keep_checkpoints' is -1; it must be 0 (keep all) or at least 2"),
        ("keep_checkpoints=1", "field 'keep_checkpoints' is 1; it must be 0 (keep all) or at least 2"),
        ("steps=0", "field 'steps' is 0; it must be at least 1"),
        ("batch_size=-8", "field 'batch_size' is -8; it must be at least 1"),
        ("lr=0", "field 'lr' is 0.0; it must be above 0"),
        ("lr=-1e-4", "field 'lr' is -0.0001; it must be above 0"),
        ("lr=.nan", "field 'lr' is nan; give a finite number"),
        ("grad_clip=.inf", "field 'grad_clip' is inf; give a finite number"),
        ("min_lr=1e-3", "field 'min_lr' is 0.001, above lr 0.0001"),
        ("beta2=1", "field 'beta2' is 1.0; it must be in [0, 1)"),
        ("lora_dropout=1.5", "field 'lora_dropout' is 1.5; it must be in [0, 1)"),
        ("log_every=0", "field 'log_every' is 0; it must be at least 1"),
        ("orth_rank=0", "field 'orth_rank' is 0; it must be at least 1"),
        ("seed=-1", "field 'seed' is -1; it must be in [0, 2**32)"),
        ("num_workers=-2", "field 'num_workers' is -2; it must be at least 0"),
        ("device=gpu", "field 'device' is 'gpu'; use 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ("orth_reduction=l2", "field 'orth_reduction' is 'l2'; choose one of: normalized, square, abs"),
        ("finetune=qlora", "field 'finetune' is 'qlora'; choose one of: full, lora"),
        ("policy_args={when: 2001-01-01}", "field 'policy_args': expected a mapping of names to plain values"),
        ("out_dir=null", "field 'out_dir': expected str, got None"),
    ],
)
def test_a_value_out_of_range_is_named_when_the_config_is_read(override, message):
    with pytest.raises(CapvectorError, match="^config: " + re.escape(message)):
        load_config(None, [override])


def test_out_of_range_values_touch_nothing_and_exit_2(tmp_path):
    run = train(toy_config(tmp_path / "run", checkpoint_every=4, keep_checkpoints=0))
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    config_file = tmp_path / "run.yaml"
    config_file.write_text(json.dumps(dataclasses.asdict(toy_config(run))))
    code, stderr = run_cli("--config", str(config_file), "--set", "keep_checkpoints=-1", "--resume")
    assert code == 2 and stderr.count("\n") == 1 and "'keep_checkpoints' is -1" in stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert before == ["step_0000004", "step_0000008", "step_0000012"]
    # a config built in Python goes through the same checks
    with pytest.raises(CapvectorError, match="field 'steps' is 0"):
        train(toy_config(tmp_path / "python", steps=0))
    assert not (tmp_path / "python").exists()


def test_a_batch_that_does_not_split_across_the_processes_is_refused_before_the_process_group(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun sets it; no process group is started before the check
    with pytest.raises(CapvectorError, match="field 'batch_size' is 8, which does not split evenly across 3"):
        train(toy_config(tmp_path / "run", batch_size=8))
    assert not (tmp_path / "run").exists()


# ---- strategy capvector starts from theta_pt + alpha * gamma for its own gamma ---------------------------------


@pytest.fixture
def merged(tmp_path):
    """theta_pt, two vectors, and theta_pt + gamma merged by `capvector merge`."""
    pt, aux, sft = (saved_policy(tmp_path / name, seed) for name, seed in (("pt", 0), ("aux", 1), ("sft", 2)))
    extract(aux, sft, tmp_path / "gamma").close()
    extract(sft, aux, tmp_path / "other").close()
    merge(pt, tmp_path / "gamma", tmp_path / "meta", alpha=0.5)
    return tmp_path


def capvector_config(folder, init_from: str, vector: str, **fields) -> TrainConfig:
    return toy_config(
        folder / "run", strategy="capvector", init_from=str(folder / init_from), vector=str(folder / vector), **fields
    )


def test_capvector_starts_from_the_merge_of_its_own_vector(merged):
    start = load_file(str(merged / "meta" / "model.safetensors"))
    trained = weights(train(capvector_config(merged, "meta", "gamma", steps=2)))
    assert not all(trained[k].equal(start[k]) for k in start)


@pytest.mark.parametrize(
    "init_from, vector, message",
    [
        ("meta", "other", r"init_from \S+meta was merged from another vector \(created .*\) than vector \S+other"),
        ("pt", "gamma", r"init_from \S+pt has no merge record \(capvector_merge.json\)"),
    ],
)
def test_capvector_refuses_a_theta_meta_of_another_vector(merged, init_from, vector, message):
    config = capvector_config(merged, init_from, vector)
    with pytest.raises(CapvectorError, match=message + ".*or set check_merge=false"):
        train(config)
    assert not (merged / "run").exists()
    train(dataclasses.replace(config, check_merge=False, steps=2))  # the way out the message names


def test_capvector_refuses_a_vector_without_metadata(merged):
    plain = {"head.weight": torch.ones(4, 16)}  # a Mapping given to train(): nothing says where it came from
    with pytest.raises(CapvectorError, match="the vector given to train\\(\\) carries no capvector metadata"):
        train(capvector_config(merged, "meta", "gamma"), vector=plain)


# ---- fuzz: whatever a config file or an override holds, exit 2 or a correct start ----------------------------

HINTS = typing.get_type_hints(TrainConfig)
FACTORIES = {"policy": "toy:make_policy", "dataset": "toy:make_dataset", "auxiliary": "toy:make_auxiliary"}
BAD_FACTORIES = ["", "toy:nothing", "toy", ".x:f", "no_such_module:f", "toy:TOY"]
ANYTHING = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def fitting(name: str) -> st.SearchStrategy[typing.Any]:
    """Values of the field's type, mostly in range."""
    hint = HINTS[name]
    if typing.get_origin(hint) is typing.Literal:
        return st.sampled_from(typing.get_args(hint))
    if name in FACTORIES:
        return st.just(FACTORIES[name]) | st.sampled_from(BAD_FACTORIES)
    return {
        bool: st.booleans(),
        int: st.integers(0, 40) | st.integers(-3, 0),
        float: st.floats(0, 1),
        str: st.text(max_size=20),
        str | None: st.none() | st.text(max_size=20),
        list[str]: st.lists(st.text(max_size=6), max_size=3),
        dict[str, typing.Any]: st.dictionaries(st.sampled_from(["hidden", "dropout", "size"]), ANYTHING, max_size=2),
    }[hint]


@st.composite
def config_values(draw: st.DrawFn) -> dict[str, typing.Any]:
    """A mapping of mostly known fields to mostly fitting values, on top of a config that starts."""
    values = {"policy": "toy:make_policy", "dataset": "toy:make_dataset", "out_dir": "run", "progress": False}
    for _ in range(draw(st.integers(0, 5))):
        name = draw(st.sampled_from(sorted(HINTS)) if draw(st.integers(0, 4)) else st.text(max_size=8))
        values[name] = draw(fitting(name) if name in HINTS and draw(st.integers(0, 4)) else ANYTHING)
    return values


def toml_value(value: typing.Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return (
        {None: '""', True: "true", False: "false"}.get(value, json.dumps(value))
        if not isinstance(value, (int, float)) or isinstance(value, bool)
        else json.dumps(value)
    )


def toml_text(values: dict[str, typing.Any]) -> str:
    """TOML (None written as "", NaN and infinities as JSON writes them, which TOML refuses: inputs too)."""
    return "".join(f"{json.dumps(key)} = {toml_value(value)}\n" for key, value in values.items())


CONTENTS = st.one_of(
    config_values().map(lambda v: ("yaml", yaml.safe_dump(v).encode())),
    config_values().map(lambda v: ("yml", yaml.safe_dump(v).encode())),
    config_values().map(lambda v: ("toml", toml_text(v).encode())),
    st.binary(max_size=200).map(lambda b: ("yaml", b)),
    st.text(max_size=200).map(lambda t: ("toml", t.encode())),
)
OVERRIDES = st.lists(
    st.sampled_from(sorted(HINTS)).flatmap(lambda name: fitting(name).map(lambda v: f"{name}={json.dumps(v)}"))
    | st.text(max_size=20),
    max_size=2,
)


class Started(Exception):
    """Raised in place of building the run: every check passed."""


def starts(config: TrainConfig, *args: typing.Any) -> typing.NoReturn:
    raise Started(config)


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=CONTENTS, overrides=OVERRIDES)
def test_any_config_is_refused_in_one_line_or_starts(content, overrides, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths in the config land here
    monkeypatch.setattr(engine, "setup", starts)
    suffix, data = content
    config_file = tmp_path / f"run.{suffix}"
    config_file.write_bytes(data)
    try:
        code, stderr = run_cli("--config", str(config_file), *(f"--set={override}" for override in overrides))
    except Started as started:
        config = started.args[0]
        assert checked(config) == config  # well-typed and in range: what the run is built from
        return
    assert code == 2 and stderr.count("\n") == 1, stderr
