"""ServerApp: reads the run config and hands the grid to fedfreeze's round loop."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedfreeze.flower.federate import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, context)
