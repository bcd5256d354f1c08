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
completion is checked against length and digest. Memory is bounded three ways, each counted in
``evictions``: concurrent transfers, total buffered bytes, and age. Recently completed transfers
are remembered so a late duplicate chunk is ignored instead of starting a transfer that never ends.
Integrity only: authenticity comes from the envelope inside.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from protocol.errors import DecodeError, TooLarge, UnsupportedVersion

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
    started: float
    count: int
    total: int
    digest: bytes
    pieces: dict[int, bytes] = field(default_factory=dict)
    size: int = 0


class Reassembler:
    """Collects chunks into payloads. ``feed`` returns the payload once it is complete, else None."""

    def __init__(
        self,
        *,
        max_payload: int = 64 << 20,
        max_transfers: int = 64,
        max_buffered: int = 256 << 20,
        max_age: float = 300.0,
        remember_completed: int = 4096,
    ) -> None:
        if min(max_payload, max_transfers, max_buffered, remember_completed) < 1 or max_age <= 0:
            raise ValueError("Reassembler bounds must be positive")
        self.max_payload = max_payload
        self.max_transfers = max_transfers
        self.max_buffered = max_buffered
        self.max_age = float(max_age)
        self._transfers: OrderedDict[tuple, _Transfer] = OrderedDict()
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

    def feed(self, chunk: bytes | memoryview, now: float, source: str = "") -> bytes | None:
        head, piece = parse_chunk(chunk, self.max_payload)
        key = (source, head.transfer_id, head.digest, head.count, head.total)
        if key in self._completed:
            self.duplicates += 1  # QoS 1 redelivery or a byte-exact replay: harmless, but counted
            return None
        if head.count == 1:
            return self._finish(key, bytes(piece), head.digest)
        self._expire(now)
        transfer = self._transfers.get(key)
        if transfer is None:
            transfer = self._start(key, head, now)
        held = transfer.pieces.get(head.index)
        if held is not None:
            if held != piece:
                raise DecodeError(f"chunk {head.index} of transfer {head.transfer_id} conflicts with an earlier copy")
            return None
        cost = len(piece) + _PIECE_OVERHEAD
        self._make_room(cost, keep=key)
        transfer.pieces[head.index] = bytes(piece)
        transfer.size += cost
        self._buffered += cost
        if len(transfer.pieces) < transfer.count:
            return None
        self._drop(key)
        payload = b"".join(transfer.pieces[i] for i in range(transfer.count))
        if len(payload) != transfer.total:
            raise DecodeError(f"transfer {head.transfer_id} reassembled to {len(payload)} bytes, header says {transfer.total}")
        return self._finish(key, payload, transfer.digest)

    def _finish(self, key: tuple, payload: bytes, digest: bytes) -> bytes:
        if hashlib.sha256(payload).digest() != digest:
            raise DecodeError("reassembled payload does not match its SHA-256 digest")
        self._completed[key] = None
        while len(self._completed) > self._remember:
            self._completed.popitem(last=False)
        return payload

    def _start(self, key: tuple, head: ChunkHeader, now: float) -> _Transfer:
        while len(self._transfers) >= self.max_transfers:
            self._evict_oldest("transfers")
        transfer = _Transfer(now, head.count, head.total, head.digest)
        self._transfers[key] = transfer
        return transfer

    def _make_room(self, cost: int, keep: tuple) -> None:
        if cost > self.max_buffered:
            raise TooLarge(f"chunk of {cost} bytes exceeds the reassembly buffer of {self.max_buffered}")
        while self._buffered + cost > self.max_buffered:
            oldest = next(iter(self._transfers))
            if oldest == keep and len(self._transfers) == 1:
                self._drop(keep)
                self.evictions["bytes"] += 1
                raise TooLarge(f"transfer exceeds the reassembly buffer of {self.max_buffered} bytes")
            self._evict_oldest("bytes", spare=keep)

    def _expire(self, now: float) -> None:
        stale = [k for k, t in self._transfers.items() if now - t.started > self.max_age]
        for key in stale:
            self._drop(key)
            self.evictions["age"] += 1

    def _evict_oldest(self, why: str, spare: tuple | None = None) -> None:
        for key in self._transfers:
            if key != spare:
                self._drop(key)
                self.evictions[why] += 1
                return

    def _drop(self, key: tuple) -> None:
        transfer = self._transfers.pop(key)
        self._buffered -= transfer.size
