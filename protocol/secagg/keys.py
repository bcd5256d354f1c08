"""The pairwise secrets of one round, from fresh X25519 keys that each device advertises.

Two agreements per pair of neighbours u, v, each under its own key pair so that revealing one
never exposes the other:

    share key (u -> v) = HKDF(X25519(u.share, v.share), salt = u.pub || v.pub,
                              info = SHARE_LABEL || context, u, v)
    mask seed {u, v}   = HKDF(X25519(u.mask, v.mask),   salt = lo.pub || hi.pub,
                              info = MASK_LABEL || context, lo, hi)     (lo < hi by id)

The share key encrypts exactly one message (u's shares for v, in this round), so the AEAD
nonce is fixed; the direction is in the key, and context, sender and receiver are also the
associated data. Binding the context (federation, round, session) means nothing derived in
one round or federation opens or cancels in another; the labels keep the two uses apart.

A device also commits to its self-mask seed b: SHA-256(SEED_LABEL, context, device, b). The seed
is 32 random bytes, so the commitment hides it; it lets the coordinator tell a genuine
reconstruction of b from one built with a forged share, as the mask public key does for a
reconstructed mask key.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedprune.protocol.secagg.errors import SecAggError

KEY_LEN = 32
TAG_LEN = 16
SHARE_LABEL = b"fedprune/v1 secagg share\x00"
MASK_LABEL = b"fedprune/v1 secagg mask\x00"
SEED_LABEL = b"fedprune/v1 secagg seed\x00"
_NONCE = bytes(12)


def bind(*parts: bytes) -> bytes:
    """Length-prefixed concatenation: distinct part lists never produce the same bytes."""
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


@dataclass(frozen=True)
class AdvertisedKeys:
    """A device's two public keys for one round (one to receive shares, one for pairwise masks)
    and, towards the coordinator only, the commitment to its self-mask seed (None in the copy
    relayed to neighbours, who have no use for it)."""

    share_public: bytes
    mask_public: bytes
    seed_commitment: bytes | None = None

    def __post_init__(self) -> None:
        for name in ("share_public", "mask_public"):
            value = getattr(self, name)
            if type(value) is not bytes or len(value) != KEY_LEN:
                raise SecAggError("bad_key", f"{name} must be {KEY_LEN} raw bytes")
        if self.seed_commitment is not None and (type(self.seed_commitment) is not bytes
                                                 or len(self.seed_commitment) != KEY_LEN):
            raise SecAggError("bad_key", f"seed_commitment must be {KEY_LEN} bytes")


def commit_seed(seed: bytes, context: bytes, device: str) -> bytes:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(bind(SEED_LABEL, context, device.encode(), seed))
    return digest.finalize()


def public_of(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes_raw()


def private_bytes(private: X25519PrivateKey) -> bytes:
    return private.private_bytes_raw()


def load_private(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def _derive(private: X25519PrivateKey, peer_public: bytes, salt: bytes, info: bytes) -> bytes:
    try:
        secret = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:  # a low-order point: the agreement would be all zeros
        raise SecAggError("bad_key", "peer public key gives no shared secret") from None
    return HKDF(algorithm=hashes.SHA256(), length=KEY_LEN, salt=salt, info=info).derive(secret)


def _share_cipher(private: X25519PrivateKey, peer_public: bytes, context: bytes, sender: str, receiver: str,
                  sender_public: bytes, receiver_public: bytes) -> tuple[ChaCha20Poly1305, bytes]:
    ad = bind(context, sender.encode(), receiver.encode())
    key = _derive(private, peer_public, sender_public + receiver_public, SHARE_LABEL + ad)
    return ChaCha20Poly1305(key), ad


def seal_shares(private: X25519PrivateKey, peer_public: bytes, context: bytes, sender: str, receiver: str,
                plaintext: bytes) -> bytes:
    """Encrypt ``sender``'s shares for ``receiver`` (called by the sender with its share key)."""
    cipher, ad = _share_cipher(private, peer_public, context, sender, receiver, public_of(private), peer_public)
    return cipher.encrypt(_NONCE, plaintext, ad)


def open_shares(private: X25519PrivateKey, peer_public: bytes, context: bytes, sender: str, receiver: str,
                ciphertext: bytes) -> bytes:
    """Decrypt shares ``sender`` addressed to ``receiver``; SecAggError bad_share_ciphertext naming the
    sender if they were tampered with, addressed to someone else, or sealed for another context."""
    cipher, ad = _share_cipher(private, peer_public, context, sender, receiver, peer_public, public_of(private))
    try:
        return cipher.decrypt(_NONCE, ciphertext, ad)
    except InvalidTag:
        raise SecAggError("bad_share_ciphertext", f"shares from {sender} do not open for {receiver}") from None


def mask_seed(private: X25519PrivateKey, peer_public: bytes, context: bytes, own: str, peer: str) -> bytes:
    """The PRG seed that ``own`` and ``peer`` share; either end (or whoever holds one end's private
    key) derives the same 32 bytes."""
    own_public = public_of(private)
    (lo, lo_pub), (hi, hi_pub) = sorted([(own, own_public), (peer, peer_public)])
    return _derive(private, peer_public, lo_pub + hi_pub, MASK_LABEL + bind(context, lo.encode(), hi.encode()))
