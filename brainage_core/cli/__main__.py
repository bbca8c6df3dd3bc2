"""``python -m brainage_core.cli``: the ``brainage-study`` command (what ``torchrun`` runs)."""

import sys

from brainage_core.cli import main

sys.exit(main())
