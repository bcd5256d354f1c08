"""Keys, sealing and signing, built only from ``cryptography`` primitives.

Seal (device -> coordinator). The device D holds static X25519 key d, the coordinator C holds
static key c; every message uses a fresh ephemeral key e:

    okm   = HKDF-SHA256(ikm = X25519(e, C) || X25519(d, C),
                        salt = E_pub || D_pub || C_pub, info = label || context, length = 44)
    key, nonce = okm[:32], okm[32:]
    wire  = E_pub || AEAD(key).encrypt(nonce, plaintext, aad)

The static-static term makes a sealed message open only under the sender's own public key,
so the coordinator knows who sealed it without an extra Ed25519 signature over megabytes; the
ephemeral term keeps past updates secret from anyone who later steals a device key. A fresh
ephemeral key per message gives a fresh AEAD key, so a derived nonce is never reused. The
caller binds the envelope header into both ``context`` (HKDF info) and ``aad``.

Sign (coordinator -> all): Ed25519 over ``label || message``; receivers verify against the
coordinator key pinned at enrollment. Failures raise ``BadSignature`` / ``OpenFailed``, the
latter saying nothing about which step failed.

Group (coordinator -> members): tasks and releases are encrypted under the federation's
``GroupKey`` K, a random 256-bit key with a random 8-byte id, which reaches each member sealed
to it (the seal above, coordinator -> device). Every message derives its own AEAD key:

    key, nonce = HKDF-SHA256(ikm = K, salt = key id, info = label || context, length = 44)

The context is the envelope header, whose seq never repeats within one coordinator process, and
a coordinator makes a fresh K at every start, so a (key, nonce) pair is never reused.
"""

from __future__ import annotations

import enum
import hashlib
import os
import re
from collections import OrderedDict
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedprune.protocol.errors import BadSignature, OpenFailed

KEY_LEN = 32
SIGNATURE_LEN = 64
TAG_LEN = 16
SEAL_OVERHEAD = KEY_LEN + TAG_LEN
SEAL_LABEL = b"fedprune/v1 seal\x00"
SIGN_LABEL = b"fedprune/v1 sign\x00"
GROUP_LABEL = b"fedprune/v1 group\x00"
KEY_ID_LEN = 8
_RAW = serialization.Encoding.Raw
_PEM = serialization.Encoding.PEM


class Aead(enum.IntEnum):
    """AEAD of a sealed message; AES-256-GCM by default, ChaCha20-Poly1305 for CPUs without AES-NI."""

    AES256_GCM = 2
    CHACHA20_POLY1305 = 3

    def cipher(self, key: bytes) -> AESGCM | ChaCha20Poly1305:
        return AESGCM(key) if self is Aead.AES256_GCM else ChaCha20Poly1305(key)


@dataclass(frozen=True)
class PublicIdentity:
    """A party's two public keys as raw bytes: Ed25519 (verify) and X25519 (agree)."""

    signing: bytes
    agreement: bytes

    def __post_init__(self) -> None:
        for name in ("signing", "agreement"):
            value = getattr(self, name)
            if type(value) is not bytes or len(value) != KEY_LEN:
                raise ValueError(f"{name} public key must be {KEY_LEN} raw bytes")
        try:
            Ed25519PublicKey.from_public_bytes(self.signing)
            X25519PublicKey.from_public_bytes(self.agreement)
        except ValueError as exc:
            raise ValueError(f"invalid public key: {exc}") from None

    def to_bytes(self) -> bytes:
        return self.signing + self.agreement

    @classmethod
    def from_bytes(cls, data: bytes) -> "PublicIdentity":
        if type(data) is not bytes or len(data) != 2 * KEY_LEN:
            raise ValueError(f"a public identity is {2 * KEY_LEN} bytes (Ed25519 || X25519)")
        return cls(data[:KEY_LEN], data[KEY_LEN:])

    def to_pem(self) -> bytes:
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        return Ed25519PublicKey.from_public_bytes(self.signing).public_bytes(_PEM, spki) + X25519PublicKey.from_public_bytes(
            self.agreement
        ).public_bytes(_PEM, spki)

    @classmethod
    def from_pem(cls, data: bytes) -> "PublicIdentity":
        sign_key, agree_key = (serialization.load_pem_public_key(block) for block in _pem_blocks(data))
        if not isinstance(sign_key, Ed25519PublicKey) or not isinstance(agree_key, X25519PublicKey):
            raise ValueError("expected an Ed25519 public key followed by an X25519 public key")
        raw = serialization.PublicFormat.Raw
        return cls(sign_key.public_bytes(_RAW, raw), agree_key.public_bytes(_RAW, raw))

    def fingerprint(self) -> str:
        """Short hex digest for logs and enrollment prompts (never the key itself)."""
        return hashlib.sha256(self.to_bytes()).hexdigest()[:16]


class Identity:
    """A party's private keys: Ed25519 for signing, X25519 for key agreement."""

    def __init__(self, signing: Ed25519PrivateKey, agreement: X25519PrivateKey) -> None:
        if not isinstance(signing, Ed25519PrivateKey) or not isinstance(agreement, X25519PrivateKey):
            raise TypeError("Identity needs an Ed25519PrivateKey and an X25519PrivateKey")
        self._signing = signing
        self._agreement = agreement
        raw = serialization.PublicFormat.Raw
        self.public = PublicIdentity(
            signing.public_key().public_bytes(_RAW, raw), agreement.public_key().public_bytes(_RAW, raw)
        )
        self._static_secrets: OrderedDict[bytes, bytes] = OrderedDict()

    def __repr__(self) -> str:
        return f"Identity(public={self.public.fingerprint()})"

    @classmethod
    def generate(cls) -> "Identity":
        return cls(Ed25519PrivateKey.generate(), X25519PrivateKey.generate())

    @classmethod
    def from_raw(cls, signing: bytes, agreement: bytes) -> "Identity":
        if type(signing) is not bytes or type(agreement) is not bytes or len(signing) != KEY_LEN or len(agreement) != KEY_LEN:
            raise ValueError(f"private keys must be {KEY_LEN} raw bytes each")
        return cls(Ed25519PrivateKey.from_private_bytes(signing), X25519PrivateKey.from_private_bytes(agreement))

    def to_raw(self) -> tuple[bytes, bytes]:
        raw, none = serialization.PrivateFormat.Raw, serialization.NoEncryption()
        return self._signing.private_bytes(_RAW, raw, none), self._agreement.private_bytes(_RAW, raw, none)

    def to_pem(self, password: bytes | None = None) -> bytes:
        """Both keys as PKCS#8 PEM blocks (Ed25519 first), encrypted when ``password`` is given."""
        enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
        fmt = serialization.PrivateFormat.PKCS8
        return self._signing.private_bytes(_PEM, fmt, enc) + self._agreement.private_bytes(_PEM, fmt, enc)

    @classmethod
    def from_pem(cls, data: bytes, password: bytes | None = None) -> "Identity":
        sign_key, agree_key = (serialization.load_pem_private_key(b, password=password) for b in _pem_blocks(data))
        if not isinstance(sign_key, Ed25519PrivateKey) or not isinstance(agree_key, X25519PrivateKey):
            raise ValueError("expected an Ed25519 private key followed by an X25519 private key")
        return cls(sign_key, agree_key)

    def sign(self, message: bytes) -> bytes:
        return self._signing.sign(SIGN_LABEL + message)

    def _exchange(self, peer: bytes) -> bytes:
        return self._agreement.exchange(X25519PublicKey.from_public_bytes(peer))

    def _static_secret(self, peer: bytes) -> bytes:
        """X25519 with a peer's static key, cached: it never changes for a pair of parties."""
        secret = self._static_secrets.get(peer)
        if secret is None:
            secret = self._exchange(peer)
            self._static_secrets[peer] = secret
            if len(self._static_secrets) > 65536:
                self._static_secrets.popitem(last=False)
        return secret


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----", re.S)


def _pem_blocks(data: bytes) -> list[bytes]:
    if not isinstance(data, bytes):
        raise TypeError("PEM data must be bytes")
    blocks = [m.group(0) for m in _PEM_BLOCK.finditer(data)]
    if len(blocks) != 2:
        raise ValueError("expected exactly two PEM blocks (signing key, then agreement key)")
    return blocks


def verify(signer: PublicIdentity, message: bytes, signature: bytes) -> None:
    """BadSignature unless ``signature`` is ``signer``'s Ed25519 signature of ``message``."""
    try:
        Ed25519PublicKey.from_public_bytes(signer.signing).verify(signature, SIGN_LABEL + message)
    except (InvalidSignature, ValueError, TypeError):
        raise BadSignature(
            "signature does not verify against the pinned coordinator key "
            f"{signer.fingerprint()}: tampered message or wrong enrollment bundle"
        ) from None


def _derive(ikm: bytes, salt: bytes, context: bytes, label: bytes = SEAL_LABEL) -> tuple[bytes, bytes]:
    okm = HKDF(algorithm=hashes.SHA256(), length=44, salt=salt, info=label + context).derive(ikm)
    return okm[:32], okm[32:]


def seal(
    sender: Identity,
    recipient: PublicIdentity,
    plaintext: bytes,
    *,
    context: bytes,
    aad: bytes,
    aead: Aead = Aead.AES256_GCM,
    ephemeral: X25519PrivateKey | None = None,
) -> bytes:
    """Encrypt ``plaintext`` so only ``recipient`` opens it and knows ``sender`` sealed it.

    ``ephemeral`` exists only for deterministic test vectors; leave it None.
    """
    eph = ephemeral or X25519PrivateKey.generate()
    eph_pub = eph.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)
    ikm = eph.exchange(X25519PublicKey.from_public_bytes(recipient.agreement)) + sender._static_secret(recipient.agreement)
    key, nonce = _derive(ikm, eph_pub + sender.public.agreement + recipient.agreement, context)
    return eph_pub + Aead(aead).cipher(key).encrypt(nonce, plaintext, aad)


def open_sealed(
    recipient: Identity,
    sender: PublicIdentity,
    sealed: bytes | memoryview,
    *,
    context: bytes,
    aad: bytes,
    aead: Aead = Aead.AES256_GCM,
) -> bytes:
    """Inverse of ``seal``; OpenFailed (uninformative) for any tampering or wrong party."""
    if len(sealed) < SEAL_OVERHEAD:
        raise OpenFailed()
    eph_pub = bytes(sealed[:KEY_LEN])
    try:
        ikm = recipient._exchange(eph_pub) + recipient._static_secret(sender.agreement)
        key, nonce = _derive(ikm, eph_pub + sender.agreement + recipient.public.agreement, context)
        return Aead(aead).cipher(key).decrypt(nonce, sealed[KEY_LEN:], aad)
    except (InvalidTag, ValueError, TypeError):
        raise OpenFailed() from None


@dataclass(frozen=True, repr=False)
class GroupKey:
    """The federation key that tasks and releases are encrypted under; ``key_id`` names it on the wire."""

    key_id: bytes
    secret: bytes

    def __post_init__(self) -> None:
        if type(self.key_id) is not bytes or len(self.key_id) != KEY_ID_LEN:
            raise ValueError(f"a group key id is {KEY_ID_LEN} bytes")
        if type(self.secret) is not bytes or len(self.secret) != KEY_LEN:
            raise ValueError(f"a group key is {KEY_LEN} bytes")

    def __repr__(self) -> str:  # never the secret
        return f"GroupKey({self.key_id.hex()})"

    @classmethod
    def generate(cls) -> "GroupKey":
        return cls(os.urandom(KEY_ID_LEN), os.urandom(KEY_LEN))


class KeyRing:
    """The newest few group keys a member holds, by id: a broadcast in flight during a rotation still opens."""

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[bytes, GroupKey] = OrderedDict()

    def put(self, key: GroupKey) -> None:
        self._keys[key.key_id] = key
        self._keys.move_to_end(key.key_id)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)

    def get(self, key_id: bytes) -> GroupKey | None:
        return self._keys.get(key_id)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys


def group_encrypt(key: GroupKey, plaintext: bytes, *, context: bytes, aad: bytes) -> bytes:
    """AES-256-GCM under a key derived from ``key`` and ``context`` (unique per message)."""
    sub, nonce = _derive(key.secret, key.key_id, context, GROUP_LABEL)
    return AESGCM(sub).encrypt(nonce, plaintext, aad)


def group_decrypt(key: GroupKey, ciphertext: bytes | memoryview, *, context: bytes, aad: bytes) -> bytes:
    """Inverse of ``group_encrypt``; OpenFailed (uninformative) for any tampering or wrong key."""
    sub, nonce = _derive(key.secret, key.key_id, context, GROUP_LABEL)
    try:
        return AESGCM(sub).decrypt(nonce, ciphertext, aad)
    except (InvalidTag, ValueError, TypeError):
        raise OpenFailed() from None


def key_mode_too_permissive(mode: int) -> bool:
    """True if a private-key file with ``st_mode`` bits ``mode`` is readable or writable by group/others."""
    return bool(mode & 0o077)
