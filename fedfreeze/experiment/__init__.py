"""``fedfreeze experiment``: named arms on the same folds (config, runner, report, the command's body).

The harness sits above the federation protocol (an arm is a full federation config) and below the
Flower adapters: the federated arms run through a runner the caller passes in
(``runner.FederationRunner``; the CLI passes ``fedfreeze.flower.inprocess.run_in_process``).
"""
