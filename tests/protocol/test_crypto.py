import pytest

from fedprune.protocol.crypto import Aead, Identity, PublicIdentity, key_mode_too_permissive, open_sealed, seal, verify
from fedprune.protocol.envelope import Header, Suite, open_envelope, parse_header, seal_envelope, sign_envelope, verify_envelope
from fedprune.protocol.errors import BadSignature, DecodeError, OpenFailed, ProtocolError
from fedprune.protocol.messages import Kind
from tests.protocol.factories import COORD, DEVICES, FED, T0

A, B = DEVICES["dev-a"], DEVICES["dev-b"]


def sealed_update(body=b"values", sender=A, device="dev-a", aead=Suite.SEALED_AES256_GCM):
    h = Header(Kind.UPDATE, aead, FED, device, 5, 42, T0)
    return seal_envelope(h, body, sender, COORD.public)


def open_as(data, sender_public):
    h, n = parse_header(data)
    return open_envelope(data, h, n, COORD, sender_public)


@pytest.mark.parametrize("suite", [Suite.SEALED_AES256_GCM, Suite.SEALED_CHACHA20_POLY1305])
def test_sealed_update_opens_only_for_the_coordinator_under_its_sender(suite):
    data = sealed_update(aead=suite)
    assert open_as(data, A.public) == b"values"
    with pytest.raises(OpenFailed):
        open_as(data, B.public)  # sealed by A, claimed as B
    h, n = parse_header(data)
    with pytest.raises(OpenFailed):
        open_envelope(data, h, n, B, A.public)  # another device cannot read it


def test_device_b_cannot_seal_an_update_that_opens_as_device_a():
    forged = sealed_update(sender=B, device="dev-a")
    with pytest.raises(OpenFailed):
        open_as(forged, A.public)


def test_flipping_any_byte_of_a_sealed_update_is_detected():
    data = sealed_update(b"small body")
    for i in range(len(data)):
        for bit in (0x01, 0x80):
            tampered = bytearray(data)
            tampered[i] ^= bit
            with pytest.raises(ProtocolError):
                open_as(bytes(tampered), A.public)


def test_flipping_any_byte_of_a_signed_broadcast_is_detected():
    h = Header(Kind.TASK, Suite.SIGNED_ED25519, FED, "", 5, 42, T0)
    data = sign_envelope(h, b"task body", COORD)
    _, n = parse_header(data)
    assert verify_envelope(data, n, COORD.public) == b"task body"
    for i in range(len(data)):
        tampered = bytearray(data)
        tampered[i] ^= 0x01
        with pytest.raises((BadSignature, DecodeError)):
            _, n = parse_header(bytes(tampered))
            verify_envelope(bytes(tampered), n, COORD.public)


def test_broadcast_signed_by_anyone_but_the_pinned_coordinator_fails():
    h = Header(Kind.TASK, Suite.SIGNED_ED25519, FED, "", 5, 42, T0)
    data = sign_envelope(h, b"task body", A)
    with pytest.raises(BadSignature, match="pinned coordinator key"):
        verify_envelope(data, parse_header(data)[1], COORD.public)


@pytest.mark.parametrize("field, value", [("round", 6), ("sender", "dev-b"), ("kind", Kind.STATUS), ("federation", "fed-2")])
def test_resealed_header_retargeting_fails(field, value):
    data = sealed_update()
    h, n = parse_header(data)
    moved = Header(**{**h.__dict__, field: value})
    retargeted = moved.pack() + data[n:]
    with pytest.raises(OpenFailed):
        open_as(retargeted, A.public)


def test_seal_context_is_bound_into_the_key():
    sealed = seal(A, COORD.public, b"x", context=b"round 5", aad=b"h")
    with pytest.raises(OpenFailed):
        open_sealed(COORD, A.public, sealed, context=b"round 6", aad=b"h")
    with pytest.raises(OpenFailed):
        open_sealed(COORD, A.public, sealed[:10], context=b"round 5", aad=b"h")
    assert open_sealed(COORD, A.public, sealed, context=b"round 5", aad=b"h") == b"x"


def test_open_failed_says_nothing_about_the_cause():
    sealed = seal(A, COORD.public, b"x", context=b"c", aad=b"h", aead=Aead.CHACHA20_POLY1305)
    messages = set()
    for args in [dict(context=b"z", aad=b"h"), dict(context=b"c", aad=b"z"), dict(context=b"c", aad=b"h", aead=Aead.AES256_GCM)]:
        with pytest.raises(OpenFailed) as err:
            open_sealed(COORD, A.public, sealed, **args)
        messages.add(str(err.value))
    assert messages == {"sealed message could not be opened"}


def test_keys_serialise_raw_and_pem_and_never_print():
    raw = A.to_raw()
    assert Identity.from_raw(*raw).public == A.public
    assert Identity.from_pem(A.to_pem(b"pw"), b"pw").public == A.public
    assert PublicIdentity.from_pem(A.public.to_pem()) == A.public
    assert PublicIdentity.from_bytes(A.public.to_bytes()) == A.public
    assert raw[0].hex() not in repr(A) and A.public.fingerprint() in repr(A)
    with pytest.raises(ValueError):
        PublicIdentity(b"\0" * 31, b"\0" * 32)
    with pytest.raises(ValueError):
        Identity.from_pem(A.public.to_pem())


def test_signature_helper_rejects_garbage_signatures():
    sig = COORD.sign(b"m")
    verify(COORD.public, b"m", sig)
    for bad in (b"", sig[:-1], b"\0" * 64):
        with pytest.raises(BadSignature):
            verify(COORD.public, b"m", bad)


@pytest.mark.parametrize("mode, loose", [(0o600, False), (0o400, False), (0o640, True), (0o604, True), (0o100600, False), (0o666, True)])
def test_private_key_file_mode_check(mode, loose):
    assert key_mode_too_permissive(mode) is loose
