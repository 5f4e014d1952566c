"""`python -m wsgate` is the `wsgate` command."""

import sys

from .cli import main

sys.exit(main())
