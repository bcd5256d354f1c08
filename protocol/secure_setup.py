"""What a RoundTask carries when its round runs under secure aggregation (docs/PRIVACY.md).

The coordinator fixes these per opened round; ``session`` is fresh for every opening, so that a
round the coordinator opens again (after a restart) never reuses a device's round keys: SecAgg
is safe only if a device never reveals both its self-mask seed and its mask key of one session.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedprune.protocol.secagg.params import SecureParams

SESSION_LEN = 8
MIN_BITS, MAX_BITS = 8, 32


@dataclass(frozen=True)
class SecureSetup:
    """``bits``: the modulus 2**bits of the masked sums; ``degree``: neighbours per device in the
    masking graph; ``threshold``: shares that reconstruct a device's secret; ``noise_multiplier``:
    the σ of distributed DP the field leaves room for (0: none), which a device adding noise
    must match."""

    session: bytes
    bits: int
    degree: int
    threshold: int
    noise_multiplier: float = 0.0

    def __post_init__(self) -> None:
        if type(self.session) is not bytes or len(self.session) != SESSION_LEN:
            raise ValueError(f"session must be {SESSION_LEN} bytes")
        for name, lo, hi in (("bits", MIN_BITS, MAX_BITS), ("degree", 1, 4096), ("threshold", 1, 4096)):
            value = getattr(self, name)
            if type(value) is not int or not lo <= value <= hi:
                raise ValueError(f"secure {name}={value!r}: expected an int in {lo}..{hi}")
        sigma = self.noise_multiplier
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 <= sigma < 1e6:
            raise ValueError(f"secure noise_multiplier={sigma!r}: expected a number in [0, 1e6)")
        object.__setattr__(self, "noise_multiplier", float(sigma))
        self.params  # the graph and threshold rules (a SecAggError is a ValueError)

    def context(self, federation: str, round_number: int) -> bytes:
        """What every key, share and mask of the round is bound to: no other federation, round or
        opening of this round can reuse them."""
        return b"|".join((b"fedprune-secagg-1", federation.encode(), str(round_number).encode(), self.session))

    @property
    def params(self) -> SecureParams:
        return SecureParams(degree=self.degree, threshold=self.threshold, bits=self.bits)
