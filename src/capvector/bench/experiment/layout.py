"""Every path of a `capvector reproduce` run folder, in one place.

    <out>/<preset>/                     <out>/<preset>-<regime>/ in a regime not the preset's (protocol.run_label)
      run.json                          the config and capvector version of the last invocation
      <stage>/stage.json                per stage: its key, whether it finished, an id for its outputs
      demos/<split>/                    demonstration datasets (pretrain, extract, downstream)
      teacher/frames/                   the teacher's pretraining frames (the teacher objective only)
      teacher/model/                    the frozen 3D teacher (capvector.bench.teacher)
      pretrain/                         a training run folder (below) for theta_pt
      extract/<strategy>/               theta_ft (sft) and theta_ao (aux)
      vector/gamma, vector/tau          capability vector and task vector
      vector/gamma_no_head              gamma without the action head (the head ablation)
      vector/theta_meta_alpha<alpha>/   theta_pt + alpha * gamma (theta_meta_<vector>_alpha<alpha>: another vector)
      downstream/<method>/seed<k>/      the methods' training runs
      select/alpha<a>/seed<k>/          CapVector at each candidate alpha (select_alpha), the alpha ablation then
      select/validation.json            their evaluations on the validation placements, "<checkpoint>@<variant>"
      ablations/<name>/seed<k>/         alpha<a>, lambda<l>, no_head, long_<method>
      evaluate/results.json             "<checkpoint>@<variant>" -> {"tasks": {task: counts}}
      report/                           report.md, results.json, the plots and the side-by-side GIF

    <out>/<regime>/                     a `capvector headroom` run folder (HeadroomLayout)
      config.json                       the config and its key
      demos/                            the demonstrations of the regime's tasks
      demos-held-out/                   a few more on other placements, for the probes of the tokens
      train/<arm>/seed<k>/              training runs (sft, oracle, control_w<weight>)
      evaluate/test_per_seed.json       "<arm>/seed<k>/step<n>[/decoy]" -> {task: success rate}, each seed on its own
                                        test placements
      evaluate/validation<p>_per_seed.json   the same for the auxiliary arms' candidate weights, on validation
                                        placements
      evaluate/probe.json               "<arm>/seed<k>/step<n>" and "untrained" -> held-out R^2 of positions from
                                        its visual tokens
      evaluate/probe_queries.json       the same from its action query tokens at the trunk's hook layer
      report/                           report.md and results.json

A training run folder is the engine's (capvector.training.engine): policy/, checkpoints/step_N/policy/,
metrics.jsonl, plus wall.json (seconds of training) written by the experiment.
"""

from __future__ import annotations

from pathlib import Path

from capvector.training.checkpointing import POLICY_DIR, checkpoint_dir
from capvector.training.metrics import METRICS_FILE

GAMMA = "gamma"  # the capability vector's folder under vector/ (other vectors: the ablations')
RUN_FILE = "run.json"
STAGE_FILE = "stage.json"
WALL_FILE = "wall.json"
REPORT_FILE = "report.md"
RESULTS_FILE = "results.json"
PLOTS = {
    "success": "success_vs_steps.png",
    "training": "training_vs_steps.png",
    "side_by_side": "side_by_side.gif",
    "step_time": "step_time.png",
    "gamma": "gamma_layers.png",
}


def trained_policy(training_dir: Path) -> Path:
    """The policy a finished training run saved."""
    return training_dir / POLICY_DIR


def checkpoint_folder(training_dir: Path, steps: int) -> Path:
    """The policy a training run saved at `steps`."""
    return checkpoint_dir(training_dir, steps) / POLICY_DIR


def metrics_file(training_dir: Path) -> Path:
    return training_dir / METRICS_FILE


def wall_file(training_dir: Path) -> Path:
    return training_dir / WALL_FILE


class RunLayout:
    """The paths of one run folder: fixed ones as attributes, the others from their name."""

    def __init__(self, root: Path):
        self.root = root
        self.run_file = root / RUN_FILE
        self.pretrain = root / "pretrain"
        self.pretrained = trained_policy(self.pretrain)  # theta_pt
        self.finetuned = trained_policy(self.extract("sft"))  # theta_ft
        self.auxiliary = trained_policy(self.extract("aux"))  # theta_ao
        self.teacher = root / "teacher" / "model"
        self.teacher_frames = root / "teacher" / "frames"
        self.gamma = self.vector(GAMMA)
        self.tau = self.vector("tau")
        self.evaluations = root / "evaluate" / RESULTS_FILE
        self.validation = root / "select" / "validation.json"
        self.report = root / "report"
        self.report_file = self.report / REPORT_FILE
        self.report_results = self.report / RESULTS_FILE

    def stage(self, name: str) -> Path:
        return self.root / name

    def stage_record(self, name: str) -> Path:
        return self.stage(name) / STAGE_FILE

    def demos(self, split: str) -> Path:
        return self.root / "demos" / split

    def extract(self, strategy: str) -> Path:
        return self.root / "extract" / strategy

    def vector(self, name: str) -> Path:
        return self.root / "vector" / name

    def theta_meta(self, alpha: float, vector: str = GAMMA) -> Path:
        """theta_pt + alpha * the vector `vector`."""
        prefix = "theta_meta" if vector == GAMMA else f"theta_meta_{vector}"
        return self.root / "vector" / f"{prefix}_alpha{alpha:g}"

    def theta_metas(self) -> list[Path]:
        """Every theta_meta merged in this run folder, whatever its alpha and vector."""
        return sorted((self.root / "vector").glob("theta_meta_*"))

    def downstream(self, method: str, seed: int) -> Path:
        return self.root / "downstream" / method / f"seed{seed}"

    def ablation(self, name: str, seed: int) -> Path:
        return self.root / "ablations" / name / f"seed{seed}"

    def selection(self, alpha: float, seed: int) -> Path:
        """CapVector at a candidate alpha (choosing alpha on validation placements)."""
        return self.root / "select" / f"alpha{alpha:g}" / f"seed{seed}"

    def plot(self, name: str) -> Path:
        return self.report / PLOTS[name]


class HeadroomLayout:
    """The paths of a `capvector headroom` run folder."""

    def __init__(self, root: Path):
        self.root = root
        self.config = root / "config.json"
        self.demos = root / "demos"
        self.held_out_demos = root / "demos-held-out"
        self.teacher_demos = root / "demos-teacher"  # the teacher arm's teacher: its pretraining frames
        self.teacher = root / "teacher"  # and the teacher
        self.probe = root / "evaluate" / "probe.json"
        self.probe_queries = root / "evaluate" / "probe_queries.json"
        # "per_seed": a run folder's files from before each seed had placements of its own (results.json,
        # validation_placements<n>.json: one set of placements for every seed) are not read.
        self.evaluations = root / "evaluate" / "test_per_seed.json"
        self.report = root / "report"
        self.report_file = self.report / REPORT_FILE
        self.report_results = self.report / RESULTS_FILE

    def training(self, name: str, seed: int) -> Path:
        return self.root / "train" / name / f"seed{seed}"

    def validation(self, placements: int) -> Path:
        """The evaluations on the validation placements of seed `placements` (choosing auxiliary arms' weights)."""
        return self.root / "evaluate" / f"validation{placements}_per_seed.json"
