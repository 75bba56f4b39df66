"""`python -m qwenlite` = the `qwenlite` command (where the console script is not installed)."""

import sys

from qwenlite.cli.main import main

sys.exit(main())
