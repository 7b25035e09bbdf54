"""`python -m clients.cli ...`: the `cloak` command line."""

import sys

from . import main

sys.exit(main())
