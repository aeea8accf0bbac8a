"""Device names on a cluster of nodes (pure: no Ray here).

On one machine a device is ``cpu`` or ``gpu:N``. On a cluster (``modelium serve --ray ADDRESS``)
every node's devices carry the node: ``NODE/cpu`` and ``NODE/gpu:N``, where ``NODE`` is
``node-`` and the first 8 hex digits of the node's Ray id (``node-9ca76154/gpu:0``). The
simulator accepts any node label (``node-a/gpu:0=24GiB,node-b/cpu=64GiB``).
"""

from __future__ import annotations

import re

NODE_PREFIX = "node-"
SHORT_ID = 8  # hex digits of a node id kept in its label
_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_LOCAL = re.compile(r"cpu|gpu:[0-9]+")


def node_label(node_id: str) -> str:
    """``"9ca76154e3..."`` (a node's id, hex) -> ``"node-9ca76154"``."""
    node_id = node_id.strip().lower()
    if not re.fullmatch(r"[0-9a-f]+", node_id):
        raise ValueError(f"not a node id (hex digits): {node_id!r}")
    return NODE_PREFIX + node_id[:SHORT_ID]


def device_name(node: str, local: str) -> str:
    """``("node-a", "gpu:0")`` -> ``"node-a/gpu:0"``; a node of ``""`` is this machine (``"gpu:0"``)."""
    name = f"{node}/{local}" if node else local
    parse_device_name(name)
    return name


def parse_device_name(name: str) -> tuple[str, str, str]:
    """``"node-a/gpu:0"`` -> ``("node-a", "gpu:0", "gpu")``; ``"cpu"`` -> ``("", "cpu", "cpu")``.
    ValueError with the reason for anything else."""
    node, slash, local = name.rpartition("/")
    if slash and not _NODE.fullmatch(node):
        raise ValueError(f"{name!r}: {node!r} is not a node name (letters, digits, '.', '_' or '-', "
                         f"such as node-a)")
    if not _LOCAL.fullmatch(local):
        where = f"on node {node} " if slash else ""
        raise ValueError(f"{name!r}: {local!r} {where}is not a device (cpu, gpu:0, gpu:1, ...)")
    return node, local, "cpu" if local == "cpu" else "gpu"


def device_kind(name: str) -> str:
    """``"cpu"`` or ``"gpu"`` for any device name, node-qualified or not."""
    return parse_device_name(name)[2]


def node_of(name: str) -> str:
    """The node part of a device name (``""`` for this machine's devices)."""
    return parse_device_name(name)[0]
