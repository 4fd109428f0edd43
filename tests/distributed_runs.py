"""Train each run of a plan in one torchrun launch (starting the processes is most of a multi-process test's time):

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_runs.py plan.json

plan.json: a list of {"config": TrainConfig fields} entries; an entry with "nan_at_call": N is interrupted there
(the toy policy returns NaN at its Nth forward call, so the run stops after its last checkpoint).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from capvector.errors import CapvectorError
from capvector.training.config import config_from_dict
from capvector.training.engine import process_group, train
from toy import make_policy

# One group for all the runs (train() joins it), ended as train() ends its own: see engine.process_group.
with process_group(int(os.environ["WORLD_SIZE"]), torch.device("cpu")):
    for entry in json.loads(Path(sys.argv[1]).read_text()):
        config = config_from_dict(entry["config"])
        if "nan_at_call" in entry:
            try:
                train(config, policy=make_policy(config.init_from, nan_at_call=entry["nan_at_call"]))
            except CapvectorError as error:
                assert "is nan" in str(error), error
            else:
                raise SystemExit(f"{config.out_dir} was not interrupted")
        else:
            train(config)
