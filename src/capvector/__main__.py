"""`python -m capvector ...`: the same as the `capvector` command."""

import sys

from capvector.cli import main

sys.exit(main())
