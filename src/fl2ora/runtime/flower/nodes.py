"""The map from Flower node ids to fl2ora partitions.

Flower gives every SuperNode a random node id. fl2ora samples clients by
partition id (``partition-id`` in each node's ``node_config``), so the server sends
every new node a query message for its partition and keeps the map.
"""

from __future__ import annotations

import logging
import time

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fl2ora.runtime.flower.keys import CONFIG_KEY, NUM_PARTITIONS_KEY
from fl2ora.runtime.flower.messages import InvalidReplyError, parse_query_reply

logger = logging.getLogger(__name__)


class PartitionDirectory:
    """Map connected Flower node ids to partition ids, learned by querying each node once.

    Args:
        num_partitions: K, the run's ``partition.num_clients``.
        query_timeout: seconds to wait for the replies to one batch of queries.
    """

    def __init__(self, num_partitions: int, query_timeout: float) -> None:
        if num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {num_partitions!r}.")
        self.num_partitions = num_partitions
        self.query_timeout = query_timeout
        self._partition_of_node: dict[int, int] = {}
        self._node_of_partition: dict[int, int] = {}
        self._rejected: set[int] = set()

    def node_of(self, partition_id: int) -> int | None:
        """Return the node serving ``partition_id``, or None when no connected node does."""
        return self._node_of_partition.get(partition_id)

    def partition_of(self, node_id: int) -> int | None:
        """Return the partition ``node_id`` serves, or None for an unknown or rejected node."""
        return self._partition_of_node.get(node_id)

    def missing_partitions(self) -> list[int]:
        """Return the partitions that no known node serves, sorted."""
        return [p for p in range(self.num_partitions) if p not in self._node_of_partition]

    def refresh(self, grid: Grid) -> None:
        """Forget nodes that left and query the nodes not seen before.

        A node whose reply is invalid (another ``num-partitions``, a partition out of
        range, or a partition another node already serves) is logged and never
        queried again. A node that does not reply in time is queried again at the
        next refresh.
        """
        connected = set(grid.get_node_ids())
        for node_id in sorted(set(self._partition_of_node) - connected):
            partition = self._partition_of_node.pop(node_id)
            del self._node_of_partition[partition]
            logger.warning("Node %d (partition %d) is no longer connected", node_id, partition)

        unknown = sorted(connected - set(self._partition_of_node) - self._rejected)
        if not unknown:
            return
        queries = [
            Message(
                RecordDict({CONFIG_KEY: ConfigRecord({NUM_PARTITIONS_KEY: self.num_partitions})}),
                dst_node_id=node_id,
                message_type=MessageType.QUERY,
                ttl=max(self.query_timeout, 1.0),
            )
            for node_id in unknown
        ]
        replies = list(grid.send_and_receive(queries, timeout=self.query_timeout))
        for reply in replies:
            self._register(reply)
        answered = {reply.metadata.src_node_id for reply in replies}
        for node_id in unknown:
            if node_id not in answered:
                logger.warning("Node %d sent no reply to the partition query within %.0f s", node_id, self.query_timeout)

    def _register(self, reply: Message) -> None:
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            logger.warning("Node %d failed the partition query: %s", node_id, reply.error.reason)
            return
        try:
            partition = parse_query_reply(reply.content, self.num_partitions)
        except InvalidReplyError as error:
            logger.error("Node %d is ignored for this run: %s", node_id, error)
            self._rejected.add(node_id)
            return
        holder = self._node_of_partition.get(partition)
        if holder is not None and holder != node_id:
            logger.error(
                "Node %d reports partition %d, which node %d already serves; node %d is ignored for this run",
                node_id, partition, holder, node_id,
            )
            self._rejected.add(node_id)
            return
        self._partition_of_node[node_id] = partition
        self._node_of_partition[partition] = node_id
        logger.info("Node %d serves partition %d", node_id, partition)

    def wait_until_complete(self, grid: Grid, timeout: float, poll_interval: float = 1.0) -> None:
        """Refresh until every partition has a node, or ``timeout`` seconds have passed.

        The run goes on in either case; partitions still without a node are logged
        and count as missing whenever they are sampled.
        """
        deadline = time.monotonic() + timeout
        while True:
            self.refresh(grid)
            missing = self.missing_partitions()
            if not missing:
                logger.info("All %d partitions have a connected node", self.num_partitions)
                return
            if time.monotonic() >= deadline:
                logger.warning(
                    "After waiting %.0f s, partitions %s have no connected node; the run starts without them",
                    timeout, missing,
                )
                return
            time.sleep(poll_interval)
