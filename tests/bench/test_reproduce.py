"""The whole `capvector reproduce` pipeline in miniature (preset "test": a tiny policy, three tasks, a few steps,
one episode per checkpoint): every stage's artifact exists and agrees with the others, and a re-run trains nothing."""

import dataclasses
import importlib.util
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from capvector.bench.env.dataset import capvector_meta, open_meta
from capvector.bench.env.evaluation import CAPTION_PIXELS, COLUMN_GAP, GIF_PIXELS, GIF_STRIDE
from capvector.bench.env.features import PRIVILEGED_DIM
from capvector.bench.env.sim import CONTROL_HZ, eval_placement_seed
from capvector.bench.experiment.carried import carried_share, split_frames
from capvector.bench.experiment.layout import PLOTS, RunLayout, checkpoint_folder, trained_policy
from capvector.bench.experiment.protocol import (
    CONTROL_EXTRACTION,
    GAMMA_CONTROL,
    METHODS,
    OBJECTIVES,
    ORACLE,
    PRESETS,
    TRANSFER_METHODS,
    ablation_runs,
    alpha_candidates,
    check_config,
    evaluated_checkpoints,
    first_test_episodes,
    with_chosen_alpha,
)
from capvector.bench.experiment.report import markdown
from capvector.bench.experiment.report import summary as report_summary
from capvector.bench.experiment.reproduce import (
    STAGES,
    Run,
    do_training,
    evaluate_checkpoints,
    evaluation_plan,
    finished_twin,
    plan_downstream,
    plan_select,
    reproduce,
    training_processes,
)
from capvector.bench.policy.configuration_policy import PolicyConfig
from capvector.bench.policy.modeling_policy import Policy
from capvector.bench.probe import PROBE_STRIDE
from capvector.bench.statistics import MIN_SEEDS, bootstrap_mean, paired_difference, points
from capvector.bench.teacher.pretraining import load_frames
from capvector.errors import CapvectorError

pytestmark = pytest.mark.slow
CONFIG = PRESETS["test"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return reproduce("test", tmp_path_factory.mktemp("reproduce"))


def chosen_alpha(run):
    """The alpha the select stage chose (the test preset selects it)."""
    return json.loads((run / "report" / "results.json").read_text())["config"]["alpha"]


def weights(folder):
    return load_file(folder / "model.safetensors")


def vector(folder):
    return load_file(folder / "capvector.safetensors")


def test_every_stage_leaves_its_artifacts(run):
    for name in STAGES:
        assert json.loads((run / name / "stage.json").read_text())["done"]
    for split in ("pretrain", "extract", "downstream"):
        assert (run / "demos" / split / "meta" / "stats.json").is_file()
    for folder in ("pretrain", "extract/sft", "extract/aux"):
        assert (run / folder / "policy" / "model.safetensors").is_file()
    for method in METHODS:
        for step in CONFIG.budgets:
            assert (run / "downstream" / method / "seed0" / "checkpoints" / f"step_{step:07d}" / "policy").is_dir()
    evaluations = json.loads((run / "evaluate" / "results.json").read_text())
    ablations = len(alpha_candidates(CONFIG)) + len(CONFIG.lambdas) + CONFIG.ablate_head  # alphas: select's runs
    decoys = len(CONFIG.seeds)  # the oracle's last checkpoints, once more with a decoy placement's positions
    assert len(evaluations) == 2 * (len(METHODS) * len(CONFIG.budgets) + ablations + 4) + decoys
    for name in ("report.md", "results.json", *PLOTS.values()):
        assert (run / "report" / name).stat().st_size > 0
    report = (run / "report" / "report.md").read_text()
    for name in ("success", "training", "side_by_side"):
        assert f"]({PLOTS[name]})" in report  # shown in report.md
    for name in ("success", "training", "step_time", "gamma"):
        assert Image.open(run / "report" / PLOTS[name]).format == "PNG"


def test_the_side_by_side_gif_replays_the_first_evaluation_episode_of_every_method_in_real_time(run):
    results = json.loads((run / "report" / "results.json").read_text())
    evaluations = json.loads((run / "evaluate" / "results.json").read_text())
    episode, last = results["side_by_side"], CONFIG.budgets[-1]
    assert list(episode["methods"]) == list(METHODS) and episode["task"] == CONFIG.downstream_tasks[0]
    for method, outcome in episode["methods"].items():  # the test preset evaluates one episode: that one
        record = evaluations[f"downstream/{method}/seed0/step{last}@default"]["tasks"][episode["task"]]
        assert outcome["success"] == bool(record["successes"]) and record["placement_seeds"] == [
            episode["placement_seed"]
        ]
        assert outcome["steps"] == record["mean_steps"]
    gif = Image.open(run / "report" / PLOTS["side_by_side"])
    # a column per method, its two camera views stacked under its label
    assert gif.format == "GIF" and gif.size == (
        len(METHODS) * (GIF_PIXELS + COLUMN_GAP) - COLUMN_GAP,
        CAPTION_PIXELS + 2 * GIF_PIXELS,
    )
    durations = []
    for frame in range(gif.n_frames):
        gif.seek(frame)
        durations.append(gif.info["duration"])
    longest = max(math.ceil(o["steps"] / GIF_STRIDE) for o in episode["methods"].values())
    assert min(durations) == 1000 * GIF_STRIDE // CONTROL_HZ  # real time (Pillow stores repeated frames once)
    assert sum(durations) == (longest + 10) * 1000 * GIF_STRIDE // CONTROL_HZ  # every frame, then a hold of 10


def test_the_bands_and_curves_agree_with_the_evaluations_and_the_checkpoints(run):
    results = json.loads((run / "report" / "results.json").read_text())
    evaluations = json.loads((run / "evaluate" / "results.json").read_text())
    for method in METHODS:
        for budget in CONFIG.budgets:
            tasks = evaluations[f"downstream/{method}/seed0/step{budget}@default"]["tasks"]
            cells = np.array([[tasks[t]["successes"] / tasks[t]["episodes"] for t in CONFIG.downstream_tasks]])
            band = results["success_band"][method]["default"][str(budget)]
            assert [band[k] for k in ("mean", "low", "high")] == list(bootstrap_mean(cells))
        curves, last, every = results["curves"][method], CONFIG.budgets[-1], math.gcd(*CONFIG.budgets)
        assert curves["action_loss"]["steps"][-1] == last
        assert (curves["orth"] is not None) == (METHODS[method].strategy == "capvector")
        retention = curves["retention"]
        assert retention["steps"] == [0, *range(every, last + 1, every)]  # the start point and every checkpoint
        if METHODS[method].start in ("pretrained", "meta"):
            start = chosen_alpha(run) if METHODS[method].start == "meta" else 0.0
            assert retention["mean"][0] == pytest.approx(start, abs=1e-5)
        assert retention["mean"][-1] == pytest.approx(results["along_gamma"][method]["retention"])
    # theta_ao = theta_ft + gamma: the transfer ceiling's starts lie one gamma apart along it
    starts = {m: results["curves"][m]["retention"]["mean"][0] for m in ("ft_sft", "ao_sft")}
    assert starts["ao_sft"] - starts["ft_sft"] == pytest.approx(1.0, abs=1e-4)


def test_gamma_is_aux_minus_sft_over_the_policys_own_parameters(run):
    gamma, theta_pt = vector(run / "vector" / "gamma"), weights(run / "pretrain" / "policy")
    assert set(gamma) == set(Policy.from_pretrained(run / "pretrain" / "policy").state_dict()) == set(theta_pt)
    assert not any("projector" in name for name in gamma)
    theta_ao, theta_ft = weights(run / "extract" / "aux" / "policy"), weights(run / "extract" / "sft" / "policy")
    for name, g in gamma.items():
        torch.testing.assert_close(g, theta_ao[name] - theta_ft[name])
    assert any(g.abs().max() > 0 for g in gamma.values())  # the spatial objective moved the weights


@pytest.mark.parametrize("alpha", alpha_candidates(CONFIG))
def test_theta_meta_is_theta_pt_plus_alpha_gamma(run, alpha):
    gamma, theta_pt = vector(run / "vector" / "gamma"), weights(run / "pretrain" / "policy")
    theta_meta = weights(run / "vector" / f"theta_meta_alpha{alpha:g}")
    assert set(theta_meta) == set(theta_pt)
    for name in theta_pt:
        torch.testing.assert_close(theta_meta[name], theta_pt[name] + alpha * gamma[name])


def test_the_head_ablation_merges_gamma_without_the_action_head_and_keeps_that_vector(run):
    gamma, theta_pt = vector(run / "vector" / "gamma"), weights(run / "pretrain" / "policy")
    without_head = vector(run / "vector" / "gamma_no_head")
    head = {name for name in gamma if name.startswith("head.")}
    assert head and set(without_head) == set(gamma) - head
    alpha = chosen_alpha(run)
    theta_meta = weights(run / "vector" / f"theta_meta_gamma_no_head_alpha{alpha:g}")
    for name in theta_pt:
        expected = theta_pt[name] if name in head else theta_pt[name] + alpha * gamma[name]
        torch.testing.assert_close(theta_meta[name], expected)
    config = yaml.safe_load((run / "ablations" / "no_head" / "seed0" / "config.yaml").read_text())
    assert Path(config["vector"]).name == "gamma_no_head"
    assert Path(config["init_from"]).name == f"theta_meta_gamma_no_head_alpha{alpha:g}"


def test_the_control_beside_the_objective_has_its_own_extraction_gamma_and_methods(run):
    layout, alpha = RunLayout(run), chosen_alpha(run)
    extraction = yaml.safe_load((layout.extract(CONTROL_EXTRACTION) / "config.yaml").read_text())
    assert extraction["auxiliary"] == OBJECTIVES[CONFIG.control].recipe
    assert extraction["auxiliary_args"] == {"weight": CONFIG.control_weight}  # the control's own layer
    assert Path(extraction["init_from"]) == layout.pretrained
    control, theta_ft = vector(layout.vector(GAMMA_CONTROL)), weights(run / "extract" / "sft" / "policy")
    theta_ao = weights(layout.extract(CONTROL_EXTRACTION) / "policy")
    for name, g in control.items():
        torch.testing.assert_close(g, theta_ao[name] - theta_ft[name])
    theta_pt, theta_meta = weights(layout.pretrained), weights(layout.theta_meta(alpha, GAMMA_CONTROL))
    for name in theta_pt:
        torch.testing.assert_close(theta_meta[name], theta_pt[name] + alpha * control[name])
    aux = yaml.safe_load((layout.downstream("control_aux", 0) / "config.yaml").read_text())
    assert (aux["strategy"], aux["auxiliary"], Path(aux["init_from"])) == (
        "aux",
        extraction["auxiliary"],
        layout.pretrained,
    )
    capvector = yaml.safe_load((layout.downstream("control_capvector", 0) / "config.yaml").read_text())
    assert Path(capvector["vector"]) == layout.vector(GAMMA_CONTROL)
    assert Path(capvector["init_from"]) == layout.theta_meta(alpha, GAMMA_CONTROL)
    results = json.loads((run / "report" / "results.json").read_text())
    rows, last = results["versus_sft"][CONFIG.variant], str(CONFIG.budgets[-1])
    assert results["summary"]["control_aux_minus_sft"] == rows["control_aux"]["difference"][last]
    assert results["summary"]["control_capvector_minus_sft"] == rows["control_capvector"]["difference"][last]


def test_methods_of_a_control_need_one():
    with pytest.raises(CapvectorError, match="need a control objective"):
        check_config(dataclasses.replace(CONFIG, control=None))
    with pytest.raises(CapvectorError, match="is not a positive control"):
        check_config(dataclasses.replace(CONFIG, control="teacher"))


def test_every_ablation_is_compared_with_sft_on_the_same_seeds(run):
    results = json.loads((run / "report" / "results.json").read_text())
    evaluations = json.loads((run / "evaluate" / "results.json").read_text())
    last, ablations = CONFIG.budgets[-1], results["ablations"]

    def success(name):
        tasks = evaluations[f"{name}/seed0/step{last}@default"]["tasks"]
        return np.mean([tasks[t]["successes"] / tasks[t]["episodes"] for t in CONFIG.downstream_tasks])

    assert ablations["seeds"] == CONFIG.seeds[: CONFIG.ablation_seeds]
    alpha = chosen_alpha(run)
    others = [a for a in alpha_candidates(CONFIG) if a != alpha]
    expected = {
        "alpha": {alpha: "downstream/capvector", **{a: f"select/alpha{a:g}" for a in others}},
        "lambda": {CONFIG.orth_lambda: "downstream/capvector", **{v: f"ablations/lambda{v:g}" for v in CONFIG.lambdas}},
        "head": {"gamma": "downstream/capvector", "gamma_no_head": "ablations/no_head"},
    }
    for kind, runs in expected.items():
        key = {"head": "vector"}.get(kind, kind)
        assert [row[key] for row in ablations[kind]] == list(runs)
        for row, name in zip(ablations[kind], runs.values()):
            difference = 100 * (success(name) - success("downstream/sft"))
            assert row["versus_sft"]["default"][0] == pytest.approx(difference, abs=0.051)
    report = (run / "report" / "report.md").read_text()
    assert "## Ablation: gamma without the action head" in report and "| gamma_no_head |" in report


def test_alpha_is_chosen_on_validation_placements_and_every_method_from_theta_meta_then_uses_it(run):
    validation = json.loads((run / "select" / "validation.json").read_text())
    evaluations = json.loads((run / "evaluate" / "results.json").read_text())
    candidates, last, task = alpha_candidates(CONFIG), CONFIG.budgets[-1], CONFIG.downstream_tasks[0]

    def placements(results, alpha):
        return results[f"select/alpha{alpha:g}/seed0/step{last}@default"]["tasks"][task]["placement_seeds"]

    means = {}
    for alpha in candidates:
        assert not set(placements(validation, alpha)) & set(placements(evaluations, alpha))  # other placements
        tasks = validation[f"select/alpha{alpha:g}/seed0/step{last}@default"]["tasks"]
        means[alpha] = np.mean([tasks[t]["success_rate"] for t in CONFIG.downstream_tasks])
    chosen = chosen_alpha(run)
    assert chosen == max(candidates, key=lambda a: means[a])  # the best, the earlier on a tie
    record = json.loads((run / "select" / "stage.json").read_text())["outputs"]
    assert record["validation"] == {f"{a:g}": round(100 * m, 1) for a, m in means.items()}
    for method in ("meta_sft", "capvector"):
        config = yaml.safe_load((run / "downstream" / method / "seed0" / "config.yaml").read_text())
        assert Path(config["init_from"]).name == f"theta_meta_alpha{chosen:g}"
    # with more seeds, each candidate's seed on validation placements of its own, every candidate of a seed on the same
    two_seeds = dataclasses.replace(CONFIG, seeds=[0, 1], ablation_seeds=2)
    plan = plan_select(Run(two_seeds, RunLayout(run), "cpu"))["evaluation"]
    assert plan["seed"] == CONFIG.validation_seed and set(plan["first_episodes"]) == set(plan["checkpoints"])
    for name, first in plan["first_episodes"].items():
        assert first == (CONFIG.eval_episodes if "/seed1/" in name else 0)
    selected = yaml.safe_load((run / "select" / f"alpha{chosen:g}" / "seed0" / "config.yaml").read_text())
    main = yaml.safe_load((run / "downstream" / "capvector" / "seed0" / "config.yaml").read_text())
    assert selected["init_from"] == main["init_from"] and selected["orth_lambda"] == main["orth_lambda"]
    report = (run / "report" / "report.md").read_text()
    assert f"alpha {chosen:g} was chosen before the other methods were trained" in report


def test_the_selections_run_at_the_chosen_alpha_is_hard_linked_as_capvectors_run_not_trained_again(run):
    chosen, layout = chosen_alpha(run), RunLayout(run)
    twin, main = layout.selection(chosen, 0), layout.downstream("capvector", 0)
    for step in CONFIG.budgets:  # the selection run saved a checkpoint at every budget the method is evaluated at
        assert os.path.samefile(
            checkpoint_folder(main, step) / "model.safetensors", checkpoint_folder(twin, step) / "model.safetensors"
        )
    assert os.path.samefile(trained_policy(main) / "model.safetensors", trained_policy(twin) / "model.safetensors")
    assert json.loads((main / "wall.json").read_text())["reused"] == f"select/alpha{chosen:g}/seed0"
    assert yaml.safe_load((main / "config.yaml").read_text())["out_dir"] == str(main)  # its own config, not the twin's
    assert "reused" not in json.loads((layout.downstream("meta_sft", 0) / "wall.json").read_text())
    config = plan_downstream(Run(CONFIG, layout, "auto"))["downstream/capvector/seed0"]
    assert finished_twin(layout, config) == twin
    assert finished_twin(layout, dataclasses.replace(config, orth_lambda=1.0)) is None  # other weights
    assert finished_twin(layout, dataclasses.replace(config, checkpoint_every=1)) is None  # checkpoints it lacks


def test_alpha_selection_needs_candidates_and_other_placements_and_a_finished_choice():
    for fields in ({"alphas": []}, {"validation_seed": CONFIG.eval_seed}):
        with pytest.raises(CapvectorError, match="select_alpha needs candidates besides alpha"):
            check_config(dataclasses.replace(CONFIG, **fields))
    with pytest.raises(CapvectorError, match="run the select stage first"):
        with_chosen_alpha(CONFIG, None)
    with pytest.raises(CapvectorError, match="run the select stage first"):  # chosen among other candidates
        with_chosen_alpha(CONFIG, {"alpha": 2.0, "candidates": [1.0, 2.0]})
    resolved = with_chosen_alpha(CONFIG, {"alpha": 0.5, "candidates": alpha_candidates(CONFIG)})
    assert (resolved.alpha, resolved.alphas) == (0.5, [1.0])
    fixed = dataclasses.replace(CONFIG, select_alpha=False)
    assert with_chosen_alpha(fixed, None) is fixed


def test_ablations_run_on_the_first_ablation_seeds_and_the_long_runs_on_the_first(tmp_path):
    config = dataclasses.replace(CONFIG, seeds=[3, 5, 7], ablation_seeds=2, select_alpha=False)
    runs = ablation_runs(config, RunLayout(tmp_path))
    sweeps = [r for r in runs if r.method == "capvector" and r.steps == config.budgets[-1]]
    per_seed = len(config.alphas) + len(config.lambdas) + 1
    assert sorted(r.seed for r in sweeps) == [3] * per_seed + [5] * per_seed
    assert len({r.folder for r in runs}) == len(runs)
    assert {r.vector for r in sweeps} == {"gamma", "gamma_no_head"}
    assert [(r.method, r.seed, r.steps) for r in runs if r not in sweeps] == [
        ("meta_sft", 3, config.long_steps),
        ("capvector", 3, config.long_steps),
    ]
    for count in (0, 4):
        with pytest.raises(CapvectorError, match=f"ablation_seeds {count} must be between 1 and the number of seeds"):
            check_config(dataclasses.replace(config, ablation_seeds=count))


def test_the_probe_of_what_gamma_carries_scores_held_out_demonstrations_of_every_probed_weight(run):
    _, positions, train, inner = split_frames(run / "demos" / "downstream")
    episodes = load_frames(run / "demos" / "downstream", ("scene", "wrist"), PROBE_STRIDE).episode
    assert set(episodes[~train].tolist()) == {2} and set(episodes[inner].tolist()) == {1}  # fitted on episode 0
    assert torch.allclose(positions[train].mean(0), torch.zeros(6), atol=1e-5)  # less the task's mean
    assert split_frames(run / "demos" / "pretrain") is None  # two demonstrations: too few to hold one out
    carried = json.loads((run / "report" / "results.json").read_text())["carried"]
    for split in ("extract", "downstream"):
        r2 = carried["r2"][split]
        alphas = [chosen_alpha(run), *(a for a in alpha_candidates(CONFIG) if a != chosen_alpha(run))]
        assert list(r2) == ["theta_pt", "theta_ft", "theta_ao", *(f"theta_meta alpha {a:g}" for a in alphas)]
        assert all(value <= 1 for value in r2.values())
        for alpha in alphas:
            assert carried["share"][split][f"{alpha:g}"] == carried_share(r2, alpha)
    report = (run / "report" / "report.md").read_text()
    assert "What gamma carries: held-out R^2" in report and "| theta_meta alpha 0.5 |" in report


def test_the_carried_share_is_theta_metas_gain_as_a_part_of_theta_aos():
    r2 = {"theta_pt": 0.3, "theta_ft": 0.3, "theta_ao": 0.5, "theta_meta alpha 1": 0.4, "theta_meta alpha 0.5": 0.2}
    assert carried_share(r2, 1.0) == pytest.approx(0.5) and carried_share(r2, 0.5) == pytest.approx(-0.5)
    assert carried_share({**r2, "theta_ao": 0.3}, 1.0) is None  # the objective gave nothing to carry


def test_report_numbers_are_those_of_results_json_and_the_evaluations(run):
    results = json.loads((run / "report" / "results.json").read_text())
    evaluations = json.loads((run / "evaluate" / "results.json").read_text())
    report = (run / "report" / "report.md").read_text()
    assert results["config"]["preset"] == "test"
    sections = report.split("## Success rate, ")[1:3]
    for variant, section in zip(("default", "new_env"), sections):
        for method, label in results["methods"].items():
            row = next(line for line in section.splitlines() if line.startswith(f"| {label} |"))
            cells = re.findall(r"(\d+)% \[(\d+), (\d+)\]", row)
            assert len(cells) == len(CONFIG.budgets)
            for budget, cell in zip(CONFIG.budgets, cells):
                numbers = results["success"][method][variant][str(budget)]
                assert cell == tuple(f"{100 * numbers[k]:.0f}" for k in ("rate", "low", "high"))
                record = evaluations[f"downstream/{method}/seed0/step{budget}@{variant}"]["tasks"]
                assert numbers["successes"] == sum(t["successes"] for t in record.values())
                assert numbers["trials"] == sum(t["episodes"] for t in record.values()) == CONFIG.eval_episodes
    for method, timing in results["timing"].items():
        label = results["methods"].get(method, method)
        assert f"| {label} | {timing['step_ms']:.1f} |" in report


def test_the_report_names_the_regime_and_reads_the_in_domain_look_it_ran_in(run):
    """This run's numbers relabelled as a run in random_view: every table reads the in-domain look's numbers."""
    results = json.loads((run / "report" / "results.json").read_text())
    report = (run / "report" / "report.md").read_text()
    assert results["command"] == "capvector reproduce --preset test" and f"`{results['command']}`" in report
    assert "`spatial` (capvector.bench.recipe:spatial); placement ranges `default`" in report

    def relabel(value):
        if isinstance(value, dict):
            return {("random_view" if k == "default" else k): relabel(v) for k, v in value.items()}
        return [relabel(v) for v in value] if isinstance(value, list) else value

    regime = {"objective": "privileged", "placement": "wide", "variant": "random_view"}
    moved = markdown(relabel(results) | {"config": results["config"] | regime}).splitlines()
    changed = [i for i, (a, b) in enumerate(zip(report.splitlines(), moved)) if a != b]
    assert len(moved) == len(report.splitlines()) and len(changed) == 1  # the header line, nothing else
    assert "`privileged` (capvector.bench.recipe:privileged); placement ranges `wide`" in moved[changed[0]]
    assert "in-domain scene look `random_view`" in moved[changed[0]]


def test_a_rerun_trains_nothing_and_force_redoes_only_that_stage(run, capsys):
    metrics = {path: path.read_text() for path in run.rglob("metrics.jsonl")}
    ids = {name: json.loads((run / name / "stage.json").read_text())["id"] for name in STAGES}
    capsys.readouterr()
    assert reproduce("test", run.parent) == run
    printed = capsys.readouterr().out
    assert all(f"{name}: cached" in printed for name in STAGES)
    reproduce("test", run.parent, force=["report"])
    assert "report: redoing (forced)" in capsys.readouterr().out
    assert {path: path.read_text() for path in run.rglob("metrics.jsonl")} == metrics
    after = {name: json.loads((run / name / "stage.json").read_text())["id"] for name in STAGES}
    assert [name for name in STAGES if after[name] != ids[name]] == ["report"]


def test_training_runs_in_parallel_processes_give_the_weights_of_sequential_training(run, tmp_path):
    # the fixture trained one run at a time (the test preset's workers = 1); here two go at once, one per process
    parallel = Run(dataclasses.replace(CONFIG, workers=2), RunLayout(run), "cpu")
    assert training_processes(parallel, 2) == 2
    plan = {name: config for name, config in plan_downstream(parallel).items() if name.endswith("seed0")}
    assert len(plan) == len(METHODS)
    moved = {name: dataclasses.replace(config, out_dir=str(tmp_path / name)) for name, config in plan.items()}
    do_training(parallel, moved)
    for name, config in plan.items():
        expected, actual = trained_policy(Path(config.out_dir)), trained_policy(tmp_path / name)
        files = sorted(path.name for path in expected.glob("*.safetensors"))  # LoRA runs save an adapter
        assert files and files == sorted(path.name for path in actual.glob("*.safetensors"))
        for file in files:
            assert_equal_tensors(load_file(expected / file), load_file(actual / file))


def assert_equal_tensors(expected, actual):
    assert expected.keys() == actual.keys()
    for key, tensor in expected.items():
        assert torch.equal(tensor, actual[key]), key


def test_bad_input_is_named(tmp_path):
    presets = "quick, full, views, views-long, control, spatial-forcing, gpu, test"
    with pytest.raises(CapvectorError, match=f"valid presets: {presets}"):
        reproduce("fast", tmp_path)
    with pytest.raises(CapvectorError, match="valid stages: demos, teacher, pretrain"):
        reproduce("test", tmp_path, force=["train"])


def test_every_method_is_compared_with_sft_paired_by_seed_and_task(run):
    results = json.loads((run / "report" / "results.json").read_text())
    evaluations = json.loads((run / "evaluate" / "results.json").read_text())

    def cells(method, budget):
        tasks = evaluations[f"downstream/{method}/seed0/step{budget}@default"]["tasks"]
        return np.array([[tasks[t]["successes"] / tasks[t]["episodes"] for t in CONFIG.downstream_tasks]])

    rows = results["versus_sft"]["default"]
    assert set(rows) == set(METHODS) and "difference" not in rows["sft"]
    for method in METHODS:
        if method == "sft":
            continue
        for budget in CONFIG.budgets:
            expected = 100 * (cells(method, budget) - cells("sft", budget)).mean()
            assert rows[method]["difference"][str(budget)][0] == pytest.approx(expected, abs=0.051)
        low, high = rows[method]["auc_difference"][1:]
        assert low <= rows[method]["auc_difference"][0] <= high
    # SFT reaches its own final success at the latest at its last budget
    assert rows["sft"]["steps_to_sft_final"][0] <= CONFIG.budgets[-1]
    report = (run / "report" / "report.md").read_text()
    assert "Against (a) SFT, paired by (seed, task)" in report


def test_each_seed_is_tested_on_placements_of_its_own_and_every_method_of_a_seed_on_the_same(run, tmp_path):
    layout, last, task = RunLayout(run), CONFIG.budgets[-1], CONFIG.downstream_tasks[0]
    three_seeds = dataclasses.replace(CONFIG, seeds=[0, 1, 2])
    for name, first in first_test_episodes(three_seeds, layout).items():
        seed = int(name.split("/seed")[1].split("/")[0])
        assert first == seed * CONFIG.eval_episodes  # one range per seed, the same for every method of it
    evaluations = json.loads((run / "evaluate" / "results.json").read_text())
    ours = [eval_placement_seed(CONFIG.eval_seed, e) for e in range(CONFIG.eval_episodes)]  # seed 0's range
    for key in (f"downstream/{m}/seed0/step{last}@{look}" for m in METHODS for look in ("default", "new_env")):
        assert evaluations[key]["tasks"][task]["placement_seeds"] == ours
    assert evaluations[f"downstream/{ORACLE}/seed0/step{last}@decoy"]["tasks"][task]["placement_seeds"] == ours
    # the evaluation reads each checkpoint's first episode from the plan
    checkpoint = evaluated_checkpoints(CONFIG, layout)[f"downstream/sft/seed0/step{last}"]
    plan = evaluation_plan(CONFIG, {"a": checkpoint, "b": checkpoint}, 7, ["default"], {"a": 0, "b": 3})
    results = evaluate_checkpoints(Run(CONFIG, layout, "cpu"), plan, tmp_path / "evaluations.json")
    assert results["a@default"]["tasks"][task]["placement_seeds"] == [eval_placement_seed(7, 0)]
    assert results["b@default"]["tasks"][task]["placement_seeds"] == [eval_placement_seed(7, 3)]


def test_the_transfer_ceiling_starts_from_extractions_two_models_and_compares_them_paired(run):
    layout = RunLayout(run)
    for method, start in (("ft_sft", layout.finetuned), ("ao_sft", layout.auxiliary)):
        config = yaml.safe_load((layout.downstream(method, 0) / "config.yaml").read_text())
        assert (Path(config["init_from"]), config["strategy"], config["auxiliary"]) == (start, "sft", "")
    results = json.loads((run / "report" / "results.json").read_text())
    evaluations = json.loads((run / "evaluate" / "results.json").read_text())

    def cells(method, budget, variant):
        tasks = evaluations[f"downstream/{method}/seed0/step{budget}@{variant}"]["tasks"]
        return np.array([tasks[t]["successes"] / tasks[t]["episodes"] for t in CONFIG.downstream_tasks])

    for variant in ("default", "new_env"):
        for budget in CONFIG.budgets:
            expected = 100 * (cells("ao_sft", budget, variant) - cells("ft_sft", budget, variant)).mean()
            assert results["transfer"][variant]["difference"][str(budget)][0] == pytest.approx(expected, abs=0.051)
    last = str(CONFIG.budgets[-1])
    assert results["summary"]["transfer_ao_minus_ft"] == results["transfer"]["default"]["difference"][last]
    assert "## Transfer ceiling" in (run / "report" / "report.md").read_text()


def test_the_oracle_is_theta_pt_told_the_positions_and_fills_the_summarys_oracle_row(run):
    layout = RunLayout(run)
    config = yaml.safe_load((layout.downstream(ORACLE, 0) / "config.yaml").read_text())
    assert (Path(config["init_from"]), config["strategy"]) == (layout.pretrained, "sft")
    oracle = Policy.from_pretrained(checkpoint_folder(layout.downstream(ORACLE, 0), CONFIG.budgets[0]))
    assert oracle.config.privileged_dim == PRIVILEGED_DIM and len(oracle.config.privileged_q99) == PRIVILEGED_DIM
    assert Policy.from_pretrained(layout.pretrained).config.privileged_dim == 0
    results = json.loads((run / "report" / "results.json").read_text())
    last = str(CONFIG.budgets[-1])
    assert results["summary"]["oracle_minus_sft"] == results["versus_sft"][CONFIG.variant][ORACLE]["difference"][last]
    assert results["summary"]["oracle_minus_sft"] is not None
    # the decoy test: the oracle's last checkpoints evaluated again in-domain with another placement's positions
    evaluations = json.loads((run / "evaluate" / "results.json").read_text())
    decoys = sorted(key for key in evaluations if key.endswith("@decoy"))
    assert decoys == [f"downstream/{ORACLE}/seed{s}/step{last}@decoy" for s in CONFIG.seeds]

    def cells(look):
        tasks = evaluations[f"downstream/{ORACLE}/seed0/step{last}@{look}"]["tasks"]
        return np.array([[tasks[t]["successes"] / tasks[t]["episodes"] for t in CONFIG.downstream_tasks]])

    assert results["oracle_decoy"]["drop"] == points(paired_difference(cells(CONFIG.variant), cells("decoy")))
    assert "the decoy test" in (run / "report" / "report.md").read_text()


def test_the_summary_block_holds_the_headline_comparisons_of_this_runs_objective(run):
    results = json.loads((run / "report" / "results.json").read_text())
    summary, last = results["summary"], str(CONFIG.budgets[-1])
    assert (summary["seeds"], summary["budget"]) == (len(CONFIG.seeds), CONFIG.budgets[-1])
    rows = results["versus_sft"][CONFIG.variant]
    assert CONFIG.objective == "spatial"  # the spatial rows from (b) and (d), the control's from (b') and (d')
    assert summary["spatial_aux_minus_sft"] == rows["aux"]["difference"][last]
    assert summary["spatial_capvector_minus_sft"] == rows["capvector"]["difference"][last]
    assert summary["control_aux_minus_sft"] == rows["control_aux"]["difference"][last]
    low, mean, high = sorted(summary["spatial_aux_minus_sft"])
    assert summary["spatial_aux_minus_sft"] == [mean, low, high]
    timing = results["timing"]
    for method in ("aux", "capvector"):
        assert summary["step_time_vs_sft"][method] == round(timing[method]["step_ms"] / timing["sft"]["step_ms"], 3)


@pytest.mark.parametrize("objective", ["privileged", "localization"])
def test_either_positive_control_fills_the_summarys_control_rows(objective):
    config = dataclasses.replace(CONFIG, objective=objective, control=None)
    last = str(config.budgets[-1])
    rows = {m: {"difference": {last: [float(i), 0.0, 9.0]}} for i, m in enumerate(["aux", "capvector"])}
    versus = {config.variant: rows}
    block = report_summary(config, versus, {})
    assert block["control_aux_minus_sft"] == [0.0, 0.0, 9.0] and block["control_capvector_minus_sft"] == [1.0, 0.0, 9.0]
    assert block["spatial_aux_minus_sft"] is None and block["step_time_vs_sft"] == {"aux": None, "capvector": None}


def test_the_full_preset_is_the_experiment_in_the_headroom_regime_with_every_row():
    full = PRESETS["full"]
    assert (full.objective, full.placement, full.variant) == ("teacher", "wide", "random_view")
    # every row of the paper's table, the oracle and the control's rows; the transfer ceiling is views-long's
    assert full.methods == [method for method in METHODS if method not in TRANSFER_METHODS]
    assert set(TRANSFER_METHODS) <= set(PRESETS["views-long"].methods)
    assert len(full.seeds) >= MIN_SEEDS and full.select_alpha and full.validation_seed != full.eval_seed
    # in the control preset's regime, where the control's chain carried a signal: its demonstrations and placements
    control = PRESETS["control"]
    assert (full.downstream_episodes, full.eval_episodes, full.eval_seed) == (
        control.downstream_episodes,
        control.eval_episodes,
        control.eval_seed,
    )
    assert (full.control, full.control_weight) == (control.objective, control.aux_weight)
    # the ablations of the paper's table: alpha (the selection's candidates), lambda, the head, the long run
    assert len(full.alphas) >= 2 and len(full.lambdas) >= 2 and full.ablate_head and full.long_steps > max(full.budgets)
    gpu = PRESETS["gpu"]
    assert full.policy["augment_shift"] == gpu.policy["augment_shift"] == 4  # every method sees shifted images
    assert (gpu.objective, gpu.placement, gpu.variant, gpu.methods) == (
        full.objective,
        full.placement,
        full.variant,
        full.methods,
    )
    assert ORACLE not in PRESETS["quick"].methods and len(PRESETS["quick"].seeds) >= MIN_SEEDS


def test_the_gpu_preset_is_valid_and_its_policy_trains_a_step():
    """The gpu preset is not run in the suite (nor yet anywhere); its config passes the checks and its policy, with
    8x8 patches per camera, computes a loss and gradients on a CPU batch."""
    config = PRESETS["gpu"]
    check_config(config)
    policy = Policy(PolicyConfig(image_size=config.image_size, **config.policy))
    assert policy.vision(torch.zeros(2, 2, 3, 64, 64, dtype=torch.uint8)).shape == (2, 2 * 64, 256)
    batch = {
        "observation.images.scene": torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8),
        "observation.images.wrist": torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8),
        "observation.state": torch.zeros(2, 4),
        "instruction": ["press the button", "open the drawer"],
        "action": torch.zeros(2, 8, 4),
        "action_is_pad": torch.zeros(2, 8, dtype=torch.bool),
    }
    policy(batch)["action"].backward()
    assert all(p.grad is not None for p in policy.vision.parameters())


def test_a_method_set_without_one_the_report_compares_is_named():
    check_config(dataclasses.replace(CONFIG, methods=["sft", "aux", "meta_sft", "capvector"]))  # LoRA is optional
    with pytest.raises(CapvectorError, match=r"methods lack \['aux'\]; the report compares sft, aux"):
        check_config(dataclasses.replace(CONFIG, methods=["sft", "meta_sft", "capvector", "capvector_lora"]))
    with pytest.raises(CapvectorError, match="methods have ao_sft without ft_sft; the transfer ceiling compares"):
        check_config(dataclasses.replace(CONFIG, methods=["sft", "aux", "meta_sft", "capvector", "ao_sft"]))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_passes_the_config_checks(preset):
    config = PRESETS[preset]
    check_config(config)
    assert config.preset == preset


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """The test preset with the frozen-teacher objective: one extraction and methods (a)-(d), nothing more."""
    config = dataclasses.replace(
        CONFIG,
        objective="teacher",
        control=None,
        methods=["sft", "aux", "meta_sft", "capvector"],
        select_alpha=False,
        alphas=[],
        lambdas=[],
        ablate_head=False,
    )
    return reproduce(config, tmp_path_factory.mktemp("reproduce-teacher"))


def test_the_teacher_objective_pretrains_its_teacher_on_frames_of_its_own_and_aligns_with_it(teacher_run):
    layout = RunLayout(teacher_run)
    record = json.loads((layout.teacher / "pretraining.json").read_text())
    assert Path(record["dataset"]) == layout.teacher_frames
    assert record["pretraining"]["steps"] == CONFIG.teacher["steps"]
    # its own recording: the pretraining tasks (other tasks than D_ext's and the held-out ones), as many episodes
    # of each as its settings ask, in the run's look and placements
    frames, demos = capvector_meta(layout.teacher_frames), capvector_meta(layout.demos("pretrain"))
    assert frames["tasks"] == demos["tasks"] == CONFIG.pretrain_tasks
    assert (frames["variant"], frames["placement"]) == (CONFIG.variant, CONFIG.placement)
    episodes = open_meta(layout.teacher_frames).info["total_episodes"]
    assert episodes == CONFIG.teacher["episodes_per_task"] * len(CONFIG.pretrain_tasks)
    for folder in (layout.extract("aux"), layout.downstream("aux", 0)):
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert config["auxiliary"] == "capvector.bench.recipe:teacher_alignment"
        assert Path(config["auxiliary_args"]["teacher"]) == layout.teacher
    results = json.loads((teacher_run / "report" / "results.json").read_text())
    summary = results["summary"]
    assert summary["teacher_object_variance_explained"] == record["probe"]["share"]
    assert summary["spatial_aux_minus_sft"] is not None and summary["control_aux_minus_sft"] is None
    assert "The teacher, on" in (teacher_run / "report" / "report.md").read_text()


def test_other_objectives_pretrain_no_teacher_and_a_bad_teacher_setting_is_named(run):
    assert json.loads((run / "teacher" / "stage.json").read_text())["outputs"] == {}
    assert not RunLayout(run).teacher.exists()
    assert (
        json.loads((run / "report" / "results.json").read_text())["summary"]["teacher_object_variance_explained"]
        is None
    )
    with pytest.raises(CapvectorError, match=r"teacher fields \['stepz'\] are not TeacherPretraining settings"):
        check_config(dataclasses.replace(CONFIG, teacher={"stepz": 3}))
    with pytest.raises(CapvectorError, match=r"teacher.teacher fields \['width'\] are not TeacherConfig fields"):
        check_config(dataclasses.replace(CONFIG, teacher={"teacher": {"width": 3}}))


def diagnostics_script():
    """docs/results/diagnostics/run.py, the script behind the diagnostics committed beside the full run's report."""
    path = Path(__file__).parents[2] / "docs/results/diagnostics/run.py"
    spec = importlib.util.spec_from_file_location("diagnostics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_diagnostics_start_points_are_the_sums_they_name_and_their_comparisons_read_the_runs_evaluations(
    run, tmp_path
):
    diagnostics, layout = diagnostics_script(), RunLayout(run)
    diagnostics.main("base", run, tmp_path / "work", tmp_path / "out")
    start = tmp_path / "work" / "start"
    pt, ft, gamma = weights(layout.pretrained), weights(layout.finetuned), vector(layout.gamma)
    half_tau, half_tau_gamma = weights(start / "half_tau"), weights(start / "half_tau_gamma")
    for name in pt:
        torch.testing.assert_close(half_tau[name], pt[name] + 0.5 * (ft[name] - pt[name]))
        torch.testing.assert_close(half_tau_gamma[name], half_tau[name] + gamma[name])
    assert_equal_tensors(weights(layout.theta_meta(1.0)), weights(start / "gamma_on_pt"))
    assert sorted(p.name for p in start.iterdir()) == ["gamma_on_pt", "half_tau", "half_tau_gamma"]
    # the full run's own comparisons, read from its evaluations, are the numbers its report gives
    results, report = (json.loads(p.read_text()) for p in (tmp_path / "out/base.json", run / "report/results.json"))
    assert results["trained"] and results["variants"] == ["default", "new_env"]
    for variant in results["variants"]:
        for budget in results["budgets"]:
            transfer = results["differences"]["theta_ft + gamma - theta_ft: (g) - (f), the full run's"]
            assert transfer[variant][budget] == report["transfer"][variant]["difference"][budget]
            meta = results["differences"]["(c) theta_pt + 0.25 gamma - (a) SFT, the full run's"]
            assert meta[variant][budget] == report["versus_sft"][variant]["meta_sft"]["difference"][budget]
    norm = sum(float((g.double() ** 2).sum()) for g in gamma.values()) ** 0.5
    assert results["gamma_and_tau"]["gamma_norm"] == pytest.approx(norm, abs=1e-4)
    assert -1 <= results["gamma_and_tau"]["cosine"] <= 1
    assert "## In-domain (default)" in (tmp_path / "out/base.md").read_text()
    shifted = diagnostics.augmented(4)(layout, tmp_path / "shifted")
    assert_equal_tensors(pt, weights(shifted))
    assert PolicyConfig.from_json(shifted / "config.json").augment_shift == 4
