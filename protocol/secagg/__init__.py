"""Secure aggregation for one round: SecAgg+ (Bell et al., CCS 2020), as pure state machines.

Theory of operation. Each device holds a vector mod 2**bits; the coordinator must learn only
the sum over the devices that finish the round, though any of them may drop out at any stage.
A device's masked vector is

    y_u = x_u + PRG(b_u) + sum over neighbours v that shared:  +PRG(s_uv) if u < v else -PRG(s_uv)

where b_u is a fresh self-mask seed and s_uv a seed agreed by X25519 between u and v. Summed
over the survivors, the pairwise masks cancel pair by pair. What is left the coordinator removes
with help from the devices: for a survivor it learns b_u; for a device that dropped after
sharing it learns the mask private key, and with it every s_uv that a survivor added. Both
secrets are Shamir-shared t-of-k among the device's k neighbours, and an honest neighbour
reveals one kind or the other for a device, never both; with t > k/2 no coordinator gets both.

The neighbours come from a sparse graph (``graph``, a Harary graph over a seeded ring) of
degree k = O(log n), so each device does O(k) agreements and PRG expansions, not O(n).

    stage        device                               coordinator
    1 advertise  advertise() -> AdvertisedKeys        on_advertise..., close_advertise() -> U1
    2 share      share(keys_for(u)) -> ciphertexts    on_shares..., close_shares() -> U2
    3 mask       mask(x, inbox_for(u)) -> y_u         on_masked..., close_masked() -> (U3, U2-U3)
    4 reveal     reveal(U3, U2-U3) -> shares          on_reveal..., result() -> (sum, U3)

Threat model: an honest-but-curious coordinator that sees every message (shares travel
encrypted device to device through it), plus up to t-1 colluding neighbours of any device.
t colluding neighbours of a device learn its input: the threshold is real. A coordinator that
tells different devices different survivor lists is outside this model: Bell et al. add a
signed consistency round for it, which this package does not; the device's reveal_conflict
check and t > k/2 are the local half of that defence. No I/O: the caller moves the bytes.
"""

from fedprune.protocol.secagg.aggregator import AggregatorSession
from fedprune.protocol.secagg.device import CIPHERTEXT_LEN, DeviceSession, HeldShares
from fedprune.protocol.secagg.errors import SecAggError
from fedprune.protocol.secagg.field import from_field, pairwise_mask, prg, to_field
from fedprune.protocol.secagg.graph import neighbour_graph, ring_order
from fedprune.protocol.secagg.keys import AdvertisedKeys, mask_seed
from fedprune.protocol.secagg.params import SecureParams
from fedprune.protocol.secagg.shamir import Share, combine, decode_share, encode_share, reconstruct, split

__all__ = [
    "CIPHERTEXT_LEN", "AdvertisedKeys", "AggregatorSession", "DeviceSession", "HeldShares", "SecAggError",
    "SecureParams", "Share", "combine", "decode_share", "encode_share", "from_field", "mask_seed", "neighbour_graph",
    "pairwise_mask", "prg", "reconstruct", "ring_order", "split", "to_field",
]
