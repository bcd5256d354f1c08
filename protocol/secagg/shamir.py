"""Shamir's t-of-m secret sharing of 32-byte secrets over the prime field GF(2**521 - 1).

A secret s becomes the constant term of a random polynomial f of degree t-1; share j is
(x_j, f(x_j)). Any t shares fix f and so f(0) = s (Lagrange interpolation); t-1 shares are
consistent with every s equally, so they say nothing about it. The Mersenne prime is far above
2**256, so a 32-byte secret is one field element, and a wrong combination shows itself by
landing above 2**256 almost surely.

Wire form of a share: x as 2 bytes, then y as 66 bytes, both big-endian (68 bytes).
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from fedprune.protocol.secagg.errors import SecAggError

PRIME = 2**521 - 1
SECRET_LEN = 32
X_LEN = 2
Y_LEN = 66
SHARE_LEN = X_LEN + Y_LEN
MAX_SUBSETS = 4096  # t-subsets tried per secret when forged shares are among those revealed


@dataclass(frozen=True)
class Share:
    """One point (x, y) of the sharing polynomial; x in 1..65535, y in [0, PRIME)."""

    x: int
    y: int


def split(secret: bytes, xs: Sequence[int], threshold: int) -> list[Share]:
    """Shares of ``secret`` at the distinct points ``xs``, any ``threshold`` of which recover it."""
    if type(secret) is not bytes or len(secret) != SECRET_LEN:
        raise SecAggError("bad_params", f"a shared secret is {SECRET_LEN} bytes")
    if len(set(xs)) != len(xs) or not all(0 < x < 1 << 8 * X_LEN for x in xs):
        raise SecAggError("bad_params", "share points must be distinct and in 1..65535")
    if not 1 <= threshold <= len(xs):
        raise SecAggError("bad_params", f"threshold {threshold} with {len(xs)} shares")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        y = 0
        for c in reversed(coefficients):
            y = (y * x + c) % PRIME
        shares.append(Share(x, y))
    return shares


def evaluate(points: Sequence[Share], at: int) -> int:
    """f(at) for the polynomial of degree len(points)-1 through ``points`` (Lagrange)."""
    total = 0
    for j, pj in enumerate(points):
        num = den = 1
        for m, pm in enumerate(points):
            if m != j:
                num = num * (at - pm.x) % PRIME
                den = den * (pj.x - pm.x) % PRIME
        total = (total + pj.y * num * pow(den, -1, PRIME)) % PRIME
    return total


def combine(shares: Iterable[Share]) -> int:
    """f(0) of the polynomial through ``shares``: the secret if they are at least t genuine
    shares, an unrelated field element if fewer."""
    return evaluate(list(shares), 0)


def reconstruct(shares: Iterable[Share], threshold: int, owner: str) -> bytes:
    """The 32-byte secret of ``owner`` from ``threshold`` of ``shares`` (lowest x first);
    SecAggError too_few_shares when there are fewer distinct points, bad_share when they do not
    combine to a 32-byte secret."""
    by_x = {s.x: s for s in shares}
    if len(by_x) < threshold:
        raise SecAggError("too_few_shares", f"{owner}: {len(by_x)} shares, {threshold} needed")
    value = combine(by_x[x] for x in sorted(by_x)[:threshold])
    if value >> 8 * SECRET_LEN:
        raise SecAggError("bad_share", f"{owner}: the shares do not combine to a {SECRET_LEN}-byte secret")
    return value.to_bytes(SECRET_LEN, "big")


def reconstruct_checked(shares: Mapping[str, Share], threshold: int, owner: str, valid: Callable[[bytes], bool],
                        suspects: Collection[str] = ()) -> tuple[bytes, frozenset[str]]:
    """The secret of ``owner`` from ``shares`` keyed by the holder that revealed each (distinct
    x), and the holders whose shares are off its polynomial. ``valid`` tells the genuine secret
    (a commitment, a public key). Tries leaving out the ``suspects``, then no holder, then each
    one, each pair...: with f bad shares among r, at most 1 + C(r,0) + ... + C(r,f) tries (capped
    at ``MAX_SUBSETS``), so a few bad shares cannot hide a secret while t genuine ones are in."""
    if len(shares) < threshold:
        raise SecAggError("too_few_shares", f"{owner}: {len(shares)} shares, {threshold} needed")
    holders = sorted(shares, key=lambda h: shares[h].x)
    suspected = [frozenset(h for h in holders if h in suspects)] if any(h in suspects for h in holders) else []
    left_out = itertools.chain(suspected, *(map(frozenset, itertools.combinations(holders, e))
                                            for e in range(len(holders) - threshold + 1)))
    for excluded in itertools.islice(left_out, MAX_SUBSETS):
        subset = [h for h in holders if h not in excluded][:threshold]
        if len(subset) < threshold:
            continue
        points = [shares[h] for h in subset]
        value = combine(points)
        if value >> 8 * SECRET_LEN or not valid(secret := value.to_bytes(SECRET_LEN, "big")):
            continue
        off = frozenset(h for h in holders if h not in subset and evaluate(points, shares[h].x) != shares[h].y)
        return secret, off
    raise SecAggError("bad_share", f"{owner}: no {threshold} of the {len(shares)} shares revealed rebuild it "
                                   f"(bad shares among those of {sorted(shares)}, or from the owner itself)")


def encode_share(share: Share) -> bytes:
    return share.x.to_bytes(X_LEN, "big") + share.y.to_bytes(Y_LEN, "big")


def decode_share(data: bytes) -> Share:
    if type(data) is not bytes or len(data) != SHARE_LEN:
        raise SecAggError("bad_share", f"a share is {SHARE_LEN} bytes")
    x, y = int.from_bytes(data[:X_LEN], "big"), int.from_bytes(data[X_LEN:], "big")
    if x == 0 or y >= PRIME:
        raise SecAggError("bad_share", "share point out of range")
    return Share(x, y)
