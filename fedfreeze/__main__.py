"""``python -m fedfreeze`` is the ``fedfreeze`` command."""

import sys

from fedfreeze.cli import main

sys.exit(main())
