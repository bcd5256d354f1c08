import hashlib

import pytest
from hypothesis import given, strategies as st

from fedprune.protocol.chunks import HEADER_SIZE, MIN_CHUNK, Reassembler, parse_chunk, split
from fedprune.protocol.errors import DecodeError, TooLarge, UnsupportedVersion


@given(
    payload=st.binary(max_size=6000),
    max_size=st.integers(MIN_CHUNK, 3000),
    data=st.data(),
)
def test_chunks_in_any_order_with_duplicates_reassemble_exactly_once(payload, max_size, data):
    chunks = split(payload, transfer_id=7, max_size=max_size)
    assert all(len(c) <= max_size for c in chunks)
    stream = data.draw(st.permutations(chunks + data.draw(st.lists(st.sampled_from(chunks), max_size=5))))
    r = Reassembler()
    outputs = [r.feed(c, 0.0) for c in stream]
    assert [o for o in outputs if o is not None] == [payload]
    assert len(r) == 0 and r.buffered_bytes == 0


def test_two_transfers_interleaved_and_a_source_keeps_them_apart():
    p1, p2 = b"a" * 5000, b"b" * 5000
    c1, c2 = split(p1, transfer_id=1, max_size=2048), split(p2, transfer_id=1, max_size=2048)
    r = Reassembler()
    out = []
    for x, y in zip(c1, c2):
        out += [r.feed(x, 0.0, "dev-a"), r.feed(y, 0.0, "dev-b")]
    assert [o for o in out if o is not None] == [p1, p2]


def test_a_forged_chunk_cannot_replace_a_genuine_piece():
    payload = bytes(range(256)) * 20
    chunks = split(payload, transfer_id=3, max_size=2048)
    forged = bytearray(chunks[0])
    forged[-1] ^= 1
    r = Reassembler()
    assert r.feed(chunks[0], 0.0) is None
    with pytest.raises(DecodeError, match="conflicts"):
        r.feed(bytes(forged), 0.0)
    assert [r.feed(c, 0.0) for c in chunks[1:]][-1] == payload


def test_digest_mismatch_on_completion_is_a_decode_error():
    chunks = split(b"x" * 3000, transfer_id=1, max_size=2048)
    bad = bytearray(chunks[1])
    bad[-1] ^= 1
    r = Reassembler()
    r.feed(chunks[0], 0.0)
    with pytest.raises(DecodeError, match="SHA-256"):
        r.feed(bytes(bad), 0.0)


def test_old_transfers_are_evicted_by_age_and_counted():
    r = Reassembler(max_age=10.0)
    r.feed(split(b"x" * 4000, transfer_id=1, max_size=2048)[0], 0.0)
    late = split(b"y" * 4000, transfer_id=2, max_size=2048)
    r.feed(late[0], 11.0)
    assert r.evictions["age"] == 1 and len(r) == 1


def test_concurrent_transfers_and_buffered_bytes_are_bounded():
    r = Reassembler(max_transfers=3, max_buffered=3 * (2048 + 200))
    for tid in range(10):
        r.feed(split(bytes([tid]) * 5000, transfer_id=tid, max_size=2048)[0], 0.0)
        assert len(r) <= 3 and r.buffered_bytes <= r.max_buffered
    assert r.evictions["transfers"] + r.evictions["bytes"] == 7
    with pytest.raises(TooLarge):
        Reassembler(max_payload=1000).feed(split(b"z" * 2000, transfer_id=1)[0], 0.0)


def test_a_transfer_bigger_than_the_buffer_is_refused():
    r = Reassembler(max_buffered=4000)
    chunks = split(b"q" * 10_000, transfer_id=1, max_size=2048)
    with pytest.raises(TooLarge):
        for c in chunks:
            r.feed(c, 0.0)
    assert r.buffered_bytes <= 4000


@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda c: c[:10], DecodeError),
        (lambda c: b"XX" + c[2:], DecodeError),
        (lambda c: c[:2] + b"\x02" + c[3:], UnsupportedVersion),
        (lambda c: c[:3] + b"\x01" + c[4:], DecodeError),
        (lambda c: c + b"extra", DecodeError),
    ],
)
def test_malformed_chunk_headers(mutate, error):
    chunk = split(b"hello", transfer_id=1)[0]
    with pytest.raises(error):
        parse_chunk(mutate(chunk), 1 << 20)


def test_header_layout_is_fixed():
    (chunk,) = split(b"abc", transfer_id=0x0102030405060708)
    assert HEADER_SIZE == 60 and chunk[:4] == b"FC\x01\x00" and chunk[4:12] == bytes(range(1, 9))
    assert chunk[28:60] == hashlib.sha256(b"abc").digest() and chunk[60:] == b"abc"


def test_split_refuses_unusable_sizes():
    with pytest.raises(ValueError):
        split(b"x", transfer_id=1, max_size=100)
    with pytest.raises(ValueError):
        split(b"x", transfer_id=-1)


def test_chunks_of_a_completed_transfer_are_dropped_and_counted():
    payload = b"x" * 5000
    chunks = split(payload, transfer_id=9, max_size=2048)
    r = Reassembler()
    assert [r.feed(c, 0.0) for c in chunks][-1] == payload
    assert r.duplicates == 0
    assert [r.feed(c, 1.0) for c in chunks] == [None] * len(chunks)
    assert r.duplicates == len(chunks)


def _flood(r: Reassembler, source: str, transfers: int, now: float = 0.0) -> None:
    """First chunks of ``transfers`` multi-chunk transfers that never finish."""
    for tid in range(transfers):
        r.feed(split(bytes([tid % 256]) * 6000, transfer_id=1000 + tid, max_size=2048)[0], now, source)


def test_one_senders_flood_does_not_evict_another_senders_update():
    """The field attack: 64 partial transfers from one device evicted another's in-flight update."""
    honest = b"h" * 9000
    chunks = split(honest, transfer_id=1, max_size=2048)
    assert len(chunks) == 5
    r = Reassembler(max_transfers=64, max_source_transfers=4)
    out = [r.feed(chunks[0], 0.0, "update/dev-1")]
    for chunk in chunks[1:]:
        _flood(r, "update/dev-4", 100)
        out.append(r.feed(chunk, 0.0, "update/dev-1"))
    assert out[-1] == honest
    assert r.held_by("update/dev-4")[0] <= 4 and r.evictions["source_transfers"] == 4 * 100 - 4


def test_a_senders_bytes_are_bounded_by_its_share_and_it_loses_its_own_oldest():
    r = Reassembler(max_source_bytes=5 * (2048 + 200), max_source_transfers=100)
    r.feed(split(b"o" * 6000, transfer_id=1, max_size=2048)[0], 0.0, "dev-1")
    _flood(r, "dev-4", 50)
    assert r.held_by("dev-4")[1] <= r.max_source_bytes
    assert r.held_by("dev-1")[0] == 1 and r.evictions["source_bytes"] >= 45


def test_a_transfer_larger_than_a_senders_share_is_refused_before_it_is_buffered():
    r = Reassembler(max_source_bytes=8000)
    with pytest.raises(TooLarge, match="share"):
        r.feed(split(b"q" * 20_000, transfer_id=1, max_size=2048)[0], 0.0, "dev-4")
    assert r.buffered_bytes == 0 and len(r) == 0


def test_the_global_bound_takes_from_the_sender_holding_the_most():
    r = Reassembler(max_transfers=6, max_source_transfers=5)
    _flood(r, "dev-1", 1)
    _flood(r, "dev-4", 5)
    _flood(r, "dev-5", 2)
    assert r.held_by("dev-1")[0] == 1 and len(r) <= 6 and r.evictions["transfers"] == 2


def test_expire_drops_stale_partial_transfers_without_another_chunk():
    r = Reassembler(max_age=10.0)
    _flood(r, "dev-4", 3, now=0.0)
    assert r.expire(5.0) == 0 and len(r) == 3
    assert r.expire(10.5) == 3 and len(r) == 0 and r.buffered_bytes == 0 and r.evictions["age"] == 3
    assert r.held_by("dev-4") == (0, 0)
