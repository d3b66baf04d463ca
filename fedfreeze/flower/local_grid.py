"""A Flower ``Grid`` that delivers messages to ClientApps in this process.

For tests and dry runs: the real ServerApp logic and the real ClientApp exchange real ``Message``
objects (serialised and parsed back, as on a network), without a SuperLink. Like Flower, a ClientApp
that raises turns into an error reply rather than a crash of the coordinator.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

CLIENT_EXCEPTION = 1  # error code of a reply whose ClientApp raised


class LocalGrid(Grid):
    """Nodes ``1..N`` each with its own node config; ``send_and_receive`` runs them one by one."""

    def __init__(
        self,
        client_app: ClientApp,
        node_configs: Mapping[int, dict[str, Any]],
        run_config: dict[str, Any] | None = None,
        on_reply: Callable[[Message, Message], None] | None = None,
    ) -> None:
        self.client_app = client_app
        self.node_configs = dict(node_configs)
        self.run_config = dict(run_config or {})
        self.on_reply = on_reply  # sees every (instruction, reply) pair, e.g. for a message audit
        self.offline: set[int] = set()
        # each node's Context.state, kept between its messages as a SuperNode keeps it for a run
        self.states: dict[int, RecordDict] = {}
        self._ids = itertools.count(1)
        self._pending: dict[str, Message] = {}
        self._run = Run.create_empty(run_id=1)
        # Messages take their sender's identity from the process, as in a real ServerApp process.
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.node_configs if n not in self.offline]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message_id = f"local-{next(self._ids)}"
            message.metadata.__dict__["_message_id"] = message_id  # what a SuperLink assigns
            self._pending[message_id] = message
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        for message_id in message_ids:
            message = self._pending.pop(message_id)
            node = message.metadata.dst_node_id
            if node in self.offline:
                continue
            replies.append(self._deliver(node, message))
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _deliver(self, node: int, message: Message) -> Message:
        received = _through_the_wire(message)
        context = Context(
            run_id=0,
            node_id=node,
            node_config=self.node_configs[node],
            state=self.states.setdefault(node, RecordDict()),
            run_config=self.run_config,
        )
        try:
            reply = self.client_app(received, context)
        except Exception as err:  # a site's crash becomes an error reply, as in Flower
            reply = Message(Error(code=CLIENT_EXCEPTION, reason=f"{type(err).__name__}: {err}"), reply_to=received)
        reply = _through_the_wire(reply)
        if self.on_reply is not None:
            self.on_reply(received, reply)
        return reply


def _through_the_wire(message: Message) -> Message:
    """Serialise a message's content to bytes and parse it back, as a network hop would."""
    if message.has_error():
        return message
    wire = recorddict_to_proto(message.content).SerializeToString()
    message.__dict__["_content"] = recorddict_from_proto(ProtoRecordDict.FromString(wire))
    return message
