"""Wait for SuperNodes and learn which data partition each one holds (a QUERY round)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
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
    """Ask every node for its ``partition-id``: ``{node id: partition id}``."""
    return discover(grid, node_ids, timeout).node_to_partition


@dataclass(frozen=True)
class Discovery:
    """What the partition query established: node -> partition id, and the partition count
    the nodes agree on (None when they do not or did not say)."""

    node_to_partition: dict[int, int]
    num_partitions: int | None


def discover(grid: Grid, node_ids: list[int], timeout: float = 120.0) -> Discovery:
    """Ask every node for ``partition-id`` and ``num-partitions``; validate each answer.

    A node that does not answer, answers without an ``info`` record, with a non-integer or
    out-of-range id, or with an id another node also claims is left out of the mapping with a
    logged reason (it is then identified by its node id). ``num_partitions`` is the count more
    than half of the answering nodes report (None otherwise); nodes that report another one are
    left out too."""
    msgs = [Message(RecordDict(), dst_node_id=nid, message_type=MessageType.QUERY)
            for nid in node_ids]
    claims: dict[int, tuple[int, int]] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        nid = reply.metadata.src_node_id
        try:
            if reply.has_error():
                raise ValueError(f"error {reply.error.reason}")
            if nid not in node_ids or nid in claims:
                raise ValueError("unexpected or repeated answer")
            claims[nid] = _partition_claim(reply)
        except Exception as err:  # noqa: BLE001 - a bad answer only loses that node's identity
            log(WARNING, "node %s: partition query answer ignored: %s", nid, err)
    counts = Counter(n for _, n in claims.values())
    top = counts.most_common(1)[0] if counts else None
    # the count more than half of the answering nodes report; else none (a tie is not trusted)
    num_partitions = top[0] if top is not None and 2 * top[1] > len(claims) else None
    owners = Counter(pid for pid, n in claims.values() if n == num_partitions)
    mapping: dict[int, int] = {}
    for nid, (pid, n) in claims.items():
        if n != num_partitions:
            log(WARNING, "node %s reports num-partitions = %d, the others %s: left out", nid, n,
                num_partitions)
        elif owners[pid] > 1:
            log(WARNING, "node %s: partition-id %d is claimed by %d nodes: left out", nid, pid,
                owners[pid])
        else:
            mapping[nid] = pid
    return Discovery(mapping, num_partitions)


def _partition_claim(reply: Message) -> tuple[int, int]:
    """(partition-id, num-partitions) of one query answer; ValueError says what is wrong."""
    if "info" not in reply.content.metric_records:
        raise ValueError("no 'info' metric record")
    info = reply.content.metric_records["info"]
    values = []
    for key in ("partition-id", "num-partitions"):
        value = info.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} = {value!r}: not an integer")
        values.append(int(value))
    pid, num = values
    if not 1 <= num <= 1_000_000 or not 0 <= pid < num:
        raise ValueError(f"partition-id = {pid} with num-partitions = {num}: out of range")
    return pid, num
