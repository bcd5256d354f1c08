"""The one error every secure-aggregation check raises.

``reason`` is a stable label (a metric key and what tests match on); the message names the
device or share at fault so that an operator can tell a dropout from a misbehaving peer.
"""

from __future__ import annotations


class SecAggError(ValueError):
    """A round that cannot go on as asked. Labels: too_few_devices, too_few_shares, wrong_stage,
    unknown_device, duplicate, not_a_neighbour, missing_shares, bad_key, bad_share,
    bad_share_ciphertext, reveal_conflict, wrong_length, bad_vector, out_of_range, bad_params."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
