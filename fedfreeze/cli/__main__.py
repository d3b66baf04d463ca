"""``python -m fedfreeze.cli`` is the ``fedfreeze`` command, as ``python -m fedfreeze`` is."""

import sys

from fedfreeze.cli import main

sys.exit(main())
