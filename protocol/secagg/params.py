"""The three numbers both sides of a round agree on: graph degree, share threshold, modulus bits."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedprune.protocol.secagg.errors import SecAggError


@dataclass(frozen=True)
class SecureParams:
    """``degree`` k neighbours per device (even; a round of n devices, n - 1 <= k, uses the complete graph),
    ``threshold`` t of a device's neighbours reconstruct its secrets, values live mod ``2**bits``.

    k/2 < t <= k: a device's neighbours each reveal one kind of share of it, so with 2t > k no
    coordinator can gather t of both kinds (its self-mask and its mask key) for one device.
    """

    degree: int
    threshold: int
    bits: int

    def __post_init__(self) -> None:
        for name in ("degree", "threshold", "bits"):
            if type(getattr(self, name)) is not int:
                raise SecAggError("bad_params", f"{name} must be an int")
        if self.degree < 2 or self.degree % 2:
            raise SecAggError("bad_params", f"degree={self.degree}: expected an even number >= 2")
        if not self.degree // 2 < self.threshold <= self.degree:
            raise SecAggError("bad_params", f"threshold={self.threshold}: expected {self.degree // 2 + 1}..{self.degree} "
                                            f"for degree {self.degree} (more than half the neighbours)")
        if not 8 <= self.bits <= 32:
            raise SecAggError("bad_params", f"bits={self.bits}: expected 8..32")

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    def degree_for(self, n: int) -> int:
        """The degree a round of ``n`` devices actually has: k, or n-1 when there are too few."""
        return min(self.degree, n - 1)

    @classmethod
    def for_devices(cls, n: int, bits: int = 16, degree: int | None = None) -> "SecureParams":
        """k = 2*ceil(log2 n) (Bell et al.'s O(log n); 12 for 50 devices) unless given, at most n-1
        rounded up to even; t = k//2 + 1, the smallest safe threshold, which tolerates k/2 - 1
        neighbours dropping out."""
        if n < 3:
            raise SecAggError("too_few_devices", f"{n} devices: secure aggregation needs at least 3")
        k = min(2 * math.ceil(math.log2(n)) if degree is None else degree, n - 1 + (n - 1) % 2)
        return cls(degree=k, threshold=k // 2 + 1, bits=bits)
