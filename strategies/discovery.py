"""Wait for SuperNodes and learn which data partition each one holds (a QUERY round)."""

from __future__ import annotations

import time
from logging import INFO, WARNING

from flwr.app import Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid


def wait_for_nodes(grid: Grid, min_nodes: int, timeout: float = 600.0) -> list[int]:
    """Connected node ids once at least ``min_nodes`` are there (sorted)."""
    deadline = time.time() + timeout
    while len(ids := sorted(grid.get_node_ids())) < min_nodes:
        if time.time() > deadline:
            raise TimeoutError(f"min-available-nodes = {min_nodes}: only {len(ids)} SuperNodes "
                               f"connected after {timeout:.0f} s")
        log(INFO, "waiting for SuperNodes: %d/%d", len(ids), min_nodes)
        time.sleep(1.0)
    return ids


def discover_partitions(grid: Grid, node_ids: list[int], timeout: float = 120.0) -> dict[int, int]:
    """Ask every node for its ``partition-id``; nodes that do not answer are left out."""
    msgs = [Message(RecordDict(), dst_node_id=nid, message_type=MessageType.QUERY)
            for nid in node_ids]
    mapping: dict[int, int] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():
            log(WARNING, "node %s did not answer the partition query: %s",
                reply.metadata.src_node_id, reply.error.reason)
            continue
        mapping[reply.metadata.src_node_id] = int(reply.content["info"]["partition-id"])
    return mapping
