"""`python -m qvl.cli` runs the `qvl` command."""

import sys

from qvl.cli import main

sys.exit(main())
