"""`python -m logix ...`: the same command line as the `logix` console script."""

import sys

from .cli import main

sys.exit(main())
