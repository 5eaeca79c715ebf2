"""`python -m virtualinux.vvcm.cli ARGS` = `vlx ARGS` in that interpreter (see vvcm/command.py)."""

import sys

from . import main

sys.exit(main())
