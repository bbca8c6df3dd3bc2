"""Start a run's notebook kernel so that it dies with the run (``python -m`` this module).

papermill starts one IPython kernel per notebook. ipykernel notices a dead parent only
when its poller next looks (about once a second), and a kernel in the middle of a cell
would go on working until then. Started through this module, the kernel is tied to the
``brainage-study run`` that started it like any worker of the package (the parent-death
signal on Linux, a watchdog thread elsewhere; see :mod:`brainage_core._utils.workers`), then
``ipykernel`` takes over exactly as ``python -m ipykernel_launcher`` would.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main() -> None:
    """Tie this process to its parent, then run the IPython kernel."""
    from brainage_core._utils.workers import tie_to_parent

    tie_to_parent(os.getppid())
    # As ipykernel_launcher: the working directory leaves sys.path while ipykernel loads
    # (the kernel puts it back for the notebook's own imports).
    if sys.path and (sys.path[0] == "" or Path(sys.path[0]) == Path.cwd()):
        del sys.path[0]
    from ipykernel import kernelapp

    kernelapp.launch_new_instance()


if __name__ == "__main__":
    main()
