"""The one error family every protocol decoder may raise.

Peer input never escapes as anything but a ``ProtocolError``: the daemons catch this root
at one place, count ``err.reason`` (a stable metric label) and carry on. Messages say what was
expected so an operator can act; ``OpenFailed`` alone says nothing, so that a forger learns
nothing from it about which check failed.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Abstract root: raise one of the subclasses, never this class itself."""

    reason: str = ""

    def __init__(self, message: str) -> None:
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract: raise one of its subclasses")
        super().__init__(message)


class DecodeError(ProtocolError):
    """Malformed bytes or a field of the wrong type, range or shape."""

    reason = "decode"


class TooLarge(DecodeError):
    """A payload, string, binary, collection or nesting over the configured ``Limits``."""

    reason = "too_large"


class UnsupportedVersion(DecodeError):
    """An envelope or chunk whose major schema version this build cannot read."""

    reason = "unsupported_version"


class UnknownMask(DecodeError):
    """Sparse values refer to a mask version this side does not hold."""

    reason = "unknown_mask"


class UnknownKey(DecodeError):
    """A broadcast encrypted under a federation key this device does not hold (yet, or any more)."""

    reason = "unknown_key"


class LayoutMismatch(DecodeError):
    """Tensors encoded for a model layout other than the one this side builds from the same model
    reference: different package versions, usually. ``detail`` says where the layouts part; a
    task's ``model``, ``round`` and ``selected`` let the device decline it with that detail."""

    reason = "layout_mismatch"

    def __init__(self, message: str, *, detail: str = "", model: object = None, round: int | None = None,
                 selected: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.detail = detail
        self.model = model
        self.round = round
        self.selected = selected


class BadSignature(ProtocolError):
    """A broadcast whose Ed25519 signature does not verify against the pinned coordinator key."""

    reason = "bad_signature"


class OpenFailed(ProtocolError):
    """A sealed message that does not open. Deliberately uninformative (no oracle)."""

    reason = "open_failed"

    def __init__(self, message: str = "sealed message could not be opened") -> None:
        super().__init__(message)


class UnknownSender(ProtocolError):
    """A sender that is not enrolled (or was revoked) in the caller's registry."""

    reason = "unknown_sender"


class Replayed(ProtocolError):
    """A message already accepted once (same sender, round and sequence number)."""

    reason = "replayed"


class Stale(ProtocolError):
    """A message from a round or time outside the acceptance window."""

    reason = "stale"


ALL_REASONS: tuple[str, ...] = tuple(
    cls.reason
    for cls in (
        DecodeError,
        TooLarge,
        UnsupportedVersion,
        UnknownMask,
        UnknownKey,
        BadSignature,
        OpenFailed,
        UnknownSender,
        Replayed,
        Stale,
    )
)
