"""One control run (weight 0.2, seed 0) in a views-picked run folder, then the probe of its visual tokens and of SFT
seed 0 at every budget, on the report's frames: python control_probe_seed0.py runs/headroom/views-picked"""

import dataclasses
import json
import sys
import time
from pathlib import Path

from capvector.bench import recipe
from capvector.bench.experiment import headroom as h
from capvector.bench.experiment.layout import HeadroomLayout
from capvector.bench.probe import held_out_r2

config = dataclasses.replace(h.REGIMES["views-picked"], workers=2)
layout = HeadroomLayout(Path(sys.argv[1]))
start = time.time()
h.train_arm(h.train_config(config, layout, "control", 0, 0.2))
print("trained", time.time() - start)
images, positions, train, inner = h.probe_frames(config, layout)
out = {}
for steps in config.budgets:
    policy = recipe.load_trained(h.policy_at(layout, h.control_name(0.2), 0, steps))
    out[f"control_w0.2/seed0/step{steps}"] = held_out_r2(h.visual_tokens(policy, images), positions, train, inner)
    policy = recipe.load_trained(h.policy_at(layout, "sft", 0, steps))
    out[f"sft/seed0/step{steps}"] = held_out_r2(h.visual_tokens(policy, images), positions, train, inner)
print(json.dumps(out, indent=1))
