"""`python -m capvector.training --config run.yaml` (as `capvector train`), e.g. under torchrun --nproc_per_node N."""

import sys

from capvector.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
