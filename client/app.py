"""ClientApp: one hospital site; trains and evaluates through fedfreeze's site runtime."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedfreeze.federation.flower_client import dp_clipping_mod, handle_evaluate, handle_train

app = ClientApp()


@app.train(mods=[dp_clipping_mod])  # Flower's fixedclipping_mod when the coordinator asks for client-side DP
def train(msg: Message, context: Context) -> Message:
    return handle_train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return handle_evaluate(msg, context)
