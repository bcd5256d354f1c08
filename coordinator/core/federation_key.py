"""The federation key's members follow the allow-list: which devices may read the broadcasts.

Tasks and releases are encrypted under one federation key granted to every accepted device.
When the allow-list no longer matches the key's members (a device enrolled, revoked or
re-keyed) a fresh key is made and granted to exactly the accepted devices, so a revoked device
reads nothing broadcast after its revocation and a new one reads what is broadcast from then
on. Each coordinator process starts with a fresh key. This class decides and builds the grants;
the daemon publishes them.
"""

from __future__ import annotations

from fedprune.coordinator.core.registry import Registry
from fedprune.protocol.channel import CoordinatorChannel, Publication
from fedprune.protocol.crypto import PublicIdentity


class FederationKey:
    def __init__(self, channel: CoordinatorChannel, registry: Registry) -> None:
        self.channel = channel
        self.registry = registry

    def _members(self) -> dict[str, tuple[bytes, bytes]]:
        """The allow-list's accepted devices and their raw keys (cheap to compare, once a second)."""
        return {r.device_id: (r.sign_public, r.kx_public) for r in self.registry.devices() if not r.revoked}

    def rotation(self, now: float) -> list[Publication] | None:
        """The grants of a new key (and the clearing of revoked devices' old grants) when the
        members changed or no key exists yet; None when the current key still fits."""
        members = self._members()
        granted = {d: (p.signing, p.agreement) for d, p in self.channel.group_members.items()}
        if self.channel.group_key is not None and members == granted:
            return None
        revoked = [r.device_id for r in self.registry.devices() if r.revoked]
        return self.channel.rekey({d: PublicIdentity(*keys) for d, keys in members.items()}, now, dropped=revoked)

    def grant(self, device: str, now: float) -> Publication | None:
        """The current key's grant for ``device`` again; None when it is not a member yet (rotate first)."""
        if device not in self.channel.group_members:
            return None
        return self.channel.grant(device, now)
