"""Stop 24 exploration: does the reproduce teacher's probe share rise with more frames (its own recording)? Run as
`python docs/results/teacher/frames.py 32 '{"locate_weight": 10.0}'` (frames32_locate10.json is its record)."""
import dataclasses, json, sys, time
from pathlib import Path
from capvector.bench.experiment.protocol import preset_config
from capvector.bench.teacher.pretraining import experiment_teacher, pretrain_teacher, pretraining_summary

if __name__ == "__main__":
    out = Path("runs/teacher-frames")
    episodes = int(sys.argv[1]); variants = [json.loads(v) for v in sys.argv[2:]]
    c = preset_config("views-teacher")
    frames = out / f"frames-{episodes}"
    if not frames.exists():
        from capvector.bench.env.demos import generate_demonstrations
        t = time.perf_counter()
        generate_demonstrations(frames, c.pretrain_tasks, episodes, seed=c.demo_seed, image_size=c.image_size,
                                workers=2, variant=c.variant, placement=c.placement)
        print(f"recorded {episodes}/task in {time.perf_counter()-t:.0f} s", flush=True)
    for v in variants:
        settings = dict(c.teacher) | v
        tp = experiment_teacher(settings, c.image_size, c.policy, "explore", dataset=str(frames), placement=c.placement, workers=1)
        name = f"e{episodes}-" + "-".join(f"{k}{val}" for k, val in sorted(v.items()))
        t = time.perf_counter()
        d = pretrain_teacher(tp, out / name)
        s = pretraining_summary(d)
        print(name, f"{time.perf_counter()-t:.0f} s", json.dumps({k: s[k] for k in ("frames", "validation")}), "share", s["probe"]["share"], "untrained", s["probe_untrained"]["share"], flush=True)
