"""ClientApp: one hospital site; trains and evaluates through fedfreeze's site runtime."""

import sys
from pathlib import Path

from fedfreeze.deploy.launch import die_with_parent
from fedfreeze.flower.client import client_app

if Path(sys.argv[0]).name == "flwr-clientapp":
    # Started by the SuperNode's flower-superexec for this one message: end with it (SIGTERM), rather
    # than train on and retry, orphaned, when the SuperNode is killed. Not in simulations or tests.
    die_with_parent()

app = client_app()
