import sys

from qvl.cli import main

sys.exit(main())
