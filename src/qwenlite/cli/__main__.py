import sys

from qwenlite.cli.main import main

sys.exit(main())
