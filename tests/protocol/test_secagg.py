"""SecAgg+ end to end with real keys and ciphers: exact sums under dropout at every stage, and the
privacy claims (a curious coordinator learns no single input; t colluding neighbours do, t-1 do not),
bad shares outvoted, malformed messages refused. Over 400 lines because every case runs the same
``run_round`` of the two state machines; split, each part would need its own copy of it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import pytest

from fedprune.protocol.secagg import (
    CIPHERTEXT_LEN, AdvertisedKeys, AggregatorSession, DeviceSession, SecAggError, SecureParams, Share, combine,
    decode_share, encode_share, from_field, mask_seed, neighbour_graph, pairwise_mask, prg, reconstruct, ring_order,
    split, to_field,
)
from fedprune.protocol.secagg.keys import load_private, public_of
from fedprune.protocol.secagg.shamir import PRIME, SHARE_LEN

CONTEXT = b"fed-a|round-7"
SEED = b"round-7 graph seed"


def ids(n: int) -> list[str]:
    return [f"dev-{i:02d}" for i in range(n)]


def spread(n: int, every: int = 3, offset: int = 0, count: int | None = None) -> set[str]:
    """Every ``every``-th device around the round's ring: a dropout pattern that leaves each device
    at least t of its k neighbours when every=3."""
    picked = ring_order(ids(n), SEED)[offset::every]
    return set(picked[: n // every if count is None else count])


@dataclass
class Round:
    """A round driven through both state machines, and everything the coordinator saw (the transcript)."""

    params: SecureParams
    agg: AggregatorSession
    devices: dict[str, DeviceSession]
    inputs: dict[str, np.ndarray]
    keys: dict[str, AdvertisedKeys] = field(default_factory=dict)
    ciphertexts: dict[str, dict[str, bytes]] = field(default_factory=dict)
    inboxes: dict[str, dict[str, bytes]] = field(default_factory=dict)
    masked: dict[str, np.ndarray] = field(default_factory=dict)
    reveals: dict[str, dict[str, bytes]] = field(default_factory=dict)
    u1: frozenset[str] = frozenset()
    survivors: frozenset[str] = frozenset()
    dropped: frozenset[str] = frozenset()

    def reveal(self, devices) -> None:
        for d in sorted(devices):
            self.reveals[d] = self.devices[d].reveal(self.survivors, self.dropped)
            self.agg.on_reveal(d, self.reveals[d])

    def expected(self) -> np.ndarray:
        total = sum(self.inputs[d].astype(np.uint64) for d in self.survivors)
        return (total % self.params.modulus).astype(np.uint32)


def run_round(n: int, rng: np.random.Generator, *, params: SecureParams | None = None, length: int = 64,
              absent=(), gone_after_advertise=(), gone_after_share=(), gone_after_mask=(), silent=()) -> Round:
    """All stages up to and including the reveals; the caller asks for the result. ``absent``
    devices never show up; ``silent`` ones survive but never reveal."""
    params = params or SecureParams.for_devices(n)
    names = ids(n)
    r = Round(params, AggregatorSession(names, params, SEED, CONTEXT, length),
              {d: DeviceSession(d, params, CONTEXT) for d in names},
              {d: rng.integers(0, params.modulus, size=length, dtype=np.uint32) for d in names})
    for d in sorted(set(names) - set(absent)):
        r.keys[d] = r.devices[d].advertise()
        r.agg.on_advertise(d, r.keys[d])
    r.u1 = r.agg.close_advertise()
    for d in sorted(r.u1 - set(gone_after_advertise)):
        r.ciphertexts[d] = r.devices[d].share(r.agg.keys_for(d))
        r.agg.on_shares(d, r.ciphertexts[d])
    u2 = r.agg.close_shares()
    for d in sorted(u2 - set(gone_after_share)):
        r.inboxes[d] = r.agg.inbox_for(d)
        y = r.devices[d].mask(r.inputs[d], r.inboxes[d])
        if d not in gone_after_mask:  # computed, never arrived
            r.masked[d] = y
            r.agg.on_masked(d, y)
    r.survivors, r.dropped = r.agg.close_masked()
    r.reveal(r.survivors - set(silent))
    return r


# --- PRG and fixed point ---------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 16, 32])
def test_prg_is_deterministic_in_range_and_depends_on_the_seed(bits):
    a, b = bytes(32), bytes(31) + b"\x01"
    stream = prg(a, 10_000, bits)
    assert stream.dtype == np.uint32 and stream.shape == (10_000,)
    assert np.array_equal(stream, prg(a, 10_000, bits))
    assert np.array_equal(prg(a, 100, bits), stream[:100])
    assert int(stream.max()) < 2**bits
    assert abs(stream.mean() / 2**bits - 0.5) < 0.02
    assert np.mean(stream == prg(b, 10_000, bits)) < 0.02
    with pytest.raises(SecAggError) as err:
        prg(b"short", 4, bits)
    assert err.value.reason == "bad_key"


def test_pairwise_masks_cancel():
    seed = bytes(range(32))
    both = pairwise_mask("a", "b", seed, 1000, 16) + pairwise_mask("b", "a", seed, 1000, 16)
    assert not (both & np.uint32(0xFFFF)).any()


def test_to_field_is_unbiased_and_within_one_step(rng):
    x = rng.normal(size=50) * 3
    scale, draws = 4.0, 4000
    decoded = from_field(to_field(np.tile(x, draws), scale, 16, rng), scale, 16).reshape(draws, -1)
    assert np.all(np.abs(decoded - x) <= 1 / scale + 1e-12)
    assert np.all(np.abs(decoded.mean(axis=0) - x) < 0.01)  # 5 sd of the mean of 4000 draws
    assert len(np.unique(decoded[:, 0])) == 2  # rounds both ways, not to nearest


def test_negatives_round_trip_in_twos_complement(rng):
    x = np.array([-3.0, -0.5, 0.0, 0.25, 2.75, -128.0, 127.75])
    v = to_field(x, 4.0, 12, rng)
    assert v.dtype == np.uint32 and int(v.max()) < 2**12
    assert int(v[0]) == 2**12 - 12
    assert np.array_equal(from_field(v, 4.0, 12), x)  # exact: x*scale are integers
    with pytest.raises(SecAggError) as err:
        to_field(np.array([np.nan]), 1.0, 16, rng)
    assert err.value.reason == "out_of_range"


def test_fixed_point_sums_survive_the_modulus(rng):
    xs = [rng.normal(size=100) for _ in range(20)]
    scale, bits = 2.0**10, 24
    total = sum(to_field(x, scale, bits, rng).astype(np.uint64) for x in xs) % 2**bits
    assert np.all(np.abs(from_field(total, scale, bits) - sum(xs)) <= 20 / scale)


# --- Shamir ----------------------------------------------------------------------------------

def test_any_t_shares_reconstruct_and_t_minus_1_do_not():
    secret = bytes(range(1, 33))
    shares = split(secret, range(1, 7), 4)
    for subset in itertools.combinations(shares, 4):
        assert reconstruct(subset, 4, "x") == secret
    for subset in itertools.combinations(shares, 3):
        assert combine(subset) != int.from_bytes(secret, "big")
        with pytest.raises(SecAggError) as err:
            reconstruct(subset, 4, "dev-x")
        assert err.value.reason == "too_few_shares" and "dev-x" in str(err.value)
    assert reconstruct(shares, 4, "x") == secret  # more than t is fine


def test_share_wire_form_round_trips_and_rejects_junk():
    share = split(bytes(32), [65535], 1)[0]
    data = encode_share(share)
    assert len(data) == SHARE_LEN == 68 and decode_share(data) == share
    for junk in (data[:-1], bytes(2) + data[2:], data[:2] + (PRIME + 1).to_bytes(66, "big")):
        with pytest.raises(SecAggError) as err:
            decode_share(junk)
        assert err.value.reason == "bad_share"


def test_repeated_points_do_not_count_twice():
    shares = split(bytes(32), [1, 2, 3], 3)
    with pytest.raises(SecAggError) as err:
        reconstruct([shares[0], shares[0], shares[1]], 3, "x")
    assert err.value.reason == "too_few_shares"


# --- graph and parameters --------------------------------------------------------------------

@pytest.mark.parametrize("n,degree", [(10, 8), (30, 10), (50, 12), (7, 4)])
def test_graph_is_a_symmetric_k_regular_ring(n, degree):
    g = neighbour_graph(ids(n), degree, SEED)
    assert set(g) == set(ids(n))
    assert all(len(vs) == degree and d not in vs for d, vs in g.items())
    assert all(d in g[v] for d, vs in g.items() for v in vs)
    assert g == neighbour_graph(list(reversed(ids(n))), degree, SEED)
    assert g != neighbour_graph(ids(n), degree, b"another seed")
    ring = ring_order(ids(n), SEED)
    assert set(g[ring[0]]) == set(ring[1 : degree // 2 + 1]) | set(ring[-(degree // 2):])


def test_graph_is_complete_when_there_are_too_few_devices():
    g = neighbour_graph(ids(5), 8, SEED)
    assert all(set(vs) == set(ids(5)) - {d} for d, vs in g.items())
    with pytest.raises(SecAggError) as err:
        neighbour_graph(["a", "a", "b"], 2, SEED)
    assert err.value.reason == "duplicate"


def test_default_parameters():
    assert SecureParams.for_devices(50) == SecureParams(12, 7, 16)
    assert SecureParams.for_devices(10, bits=24) == SecureParams(8, 5, 24)
    assert SecureParams.for_devices(3) == SecureParams(2, 2, 16)
    assert SecureParams.for_devices(4) == SecureParams(4, 3, 16)  # complete graph of degree 3
    assert SecureParams.for_devices(1000, degree=20) == SecureParams(20, 11, 16)
    for n in range(3, 40):
        p = SecureParams.for_devices(n)
        assert p.threshold <= p.degree_for(n) and 2 * p.threshold > p.degree_for(n)


@pytest.mark.parametrize("kwargs", [dict(degree=3, threshold=2, bits=16), dict(degree=8, threshold=4, bits=16),
                                    dict(degree=8, threshold=9, bits=16), dict(degree=8, threshold=5, bits=33)])
def test_unsafe_or_impossible_parameters_are_refused(kwargs):
    with pytest.raises(SecAggError) as err:
        SecureParams(**kwargs)
    assert err.value.reason == "bad_params"
    with pytest.raises(SecAggError) as err:
        SecureParams.for_devices(2)
    assert err.value.reason == "too_few_devices"


# --- full rounds -----------------------------------------------------------------------------

@pytest.mark.parametrize("n", [10, 30])
@pytest.mark.parametrize("stage", ["none", "advertise", "share", "mask", "reveal"])
def test_round_sums_exactly_with_a_third_dropping_at_each_stage(n, stage, rng):
    third = spread(n)
    r = run_round(n, rng, **{"none": {}, "advertise": dict(gone_after_advertise=third),
                             "share": dict(gone_after_share=third), "mask": dict(gone_after_mask=third),
                             "reveal": dict(silent=third)}[stage])
    total, survivors = r.agg.result()
    assert survivors == set(ids(n)) - (set() if stage in ("none", "reveal") else third)
    assert r.dropped == (third if stage in ("share", "mask") else set())
    assert total.dtype == np.uint32 and np.array_equal(total, r.expected())


@pytest.mark.parametrize("bits", [8, 32])
def test_round_at_the_extreme_moduli(bits, rng):
    r = run_round(10, rng, params=SecureParams.for_devices(10, bits=bits), gone_after_mask=spread(10, count=2))
    total, _ = r.agg.result()
    assert np.array_equal(total, r.expected())


def test_dropouts_at_every_stage_in_one_round(rng):
    third = ring_order(ids(30), SEED)[::3]
    r = run_round(30, rng, gone_after_advertise=third[0::4], gone_after_share=third[1::4],
                  gone_after_mask=third[2::4], silent=third[3::4])
    total, survivors = r.agg.result()
    assert survivors == set(ids(30)) - set(third[0::4] + third[1::4] + third[2::4])
    assert r.dropped == set(third[1::4] + third[2::4])
    assert np.array_equal(total, r.expected())


def test_too_few_reveals_names_the_device_and_late_reveals_finish_the_round(rng):
    half = spread(10, every=2)
    r = run_round(10, rng, silent=half)
    with pytest.raises(SecAggError) as err:
        r.agg.result()
    assert err.value.reason == "too_few_shares" and "self-mask seed of survivor dev-" in str(err.value)
    r.reveal(half)
    total, _ = r.agg.result()
    assert np.array_equal(total, r.expected())


def test_a_dropped_device_needs_t_shares_of_its_mask_key(rng):
    n, (u,) = 30, spread(30, count=1)
    r = run_round(n, rng, gone_after_mask={u}, silent=set(ids(n)))
    t = r.params.threshold
    holders = sorted(v for v in r.survivors if u in r.devices[v].held)
    for i, v in enumerate(holders):  # all reveal, but only t-1 of u's mask-key shares arrive
        shares = r.devices[v].reveal(r.survivors, r.dropped)
        r.agg.on_reveal(v, shares if i < t - 1 else {p: s for p, s in shares.items() if p != u})
    r.reveal(r.survivors - set(holders))
    with pytest.raises(SecAggError) as err:
        r.agg.result()
    assert err.value.reason == "too_few_shares" and f"mask key of dropped device {u}: {t - 1} shares" in str(err.value)


def test_a_forged_mask_key_share_is_caught(rng):
    n, (u,) = 10, spread(10, count=1)
    r = run_round(n, rng, gone_after_mask={u}, silent=set(ids(n)))
    for v in sorted(r.survivors):
        shares = r.devices[v].reveal(r.survivors, r.dropped)
        if u in shares:
            good = decode_share(shares[u])
            shares[u] = encode_share(Share(good.x, (good.y + 1) % PRIME))
        r.agg.on_reveal(v, shares)
    with pytest.raises(SecAggError) as err:
        r.agg.result()
    assert err.value.reason == "bad_share" and u in str(err.value)


def forge(shares: dict[str, bytes], owner: str) -> dict[str, bytes]:
    good = decode_share(shares[owner])
    return {**shares, owner: encode_share(Share(good.x, (good.y + 1) % PRIME))}


@pytest.mark.parametrize(("n", "kind", "liars"), [(30, "seed", 1), (30, "mask_key", 1), (200, "seed", 1),
                                                  (200, "seed", 3), (200, "mask_key", 3)])
def test_forged_shares_are_outvoted_and_listed(n, kind, liars, rng):
    """Neighbours that forge their share of every secret they hold cannot fail the round while t
    genuine shares of each secret are in (each rebuilt secret is checked against the commitment
    or the public key), even from the lowest points (tried first); each bad share is listed."""
    params = SecureParams.for_devices(n)
    (u,) = spread(n, count=1)
    r = run_round(n, rng, params=params, length=8, gone_after_mask={u} if kind == "mask_key" else (),
                  silent=set(ids(n)))
    holders = sorted((v for v in r.survivors if u in r.devices[v].held), key=lambda v: decode_share(
        r.devices[v].reveal(r.survivors, r.dropped)[u]).x)
    hostile = set(holders[:liars])  # the lowest points: in every early t-subset
    for v in sorted(r.survivors):
        shares = r.devices[v].reveal(r.survivors, r.dropped)
        r.agg.on_reveal(v, {p: forge(shares, p)[p] for p in shares} if v in hostile else shares)
    total, _ = r.agg.result()
    assert np.array_equal(total, r.expected())
    assert {(u, v) for v in hostile} <= r.agg.bad_shares
    assert {revealer for _, revealer in r.agg.bad_shares} == hostile


def test_a_share_revealed_at_a_point_its_holder_does_not_hold_is_left_out(rng):
    r = run_round(10, rng, silent=set(ids(10)))
    v = min(r.survivors)
    shares = r.devices[v].reveal(r.survivors, r.dropped)
    owner = min(shares)
    good = decode_share(shares[owner])
    r.agg.on_reveal(v, {**shares, owner: encode_share(Share(good.x % 9 + 1, good.y))})
    r.reveal(r.survivors - {v})
    total, _ = r.agg.result()  # the rest of v's reveal counted
    assert np.array_equal(total, r.expected())
    assert r.agg.bad_shares == {(owner, v)}


def test_a_withdrawn_vector_counts_as_dropped_and_the_sum_holds_without_it(rng):
    names = ids(10)
    params = SecureParams.for_devices(10)
    agg = AggregatorSession(names, params, SEED, CONTEXT, 16)
    devices = {d: DeviceSession(d, params, CONTEXT) for d in names}
    inputs = {d: rng.integers(0, params.modulus, size=16, dtype=np.uint32) for d in names}
    for d in names:
        agg.on_advertise(d, devices[d].advertise())
    for d in sorted(agg.close_advertise()):
        agg.on_shares(d, devices[d].share(agg.keys_for(d)))
    for d in sorted(agg.close_shares()):
        agg.on_masked(d, devices[d].mask(inputs[d], agg.inbox_for(d)))
    agg.withdraw("dev-03")  # revoked after its vector arrived
    survivors, dropped = agg.close_masked()
    assert "dev-03" not in survivors and dropped == {"dev-03"}
    for d in sorted(survivors):
        agg.on_reveal(d, devices[d].reveal(survivors, dropped))
    total, _ = agg.result()
    expected = sum(inputs[d].astype(np.uint64) for d in survivors) % params.modulus
    assert np.array_equal(total, expected.astype(np.uint32))


@pytest.mark.parametrize("when", ["absent", "gone_after_advertise"])
def test_a_device_left_with_fewer_than_t_neighbours_is_left_out_before_anyone_masks_against_it(when, rng):
    ring = ring_order(ids(50), SEED)
    gone = {ring[i] for i in (2, 17, 18, 22, 24, 32, 33, 37, 39, 43, 44)}  # ring[38] keeps 6 < t=7
    r = run_round(50, rng, **{when: gone})
    lonely = ring[38]
    if when == "absent":  # left out of U1: never asked to share
        assert r.u1 == set(ids(50)) - gone - {lonely} and lonely not in r.ciphertexts
    else:  # shared, but left out of U2: nobody masks against it
        assert lonely in r.ciphertexts and lonely not in r.inboxes
        assert not any(lonely in inbox for inbox in r.inboxes.values())
    total, survivors = r.agg.result()
    assert survivors == set(ids(50)) - gone - {lonely} and not r.dropped
    assert np.array_equal(total, r.expected())


def test_a_run_of_k_minus_t_plus_1_dropouts_on_the_ring_ends_the_round(rng):
    """With t > k/2 the device beside such a gap keeps t-1 live neighbours, and so does the next
    one once it is out: the ring unravels, and close_advertise says so at once."""
    with pytest.raises(SecAggError) as err:
        run_round(30, rng, gone_after_advertise=ring_order(ids(30), SEED)[:5])
    assert err.value.reason == "too_few_devices"


def test_fifty_devices_ten_thousand_values(rng):
    r = run_round(50, rng, length=10_000, gone_after_share=spread(50, every=5), gone_after_mask=spread(50, 10, 2))
    assert r.params.degree == 12 and len(r.agg.graph[ids(50)[0]]) == 12
    total, survivors = r.agg.result()
    assert len(survivors) == 35 and np.array_equal(total, r.expected())


# --- privacy ---------------------------------------------------------------------------------

def unmask(r: Round, u: str, seed: bytes, mask_private: bytes) -> np.ndarray:
    """u's input from its masked vector, given its self-mask seed and mask private key."""
    key, bits, n = load_private(mask_private), r.params.bits, r.agg.length
    x = r.masked[u] - prg(seed, n, bits)
    for v in r.inboxes[u]:
        x -= pairwise_mask(u, v, mask_seed(key, r.keys[v].mask_public, CONTEXT, u, v), n, bits)
    return x & np.uint32(r.params.modulus - 1)


def test_a_curious_coordinator_cannot_unmask_one_survivor(rng):
    """With everything it received, the coordinator rebuilds a survivor's self-mask seed and the
    dropped devices' mask keys, but never a survivor's mask key: its masks with surviving
    neighbours stay on."""
    r = run_round(30, rng, length=256, gone_after_mask=spread(30, count=5))
    revealed: dict[str, list[Share]] = {}
    for shares in r.reveals.values():
        for peer, data in shares.items():
            revealed.setdefault(peer, []).append(decode_share(data))
    u = max(sorted(r.survivors), key=lambda d: len(revealed[d]))
    t = r.params.threshold
    seed = reconstruct(revealed[u], t, u)
    assert len(revealed[u]) > t and reconstruct(revealed[u][-t:], t, u) == seed  # all it holds of u: seed shares
    guess = r.masked[u] - prg(seed, r.agg.length, r.params.bits)
    for v in r.inboxes[u]:  # remove what it can: the masks shared with dropped neighbours
        if v in r.dropped:
            key = load_private(reconstruct(revealed[v], t, v))
            guess += pairwise_mask(v, u, mask_seed(key, r.keys[u].mask_public, CONTEXT, v, u), r.agg.length,
                                   r.params.bits)
    guess &= np.uint32(r.params.modulus - 1)
    assert np.mean(guess == r.inputs[u]) < 0.05
    total, _ = r.agg.result()
    assert np.array_equal(total, r.expected())


def test_t_colluding_neighbours_recover_a_survivors_input_and_t_minus_1_do_not(rng):
    r = run_round(30, rng, length=256)
    u, t = min(r.survivors), r.params.threshold
    holders = [v for v in r.inboxes[u] if u in r.devices[v].held][:t]
    assert len(holders) == t
    held = [r.devices[v].held[u] for v in holders]
    seed = reconstruct([h.seed for h in held], t, u)
    key = reconstruct([h.mask_key for h in held], t, u)
    assert public_of(load_private(key)) == r.keys[u].mask_public
    assert np.array_equal(unmask(r, u, seed, key), r.inputs[u])
    few = held[: t - 1]
    guess_seed = (combine(h.seed for h in few) % 2**256).to_bytes(32, "big")
    guess_key = (combine(h.mask_key for h in few) % 2**256).to_bytes(32, "big")
    assert guess_seed != seed and guess_key != key
    assert np.mean(unmask(r, u, guess_seed, guess_key) == r.inputs[u]) < 0.05


def three_devices(contexts=(CONTEXT, CONTEXT, CONTEXT)):
    """a, b, c in a complete graph (k=2, t=2), through stage 2: sessions and who sent whom what."""
    params = SecureParams.for_devices(3)
    devices = {d: DeviceSession(d, params, ctx) for d, ctx in zip("abc", contexts)}
    keys = {d: s.advertise() for d, s in devices.items()}
    sent = {d: s.share({p: k for p, k in keys.items() if p != d}) for d, s in devices.items()}
    assert all(len(ct) == CIPHERTEXT_LEN for out in sent.values() for ct in out.values())
    return devices, sent


def test_shares_open_only_for_their_addressee():
    devices, sent = three_devices()
    with pytest.raises(SecAggError) as err:  # c is handed what a sent to b, as if a had sent it to c
        devices["c"].mask(np.zeros(8, np.uint32), {"a": sent["a"]["b"], "b": sent["b"]["c"]})
    assert err.value.reason == "bad_share_ciphertext" and "from a" in str(err.value)
    flipped = bytearray(sent["a"]["b"])
    flipped[40] ^= 1
    with pytest.raises(SecAggError) as err:
        devices["b"].mask(np.zeros(8, np.uint32), {"a": bytes(flipped), "c": sent["c"]["b"]})
    assert err.value.reason == "bad_share_ciphertext" and "from a" in str(err.value)
    devices["b"].mask(np.zeros(8, np.uint32), {"a": sent["a"]["b"], "c": sent["c"]["b"]})  # the genuine ones open


def test_a_ciphertext_from_another_context_does_not_open():
    devices, sent = three_devices((b"fed-a|round-7", b"fed-a|round-8", b"fed-a|round-7"))
    with pytest.raises(SecAggError) as err:
        devices["b"].mask(np.zeros(4, np.uint32), {"a": sent["a"]["b"], "c": sent["c"]["b"]})
    assert err.value.reason == "bad_share_ciphertext"


def test_a_device_never_reveals_both_kinds_for_one_neighbour(rng):
    r = run_round(10, rng)
    d = min(r.survivors)
    peer = min(r.devices[d].held)
    with pytest.raises(SecAggError) as err:
        r.devices[d].reveal(r.survivors, {peer})
    assert err.value.reason == "reveal_conflict"
    with pytest.raises(SecAggError) as err:  # d revealed peer's seed share in run_round
        r.devices[d].reveal(r.survivors - {peer}, {peer})
    assert err.value.reason == "reveal_conflict" and peer in str(err.value)
    with pytest.raises(SecAggError) as err:
        r.devices[d].reveal(r.survivors - {d}, {d})
    assert err.value.reason == "reveal_conflict"
    with pytest.raises(SecAggError) as err:
        r.devices[d].reveal(set(sorted(r.survivors)[:4]), ())
    assert err.value.reason == "too_few_devices"
    assert r.devices[d].reveal(r.survivors, ()) == r.reveals[d]  # asking again is harmless


# --- stages and malformed messages -----------------------------------------------------------

def test_stages_run_in_order_once(rng):
    params = SecureParams.for_devices(10)
    agg = AggregatorSession(ids(10), params, SEED, CONTEXT, 8)
    dev = DeviceSession("dev-00", params, CONTEXT)
    with pytest.raises(SecAggError) as err:
        dev.mask(np.zeros(8, np.uint32), {})
    assert err.value.reason == "wrong_stage"
    keys = {d: DeviceSession(d, params, CONTEXT).advertise() for d in ids(10)}
    for d in ids(10):
        agg.on_advertise(d, keys[d])
    agg.close_advertise()
    for call in (lambda: agg.on_advertise("dev-00", keys["dev-00"]), agg.close_advertise, agg.close_masked,
                 agg.result, lambda: agg.inbox_for("dev-00")):
        with pytest.raises(SecAggError) as err:
            call()
        assert err.value.reason == "wrong_stage"
    dev.advertise()
    with pytest.raises(SecAggError) as err:
        dev.advertise()
    assert err.value.reason == "wrong_stage"


def test_the_coordinator_refuses_malformed_messages(rng):
    params = SecureParams.for_devices(10)
    agg = AggregatorSession(ids(10), params, SEED, CONTEXT, 8)
    devices = {d: DeviceSession(d, params, CONTEXT) for d in ids(10)}

    def refused(reason, call, *args):
        with pytest.raises(SecAggError) as err:
            call(*args)
        assert err.value.reason == reason, err.value

    refused("unknown_device", agg.on_advertise, "stranger", devices["dev-00"].advertise())
    for d, s in devices.items():
        if d != "dev-00":
            agg.on_advertise(d, s.advertise())
    refused("duplicate", agg.on_advertise, "dev-01", AdvertisedKeys(bytes(32), bytes(32)))
    refused("bad_key", AdvertisedKeys, b"short", bytes(32))
    u1 = agg.close_advertise()
    assert "dev-00" not in u1
    refused("unknown_device", agg.keys_for, "dev-00")
    sent = {d: devices[d].share(agg.keys_for(d)) for d in sorted(u1)}
    a, (first, *rest) = "dev-01", sorted(sent["dev-01"])
    refused("not_a_neighbour", agg.on_shares, a, sent[a] | {"dev-00": sent[a][first]})
    refused("missing_shares", agg.on_shares, a, {v: sent[a][v] for v in rest})
    refused("bad_share_ciphertext", agg.on_shares, a, sent[a] | {first: sent[a][first][:-1]})
    for d in sorted(u1):
        agg.on_shares(d, sent[d])
    agg.close_shares()
    refused("unknown_device", agg.on_masked, "dev-00", np.zeros(8, np.uint32))
    refused("wrong_length", agg.on_masked, a, np.zeros(9, np.uint32))
    refused("bad_vector", agg.on_masked, a, np.full(8, 2**16, np.uint32))
    refused("bad_vector", agg.on_masked, a, np.zeros((2, 4), np.uint32))
    for d in sorted(u1):
        agg.on_masked(d, devices[d].mask(np.ones(8, np.uint32), agg.inbox_for(d)))
    survivors, dropped = agg.close_masked()
    shares = devices[a].reveal(survivors, dropped)
    far = next(d for d in sorted(survivors) if d not in agg.graph[a] and d != a)
    refused("not_a_neighbour", agg.on_reveal, a, shares | {far: next(iter(shares.values()))})
    refused("bad_share", agg.on_reveal, a, shares | {first: b"junk"})
    agg.on_reveal(a, shares)
    refused("duplicate", agg.on_reveal, a, shares)
    for d in sorted(survivors - {a}):
        agg.on_reveal(d, devices[d].reveal(survivors, dropped))
    total, _ = agg.result()
    assert np.array_equal(total, np.full(8, len(survivors), np.uint32))


def test_a_round_that_cannot_go_on_stays_stopped():
    params = SecureParams.for_devices(10)
    agg = AggregatorSession(ids(10), params, SEED, CONTEXT, 8)
    devices = {d: DeviceSession(d, params, CONTEXT) for d in ids(10)}
    for d, s in devices.items():
        agg.on_advertise(d, s.advertise())
    for d in sorted(agg.close_advertise()):
        agg.on_shares(d, devices[d].share(agg.keys_for(d)))
    for d in sorted(agg.close_shares())[: params.threshold - 1]:
        agg.on_masked(d, devices[d].mask(np.zeros(8, np.uint32), agg.inbox_for(d)))
    with pytest.raises(SecAggError) as err:
        agg.close_masked()
    assert err.value.reason == "too_few_devices"
    for call in (agg.result, agg.close_masked, lambda: agg.on_reveal("dev-00", {})):
        with pytest.raises(SecAggError) as err:
            call()
        assert err.value.reason == "wrong_stage"


def test_a_round_too_small_for_its_threshold_is_refused():
    with pytest.raises(SecAggError) as err:
        AggregatorSession(ids(4), SecureParams(degree=8, threshold=5, bits=16), SEED, CONTEXT, 8)
    assert err.value.reason == "too_few_devices"
