"""Who shares with whom: the Harary graph H(k, n) over a seeded ring of the round's devices.

SecAgg+ replaces the complete graph of the original protocol with a sparse random one: each
device masks against, and hands its secrets to, only its k neighbours, so the work per device
is O(k) instead of O(n). Devices sit on a ring in an order drawn from the round's public seed;
each is linked to the k/2 nearest on either side. The order is a sort by SHA-256(seed, id), so
anyone holding the seed and the device list can rebuild the same graph, independent of any
library's random-number stream. When n - 1 <= k the graph is complete.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from fedprune.protocol.secagg.errors import SecAggError
from fedprune.protocol.secagg.keys import bind


def ring_order(devices: Sequence[str], seed: bytes) -> tuple[str, ...]:
    """The devices in the seeded order of the ring (a uniformly random permutation of the ids)."""
    if len(set(devices)) != len(devices):
        raise SecAggError("duplicate", "a device is listed twice")
    return tuple(sorted(devices, key=lambda d: hashlib.sha256(bind(seed, d.encode())).digest()))


def neighbour_graph(devices: Sequence[str], degree: int, seed: bytes) -> dict[str, tuple[str, ...]]:
    """Each device's neighbours (sorted), symmetric, ``min(degree, n - 1)`` of them each."""
    if degree < 2 or degree % 2:
        raise SecAggError("bad_params", f"degree={degree}: expected an even number >= 2")
    ring = ring_order(devices, seed)
    n = len(ring)
    if degree >= n - 1:
        return {d: tuple(sorted(set(ring) - {d})) for d in ring}
    half = degree // 2
    return {d: tuple(sorted(ring[(i + j) % n] for j in range(-half, half + 1) if j)) for i, d in enumerate(ring)}
