"""ClientApp: one hospital site; trains and evaluates through fedfreeze's site runtime."""

import sys
from pathlib import Path

from fedfreeze.federation.flower_client import client_app
from fedfreeze.federation.launch import die_with_parent

if Path(sys.argv[0]).name == "flwr-clientapp":
    # Started by the SuperNode's flower-superexec for this one message: end with it (SIGTERM), rather
    # than train on and retry, orphaned, when the SuperNode is killed. Not in simulations or tests.
    die_with_parent()

app = client_app()
