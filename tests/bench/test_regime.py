"""`capvector reproduce` in another regime: the auxiliary objective, the placement ranges and the in-domain scene
look reach the plans of the stages they shape (and so their cache keys), and bad values are named."""

import dataclasses
import json

import pytest
from safetensors.torch import load_file

from capvector.bench.env.dataset import capvector_meta
from capvector.bench.experiment.layout import RunLayout
from capvector.bench.experiment.protocol import OBJECTIVES, PRESETS, check_config, evaluated_variants, run_label
from capvector.bench.experiment.reproduce import STAGES, Run, describe, pipeline
from capvector.bench.experiment.stages import Pipeline
from capvector.cli import main

# with alpha fixed, every stage can be planned before any runs (a selected alpha exists only after the select stage)
CONFIG = dataclasses.replace(PRESETS["test"], select_alpha=False)
REGIME = {"objective": "privileged", "placement": "wide", "variant": "random_view"}


def plans(config, root):
    run = Run(config, RunLayout(root), "cpu")
    return run, {name: stage.plan(run) for name, stage in STAGES.items()}


def test_the_regime_reaches_the_demonstrations_the_auxiliary_runs_and_the_evaluation(tmp_path):
    config = dataclasses.replace(CONFIG, **REGIME)
    check_config(config)
    _, plan = plans(config, tmp_path)
    assert all(job["placement"] == "wide" and job["variant"] == "random_view" for job in plan["demos"].values())
    aux, sft = plan["extract"]["aux"], plan["extract"]["sft"]
    assert aux.auxiliary == "capvector.bench.recipe:privileged" and aux.auxiliary_args == {"weight": CONFIG.aux_weight}
    assert sft.auxiliary == "" and sft.auxiliary_args == {}
    method_b = plan["downstream"]["downstream/aux/seed0"]
    assert (method_b.auxiliary, method_b.auxiliary_args) == (aux.auxiliary, aux.auxiliary_args)
    # the privileged objective reads no depth maps: no run loads them
    assert not any(c.dataset_args["depth"] for stage in ("extract", "downstream") for c in plan[stage].values())
    assert plan["evaluate"]["variants"] == ["random_view", "new_env"] and plan["evaluate"]["placement"] == "wide"
    # a layer given in the config reaches the objective; None keeps the objective's own (privileged: "vision")
    layered = plans(dataclasses.replace(config, aux_layer="trunk.layers.0"), tmp_path)[1]["extract"]["aux"]
    assert layered.auxiliary_args == {"weight": CONFIG.aux_weight, "layer": "trunk.layers.0"}


def test_the_default_regime_is_the_spatial_objective_with_depth_in_the_default_look(tmp_path):
    _, plan = plans(CONFIG, tmp_path)
    aux = plan["extract"]["aux"]
    assert aux.auxiliary == OBJECTIVES["spatial"].recipe == "capvector.bench.recipe:spatial"
    assert aux.auxiliary_args == {"dataset": aux.dataset_args["root"], "weight": CONFIG.aux_weight, "layer": None}
    assert aux.dataset_args["depth"] and not plan["pretrain"]["pretrain"].dataset_args["depth"]
    assert plan["evaluate"]["variants"] == ["default", "new_env"]
    assert evaluated_variants(dataclasses.replace(CONFIG, variant="new_env")) == ("new_env",)  # deduplicated
    assert run_label(CONFIG) == "test"


@pytest.mark.parametrize("field", list(REGIME))
def test_each_regime_field_changes_the_keys_of_the_stages_it_shapes(tmp_path, field):
    stages = pipeline(RunLayout(tmp_path))
    run, _ = plans(CONFIG, tmp_path)
    other, _ = plans(dataclasses.replace(CONFIG, **{field: REGIME[field]}), tmp_path)
    changed = {name for name, stage in STAGES.items() if stages.key(stage, run)[0] != stages.key(stage, other)[0]}
    # the stages after a changed one are redone anyway (their inputs' ids change); these change by their own plan
    shaped = {
        # the auxiliary runs' objective, and no run on the downstream demonstrations loads depth maps any more
        "objective": {"extract", "downstream", "ablations"},
        "placement": {"demos", "evaluate"},
        "variant": {"demos", "evaluate"},
    }
    assert shaped[field] | {"report"} == changed
    assert run_label(other.config) == f"test-{REGIME[field]}"  # another folder: the preset's run stays as it is


@pytest.mark.parametrize(
    ("flag", "value", "valid"),
    [
        ("--objective", "vggt", "spatial, teacher, privileged, localization"),
        ("--placement", "huge", "default, wide"),
        ("--variant", "night", "default, new_env, random_view"),
    ],
)
def test_a_bad_regime_value_is_named_with_the_valid_ones(tmp_path, capsys, flag, value, valid):
    out = tmp_path / "runs"
    assert main(["reproduce", "--preset", "test", flag, value, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"unknown {flag.removeprefix('--')} {value!r}; valid: {valid}" in err and "Traceback" not in err
    assert not out.exists()  # nothing written


@pytest.mark.slow
def test_the_privileged_objective_extracts_on_wide_random_view_demonstrations(tmp_path):
    """The pipeline's first stages for real in the regime (~35 s of CPU: the whole miniature would take minutes on
    2 shared cores; the later stages are the default regime's, with the variants and placement of the plans above)."""
    run = Run(dataclasses.replace(CONFIG, **REGIME), RunLayout(tmp_path), "cpu")
    Pipeline({name: STAGES[name] for name in ("demos", "pretrain", "extract")}, run.layout, describe).run(run)
    for split in ("pretrain", "extract", "downstream"):
        block = capvector_meta(run.layout.demos(split))
        assert block is not None and (block["placement"], block["variant"]) == ("wide", "random_view")
    aux, sft = (load_file(run.layout.extract(s) / "policy" / "model.safetensors") for s in ("aux", "sft"))
    assert set(aux) == set(sft)  # the objective's projector is not saved with the policy
    assert any((aux[name] - sft[name]).abs().max() > 0 for name in aux)  # the privileged objective moved them
    logged = [json.loads(line) for line in (run.layout.extract("aux") / "metrics.jsonl").read_text().splitlines()]
    assert all(line["loss/auxiliary"] > 0 for line in logged)  # the objective trained
