"""Chunking: every MQTT payload is one chunk of an envelope, at most ``max_size`` bytes.

Theory of operation. ``split`` cuts a payload into pieces of equal size (the last may be
shorter) and prefixes each with a fixed 60-byte header:

    offset size  field
    0      2     magic b"FC"
    2      1     chunk format version (1)
    3      1     flags (0)
    4      8     transfer id u64 (the envelope's seq)
    12     4     index u32
    16     4     count u32
    20     8     total payload length u64
    28     32    SHA-256 of the whole payload

``Reassembler.feed`` keys a transfer by (source, transfer id, digest, count, length), so a
forged chunk cannot join a genuine transfer without knowing its digest, and a conflicting
duplicate is refused rather than merged. Chunks may come in any order and any number of times;
completion is checked against length and digest. Memory is bounded per sender (its own share of
transfers and bytes, so one device cannot crowd out another's update), overall (transfers and
bytes), and by age; every drop is counted in ``evictions`` by reason. Recently completed transfers
are remembered so a late duplicate chunk is ignored instead of starting a transfer that never ends.
Integrity only: authenticity comes from the envelope inside.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from fedprune.protocol.errors import DecodeError, TooLarge, UnsupportedVersion

MAGIC = b"FC"
VERSION = 1
HEADER = struct.Struct(">2sBBQIIQ32s")
HEADER_SIZE = HEADER.size
DEFAULT_MAX_CHUNK = 128 * 1024  # AWS IoT Core's message size limit
MIN_CHUNK = 1024
_PIECE_OVERHEAD = 128  # per buffered chunk, for the byte budget: dict slot + bytes object


def split(payload: bytes, *, transfer_id: int, max_size: int = DEFAULT_MAX_CHUNK) -> list[bytes]:
    """Chunks of at most ``max_size`` bytes (header included) that reassemble to ``payload``."""
    if not MIN_CHUNK <= max_size <= 2**31:
        raise ValueError(f"max_size={max_size}: expected {MIN_CHUNK}..{2**31} bytes")
    if not 0 <= transfer_id < 2**64:
        raise ValueError("transfer_id must be a u64")
    per = max_size - HEADER_SIZE
    count = max(1, -(-len(payload) // per))
    if count >= 2**32:
        raise ValueError("payload too large to chunk")
    digest = hashlib.sha256(payload).digest()
    view = memoryview(payload)
    return [
        HEADER.pack(MAGIC, VERSION, 0, transfer_id, i, count, len(payload), digest) + view[i * per : (i + 1) * per]
        for i in range(count)
    ]


@dataclass(frozen=True)
class ChunkHeader:
    transfer_id: int
    index: int
    count: int
    total: int
    digest: bytes


def parse_chunk(chunk: bytes | memoryview, max_payload: int) -> tuple[ChunkHeader, memoryview]:
    """Header and piece of one chunk; DecodeError/TooLarge/UnsupportedVersion when malformed."""
    if not isinstance(chunk, (bytes, bytearray, memoryview)):
        raise DecodeError("a chunk must be bytes")
    if len(chunk) < HEADER_SIZE:
        raise DecodeError(f"chunk of {len(chunk)} bytes is shorter than its {HEADER_SIZE}-byte header")
    magic, version, flags, tid, index, count, total, digest = HEADER.unpack_from(chunk)
    if magic != MAGIC:
        raise DecodeError("not a fedprune chunk (bad magic)")
    if version != VERSION:
        raise UnsupportedVersion(f"chunk format version {version}; this build reads {VERSION}: upgrade the older side")
    if flags:
        raise DecodeError(f"chunk flags {flags:#x} unknown")
    if total > max_payload:
        raise TooLarge(f"transfer of {total} bytes exceeds the limit of {max_payload}")
    piece = memoryview(chunk)[HEADER_SIZE:]
    if count == 0 or index >= count:
        raise DecodeError(f"chunk index {index} outside a transfer of {count} chunks")
    if count > total // (MIN_CHUNK - HEADER_SIZE) + 1:
        raise DecodeError(f"{count} chunks for {total} bytes: pieces smaller than {MIN_CHUNK - HEADER_SIZE} bytes")
    n = len(piece)
    if index < count - 1:
        fits = n * (count - 1) < total <= n * count  # a full piece fixes the piece size
    else:
        fits = n == total if count == 1 else 0 < n < total
    if not fits:
        raise DecodeError(f"chunk {index}/{count} of {len(piece)} bytes does not fit a {total}-byte payload")
    return ChunkHeader(tid, index, count, total, digest), piece


@dataclass
class _Transfer:
    source: str
    started: float
    count: int
    total: int
    digest: bytes
    pieces: dict[int, bytes] = field(default_factory=dict)
    size: int = 0


@dataclass
class _Share:
    """What one sender holds in the buffer: its partial transfers, oldest first, and their bytes."""

    transfers: OrderedDict[tuple, None] = field(default_factory=OrderedDict)
    size: int = 0


class Reassembler:
    """Collects chunks into payloads. ``feed`` returns the payload once it is complete, else None.

    Each sender (``source``: the device, for uplinks) has its own share of the buffer, at most
    ``max_source_transfers`` partial transfers and ``max_source_bytes`` bytes: a sender that
    exceeds its share loses its own oldest transfer, never another sender's. The global bounds
    are the backstop for many senders at once; there the sender holding the most gives way.
    Partial transfers older than ``max_age`` are dropped by ``expire``, which the daemons call
    on every tick (not only when another chunk arrives). Every drop is counted in ``evictions``
    by reason: ``source_transfers``, ``source_bytes``, ``transfers``, ``bytes``, ``age``.
    """

    def __init__(
        self,
        *,
        max_payload: int = 64 << 20,
        max_transfers: int = 64,
        max_buffered: int = 256 << 20,
        max_age: float = 300.0,
        remember_completed: int = 4096,
        max_source_transfers: int = 4,
        max_source_bytes: int | None = None,
    ) -> None:
        source_bytes = max_buffered if max_source_bytes is None else max_source_bytes
        if min(max_payload, max_transfers, max_buffered, remember_completed, max_source_transfers, source_bytes) < 1 \
                or max_age <= 0:
            raise ValueError("Reassembler bounds must be positive")
        self.max_payload = max_payload
        self.max_transfers = max_transfers
        self.max_buffered = max_buffered
        self.max_age = float(max_age)
        self.max_source_transfers = max_source_transfers
        self.max_source_bytes = min(source_bytes, max_buffered)
        self._transfers: OrderedDict[tuple, _Transfer] = OrderedDict()
        self._shares: dict[str, _Share] = {}
        self._completed: OrderedDict[tuple, None] = OrderedDict()
        self._remember = remember_completed
        self._buffered = 0
        self.evictions: Counter[str] = Counter()
        self.duplicates = 0

    @property
    def buffered_bytes(self) -> int:
        return self._buffered

    def __len__(self) -> int:
        return len(self._transfers)

    def held_by(self, source: str) -> tuple[int, int]:
        """(partial transfers, bytes) that ``source`` holds now."""
        share = self._shares.get(source)
        return (0, 0) if share is None else (len(share.transfers), share.size)

    def feed(self, chunk: bytes | memoryview, now: float, source: str = "") -> bytes | None:
        head, piece = parse_chunk(chunk, self.max_payload)
        key = (source, head.transfer_id, head.digest, head.count, head.total)
        if key in self._completed:
            self.duplicates += 1  # QoS 1 redelivery or a byte-exact replay: harmless, but counted
            return None
        if head.count == 1:
            return self._finish(key, bytes(piece), head.digest)
        self.expire(now)
        transfer = self._transfers.get(key)
        if transfer is None:
            transfer = self._start(key, source, head, now)
        held = transfer.pieces.get(head.index)
        if held is not None:
            if held != piece:
                raise DecodeError(f"chunk {head.index} of transfer {head.transfer_id} conflicts with an earlier copy")
            return None
        cost = len(piece) + _PIECE_OVERHEAD
        self._make_room(cost, key)
        transfer.pieces[head.index] = bytes(piece)
        transfer.size += cost
        self._shares[source].size += cost
        self._buffered += cost
        if len(transfer.pieces) < transfer.count:
            return None
        self._drop(key)
        payload = b"".join(transfer.pieces[i] for i in range(transfer.count))
        if len(payload) != transfer.total:
            raise DecodeError(f"transfer {head.transfer_id} reassembled to {len(payload)} bytes, header says {transfer.total}")
        return self._finish(key, payload, transfer.digest)

    def expire(self, now: float) -> int:
        """Drop partial transfers older than ``max_age``; how many were dropped."""
        stale = [k for k, t in self._transfers.items() if now - t.started > self.max_age]
        for key in stale:
            self._drop(key)
            self.evictions["age"] += 1
        return len(stale)

    def _finish(self, key: tuple, payload: bytes, digest: bytes) -> bytes:
        if hashlib.sha256(payload).digest() != digest:
            raise DecodeError("reassembled payload does not match its SHA-256 digest")
        self._completed[key] = None
        while len(self._completed) > self._remember:
            self._completed.popitem(last=False)
        return payload

    def _start(self, key: tuple, source: str, head: ChunkHeader, now: float) -> _Transfer:
        if head.total + head.count * _PIECE_OVERHEAD > self.max_source_bytes:
            raise TooLarge(f"transfer of {head.total} bytes exceeds one sender's reassembly share of "
                           f"{self.max_source_bytes} bytes")
        share = self._shares.setdefault(source, _Share())
        while len(share.transfers) >= self.max_source_transfers:
            self._evict(next(iter(share.transfers)), "source_transfers")
        while len(self._transfers) >= self.max_transfers:
            self._evict(next(iter(self._shares[self._largest(by_bytes=False)].transfers)), "transfers")
        transfer = _Transfer(source, now, head.count, head.total, head.digest)
        self._transfers[key] = transfer
        share.transfers[key] = None
        return transfer

    def _make_room(self, cost: int, keep: tuple) -> None:
        while self._shares[keep[0]].size + cost > self.max_source_bytes:
            self._evict_or_refuse(keep[0], keep, "source_bytes")
        while self._buffered + cost > self.max_buffered:
            self._evict_or_refuse(self._largest(by_bytes=True), keep, "bytes")

    def _evict_or_refuse(self, source: str, keep: tuple, why: str) -> None:
        """Drop ``source``'s oldest transfer other than the growing one; if none is left, refuse that."""
        victim = next((k for k in self._shares[source].transfers if k != keep), keep)
        self._evict(victim, why)
        if victim == keep:
            raise TooLarge(f"transfer exceeds the reassembly buffer ({why})")

    def _largest(self, by_bytes: bool) -> str:
        """The sender holding the most bytes (or partial transfers): it gives way first."""
        return max(self._shares, key=lambda s: self._shares[s].size if by_bytes else len(self._shares[s].transfers))

    def _evict(self, key: tuple, why: str) -> None:
        self._drop(key)
        self.evictions[why] += 1

    def _drop(self, key: tuple) -> None:
        transfer = self._transfers.pop(key)
        self._buffered -= transfer.size
        share = self._shares[transfer.source]
        del share.transfers[key]
        share.size -= transfer.size
        if not share.transfers:
            del self._shares[transfer.source]
