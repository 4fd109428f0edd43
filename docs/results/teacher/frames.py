"""Stop 24 exploration: does the reproduce teacher's probe share rise with more frames (its own recording)?

    PYTHONPATH=src .venv/bin/python docs/results/teacher/frames.py 32 '{"locate_weight": 10.0}'

frames32_locate10.json is its record. It ran on the preset then called views-teacher, now `full` (the same pretraining
tasks, image size, look and placements)."""

import json
import sys
import time
from pathlib import Path

from capvector.bench.env.demos import generate_demonstrations
from capvector.bench.experiment.protocol import preset_config
from capvector.bench.teacher.pretraining import experiment_teacher, pretrain_teacher, pretraining_summary

if __name__ == "__main__":
    out = Path("runs/teacher-frames")
    episodes = int(sys.argv[1])
    variants = [json.loads(v) for v in sys.argv[2:]]
    config = preset_config("full")
    frames = out / f"frames-{episodes}"
    if not frames.exists():
        start = time.perf_counter()
        generate_demonstrations(
            frames,
            config.pretrain_tasks,
            episodes,
            seed=config.demo_seed,
            image_size=config.image_size,
            workers=2,
            variant=config.variant,
            placement=config.placement,
        )
        print(f"recorded {episodes}/task in {time.perf_counter() - start:.0f} s", flush=True)
    for variant in variants:
        settings = dict(config.teacher) | variant
        pretraining = experiment_teacher(
            settings,
            config.image_size,
            config.policy,
            "explore",
            dataset=str(frames),
            placement=config.placement,
            workers=1,
        )
        name = f"e{episodes}-" + "-".join(f"{key}{value}" for key, value in sorted(variant.items()))
        start = time.perf_counter()
        summary = pretraining_summary(pretrain_teacher(pretraining, out / name))
        figures = json.dumps({key: summary[key] for key in ("frames", "validation")})
        share, untrained = summary["probe"]["share"], summary["probe_untrained"]["share"]
        print(name, f"{time.perf_counter() - start:.0f} s", figures, "share", share, "untrained", untrained, flush=True)
