"""A Flower Grid that hands each message to a ClientApp in this process.

It runs the real ServerApp and ClientApp without SuperLink, SuperNodes or
sockets, one node after another, which is what tests and debugging need:

    grid = InProcessGrid(client_app.app, [{"partition-id": k, "num-partitions": 3} for k in range(3)])
    server_app.app(grid, Context(run_id=grid.run.run_id, node_id=0, node_config={},
                                 state=RecordDict(), run_config=settings.to_run_config()))

Each node has its own :class:`flwr.app.Context`, kept across messages, so
``context.state`` persists between rounds as on a SuperNode. Node ids are drawn
at random, as Flower's are. ``reply_hook`` can replace or drop any reply to
inject faults.
"""

from __future__ import annotations

import copy
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=no-name-in-module
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

logger = logging.getLogger(__name__)

ReplyHook = Callable[[Message, Message, Context], "Message | None"]
"""``hook(instruction, reply, node_context) -> reply``: return a replacement reply, or None to drop it."""


class InProcessGrid(Grid):
    """Deliver messages to ``client_app`` in this process, one node per ``node_configs`` entry.

    Args:
        client_app: the ClientApp every node runs.
        node_configs: one ``node_config`` per node, e.g. ``{"partition-id": 0, "num-partitions": 3}``.
        run_config: the ``run_config`` of every node's Context.
        reply_hook: called with every instruction and its reply; see :data:`ReplyHook`.
        seed: seed of the random node ids.
        run_id: the run id of every message and Context.

    NOTE: ``send_and_receive`` ignores ``timeout``; a dropped reply stands for a late one.
    Creating the grid sets Flower's process-wide task identity (run, task and node
    ids), which the ``Message`` constructor reads.
    """

    def __init__(
        self,
        client_app: ClientApp,
        node_configs: Sequence[Mapping[str, Any]],
        run_config: Mapping[str, Any] | None = None,
        reply_hook: ReplyHook | None = None,
        seed: int = 0,
        run_id: int = 1,
    ) -> None:
        self.client_app = client_app
        self.reply_hook = reply_hook
        rng = np.random.default_rng(seed)
        node_ids: list[int] = []
        while len(node_ids) < len(node_configs):
            node_id = int(rng.integers(2, 2**62))  # 0 and 1 are reserved by Flower
            if node_id not in node_ids:
                node_ids.append(node_id)
        self.contexts: dict[int, Context] = {
            node_id: Context(
                run_id=run_id, node_id=node_id, node_config=dict(node_config), state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for node_id, node_config in zip(node_ids, node_configs)
        }
        self.connected: set[int] = set(node_ids)
        self.sent: list[Message] = []
        """Every instruction pushed, as sent (before delivery copies it)."""
        self.received: list[Message] = []
        """Every reply returned to the server, after ``reply_hook``."""
        self._pending: dict[str, Message] = {}
        self._run = Run.create_empty(run_id)
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        TaskIdentity.task_id = 1

    def node_id_of(self, partition_id: int) -> int:
        """Return the node id whose ``node_config`` has ``partition-id == partition_id``."""
        for node_id, context in self.contexts.items():
            if context.node_config.get("partition-id") == partition_id:
                return node_id
        raise KeyError(f"No node serves partition {partition_id}; node configs: {[c.node_config for c in self.contexts.values()]}")

    def disconnect(self, node_id: int) -> None:
        """Remove a node from ``get_node_ids``; messages to it get no reply."""
        self.connected.discard(node_id)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.connected)

    def get_nodes(self) -> Iterable[NodeInfo]:
        return [NodeInfo(node_id=node_id) for node_id in self.get_node_ids()]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        message_ids = []
        for message in messages:
            self.sent.append(message)
            # Strategies share one payload between instructions; each node gets its own copy.
            delivered = copy.deepcopy(message)
            message_id = uuid.uuid4().hex
            delivered.metadata.__dict__["_message_id"] = message_id  # what Flower's InMemoryGrid does
            self._pending[message_id] = delivered
            message_ids.append(message_id)
        return message_ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        for message_id in message_ids:
            instruction = self._pending.pop(message_id, None)
            if instruction is None:
                continue
            node_id = instruction.metadata.dst_node_id
            if node_id not in self.connected:
                continue
            context = self.contexts[node_id]
            reply = self._call_client(instruction, context)
            if self.reply_hook is not None:
                reply = self.reply_hook(instruction, reply, context)
            if reply is not None:
                self.received.append(reply)
                replies.append(reply)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _call_client(self, instruction: Message, context: Context) -> Message:
        try:
            return self.client_app(instruction, context)
        except Exception as error:  # noqa: BLE001 - a SuperNode turns any ClientApp exception into an error reply
            logger.warning("ClientApp on node %d raised %r", context.node_id, error)
            reason = f"{type(error)}:<'{error}'>"
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=instruction)
