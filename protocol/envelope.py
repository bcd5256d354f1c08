"""The envelope: a fixed binary header, then a signed or sealed msgpack body.

    offset size  field
    0      2     magic  b"FP"
    2      1     schema major (1)  -- an unknown major is refused with UnsupportedVersion
    3      1     schema minor (4)  -- a newer minor may add or drop optional body fields (codec.py)
    4      1     kind   (messages.Kind)
    5      1     suite  (1 Ed25519-signed, 2 sealed AES-256-GCM, 3 sealed ChaCha20-Poly1305,
                         4 Ed25519-signed AES-256-GCM under the federation key)
    6      1     flags  (bit 0: last will)
    7      1     zero
    8      4     round  u32
    12     8     seq    u64, unique per sender (transfer id of its chunks too)
    20     8     sent_at f64 unix seconds
    28     1+n   federation (u8 length + ASCII id)
    29+n   1+m   sender (u8 length + ASCII id; empty = the coordinator)

Signed:  header || body || Ed25519(label || header || body)
Sealed:  header || E_pub || AEAD(body), header bound as HKDF context and as AAD.
Group:   header || key id || AEAD_K(body) || Ed25519(label || header || key id || ciphertext),
         header as HKDF context, header || key id as AAD: only members holding key K read it.
All integers big-endian. The header is parsed before authentication only to find the key.
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

from fedprune.protocol import crypto
from fedprune.protocol.crypto import KEY_ID_LEN, TAG_LEN, Aead, GroupKey, Identity, PublicIdentity
from fedprune.protocol.errors import BadSignature, DecodeError, UnknownKey, UnsupportedVersion
from fedprune.protocol.messages import Kind
from fedprune.protocol.topics import is_valid_id

MAGIC = b"FP"
MAJOR = 1
# 1: RoundTask hyper-parameters gained max_sparse_lr_factor; 2: suite 4 and KeyGrant;
# 3: RoundTask lost class_loss_medians (meta key clm); 4: Status gained release and epsilon_left
# (meta keys rel, eps); 5: RoundTask gained update_values, error_feedback and base_round (meta keys uv, ef,
# base); 6: RoundTask's model gained factory arguments, task kind, package and tensor digests (meta keys
# margs, kind, pkg, tdig), the regression bin edges (tbin) and its hyper-parameters the optimizer;
# 7: the secure-aggregation kinds 8-14 (protocol/secure_messages.py) and RoundTask.secure (sec)
MINOR = 7
_FIXED = struct.Struct(">2sBBBBBxIQd")
FLAG_LAST_WILL = 0x01
_KNOWN_FLAGS = FLAG_LAST_WILL
COORDINATOR = ""


class Suite(enum.IntEnum):
    SIGNED_ED25519 = 1
    SEALED_AES256_GCM = Aead.AES256_GCM.value
    SEALED_CHACHA20_POLY1305 = Aead.CHACHA20_POLY1305.value
    GROUP_AES256_GCM = 4

    @property
    def sealed(self) -> bool:
        """Sealed device -> coordinator (the uplink suites)."""
        return self in (Suite.SEALED_AES256_GCM, Suite.SEALED_CHACHA20_POLY1305)


@dataclass(frozen=True)
class Header:
    kind: Kind
    suite: Suite
    federation: str
    sender: str
    round: int
    seq: int
    sent_at: float
    flags: int = 0
    minor: int = MINOR

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Kind(self.kind))
        object.__setattr__(self, "suite", Suite(self.suite))
        if not is_valid_id(self.federation):
            raise ValueError(f"federation {self.federation!r} is not a valid id")
        if self.sender != COORDINATOR and not is_valid_id(self.sender):
            raise ValueError(f"sender {self.sender!r} is not a valid id")
        if type(self.round) is not int or not 0 <= self.round < 2**32:
            raise ValueError(f"round={self.round!r}: expected a u32")
        if type(self.seq) is not int or not 0 <= self.seq < 2**64:
            raise ValueError(f"seq={self.seq!r}: expected a u64")
        if type(self.sent_at) is not float or not math.isfinite(self.sent_at):
            raise ValueError(f"sent_at={self.sent_at!r}: expected a finite float")
        if type(self.flags) is not int or self.flags & ~_KNOWN_FLAGS & 0xFF or not 0 <= self.flags < 256:
            raise ValueError(f"flags={self.flags!r}: unknown flag bits")
        if type(self.minor) is not int or not 0 <= self.minor < 256:
            raise ValueError(f"minor={self.minor!r}: expected a u8")

    @property
    def last_will(self) -> bool:
        return bool(self.flags & FLAG_LAST_WILL)

    def pack(self) -> bytes:
        fed, snd = self.federation.encode(), self.sender.encode()
        fixed = _FIXED.pack(MAGIC, MAJOR, self.minor, self.kind, self.suite, self.flags, self.round, self.seq, self.sent_at)
        return fixed + bytes([len(fed)]) + fed + bytes([len(snd)]) + snd


def parse_header(data: bytes | memoryview) -> tuple[Header, int]:
    """Header and its length in ``data``. Unauthenticated: used to pick the key, then bound."""
    if len(data) < _FIXED.size + 2:
        raise DecodeError(f"envelope of {len(data)} bytes is shorter than a header")
    magic, major, minor, kind, suite, flags, rnd, seq, sent_at = _FIXED.unpack_from(data)
    if magic != MAGIC:
        raise DecodeError("not a fedprune envelope (bad magic)")
    if major != MAJOR:
        raise UnsupportedVersion(
            f"envelope schema version {major}.{minor}; this build reads {MAJOR}.x: upgrade the older side"
        )
    pos = _FIXED.size
    ids = []
    for _ in range(2):
        if pos >= len(data):
            raise DecodeError("envelope header truncated")
        n = data[pos]
        raw = bytes(data[pos + 1 : pos + 1 + n])
        if len(raw) != n:
            raise DecodeError("envelope header truncated")
        try:
            ids.append(raw.decode("ascii"))
        except UnicodeDecodeError:
            raise DecodeError("envelope ids must be ASCII") from None
        pos += 1 + n
    try:
        return Header(Kind(kind), Suite(suite), ids[0], ids[1], rnd, seq, sent_at, flags, minor), pos
    except ValueError as exc:
        if minor > MINOR:  # a newer minor may add kinds and suites
            raise UnsupportedVersion(f"envelope {major}.{minor} ({exc}); this build reads {MAJOR}.{MINOR}: "
                                     "upgrade the older side") from None
        raise DecodeError(f"envelope header: {exc}") from None


def _signed_part(data: bytes | memoryview) -> tuple[memoryview, bytes]:
    if len(data) < crypto.SIGNATURE_LEN:
        raise BadSignature("signed envelope too short to hold a signature")
    view = memoryview(data)
    return view[: -crypto.SIGNATURE_LEN], bytes(view[-crypto.SIGNATURE_LEN :])


def sign_envelope(header: Header, body: bytes, signer: Identity) -> bytes:
    if header.suite is not Suite.SIGNED_ED25519:
        raise ValueError("sign_envelope needs a header with suite SIGNED_ED25519")
    head = header.pack()
    signed = head + body
    return signed + signer.sign(signed)


def verify_envelope(data: bytes, header_len: int, signer: PublicIdentity) -> memoryview:
    """The body of a signed envelope once its signature verifies; BadSignature otherwise."""
    signed, signature = _signed_part(data)
    if len(signed) < header_len:
        raise BadSignature("signed envelope too short")
    crypto.verify(signer, bytes(signed), signature)
    return signed[header_len:]


def seal_envelope(header: Header, body: bytes, sender: Identity, recipient: PublicIdentity) -> bytes:
    if not header.suite.sealed:
        raise ValueError("seal_envelope needs a header with a sealed suite")
    head = header.pack()
    return head + crypto.seal(sender, recipient, body, context=head, aad=head, aead=Aead(header.suite.value))


def open_envelope(data: bytes, header: Header, header_len: int, recipient: Identity, sender: PublicIdentity) -> bytes:
    """The body of a sealed envelope; OpenFailed for tampering, wrong sender or wrong recipient."""
    head = bytes(data[:header_len])
    return crypto.open_sealed(
        recipient, sender, memoryview(data)[header_len:], context=head, aad=head, aead=Aead(header.suite.value)
    )


def encrypt_broadcast(header: Header, body: bytes, key: GroupKey, signer: Identity) -> bytes:
    """A broadcast only members read: encrypted under ``key``, then signed, key id included."""
    if header.suite is not Suite.GROUP_AES256_GCM:
        raise ValueError("encrypt_broadcast needs a header with suite GROUP_AES256_GCM")
    head = header.pack()
    bound = head + key.key_id
    signed = bound + crypto.group_encrypt(key, body, context=head, aad=bound)
    return signed + signer.sign(signed)


def decrypt_broadcast(
    data: bytes, header_len: int, signer: PublicIdentity, key_for: Callable[[bytes], GroupKey | None]
) -> bytes:
    """Verify the signature first (BadSignature), then find the key (UnknownKey), then decrypt (OpenFailed)."""
    signed = verify_envelope(data, header_len, signer)
    if len(signed) < KEY_ID_LEN + TAG_LEN:
        raise DecodeError("encrypted broadcast too short to hold a key id and a tag")
    key_id = bytes(signed[:KEY_ID_LEN])
    key = key_for(key_id)
    if key is None:
        raise UnknownKey(f"broadcast under federation key {key_id.hex()}, which this device does not hold: "
                         "waiting for its key grant")
    head = bytes(data[:header_len])
    return crypto.group_decrypt(key, signed[KEY_ID_LEN:], context=head, aad=head + key_id)


def wrap_group_key(head: bytes, key: GroupKey, sender: Identity, recipient: PublicIdentity) -> bytes:
    """``key`` sealed to one member (the uplink seal, coordinator -> device), bound to the grant's header."""
    return crypto.seal(sender, recipient, key.secret, context=head, aad=head + key.key_id)


def unwrap_group_key(head: bytes, key_id: bytes, wrapped: bytes, recipient: Identity, sender: PublicIdentity) -> GroupKey:
    """Inverse of ``wrap_group_key``; OpenFailed for another member's grant or any tampering."""
    return GroupKey(key_id, crypto.open_sealed(recipient, sender, wrapped, context=head, aad=head + key_id))
