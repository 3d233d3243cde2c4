"""`python -m tokeneff ...`: the same as the `tokeneff` command."""

import sys

from .cli import main

sys.exit(main())
