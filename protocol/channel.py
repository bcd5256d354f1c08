"""The one object each program talks to: typed messages in, (topic, bytes) out, and back.

Sending: encode the body -> frame it (encrypt a task or release under the federation key and
sign it | sign a reject or key grant | seal an uplink to the coordinator) -> split into chunks
-> publications. Receiving, in this fixed order: parse the topic -> reassemble -> read the
header and check it against the topic -> authenticate (verify the pinned coordinator signature,
then decrypt with the federation key | open with the enrolled sender's key) -> replay/staleness
check -> decode. Whatever a peer sends, ``receive`` returns a message, None (a transfer is still
incomplete, or a duplicate chunk), or raises a ``ProtocolError``; nothing else.

The federation key reaches each member in a retained ``KeyGrant`` on its inbox
(``CoordinatorChannel.rekey``). A genuine broadcast under a key the agent does not hold yet
raises ``UnknownKey`` and is held; ``AgentChannel.unlocked`` decodes it once the grant arrives.

No I/O, no clock: the caller passes ``now`` and publishes what ``send`` returns (``retain``
says which publications are retained: release chunks and key grants; an empty payload clears
a stale one).

Why one file over 400 lines: the two channels are mirror images of one receive pipeline
(``_Channel``), whose fixed order of checks is the security argument; read side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

from fedprune.protocol import codec, topics
from fedprune.protocol.chunks import DEFAULT_MAX_CHUNK, Reassembler, split
from fedprune.protocol.crypto import KEY_ID_LEN, Aead, GroupKey, Identity, KeyRing, PublicIdentity
from fedprune.protocol.envelope import (
    COORDINATOR,
    FLAG_LAST_WILL,
    Header,
    Suite,
    decrypt_broadcast,
    encrypt_broadcast,
    open_envelope,
    parse_header,
    seal_envelope,
    sign_envelope,
    unwrap_group_key,
    verify_envelope,
    wrap_group_key,
)
from fedprune.protocol.errors import DecodeError, ProtocolError, TooLarge, UnknownKey, UnknownSender
from fedprune.protocol.layout import ModelLayout
from fedprune.protocol.messages import (
    KeyGrant, Kind, Message, ModelRef, ModelRelease, Register, Reject, RoundTask, State, Status, Update,
)
from fedprune.protocol.replay import ReplayGuard
from fedprune.protocol.secure_messages import SECURE_DOWNLINKS, SECURE_UPLINKS, SecureMessage
from fedprune.protocol.sparse import Masks, MaskStore, ValueDtype, check_masks
from fedprune.protocol.topics import Topic, TopicKind
from fedprune.protocol.wire import DEFAULT_LIMITS, Limits

_TOPIC_OF = {
    Kind.TASK: TopicKind.TASK,
    Kind.RELEASE: TopicKind.RELEASE,
    Kind.REJECT: TopicKind.INBOX,
    Kind.REGISTER: TopicKind.REGISTER,
    Kind.UPDATE: TopicKind.UPDATE,
    Kind.STATUS: TopicKind.STATUS,
    Kind.KEY: TopicKind.INBOX,
    **{cls.KIND: TopicKind.UPDATE for cls in SECURE_UPLINKS},  # the topic the broker ACL lets a device write
    **{cls.KIND: TopicKind.INBOX for cls in SECURE_DOWNLINKS},
}
# Encrypted to the members (the broker reads none of them); a coordinator older than minor 2 sent
# tasks and releases signed only.
_GROUP_KINDS = frozenset({Kind.TASK, Kind.RELEASE, *(cls.KIND for cls in SECURE_DOWNLINKS)})
_ROUND_UPLINKS = frozenset({Kind.UPDATE, *(cls.KIND for cls in SECURE_UPLINKS)})
_GROUP_SINCE_MINOR = 2


class Publication(NamedTuple):
    """One MQTT publish: unpacks as ``(topic, payload)``."""

    topic: str
    payload: bytes

    @property
    def retain(self) -> bool:
        return self.topic.split("/")[3:4] == [TopicKind.RELEASE.value]


class Retained(Publication):
    """A publication the broker keeps for later subscribers on a topic that is not always retained:
    a key grant (or the empty payload that clears one) on a device's inbox."""

    __slots__ = ()

    @property
    def retain(self) -> bool:
        return True


class _Held(NamedTuple):
    """A verified broadcast waiting for its key."""

    where: Topic
    header: Header
    header_len: int
    envelope: bytes


class _Channel:
    def __init__(
        self,
        federation: str,
        identity: Identity,
        *,
        value_dtype: ValueDtype,
        limits: Limits,
        max_chunk: int,
        replay: ReplayGuard | None,
        reassembler: Reassembler | None,
        mask_capacity: int,
    ) -> None:
        self.federation = topics.validate_id(federation, "federation")
        if not isinstance(identity, Identity):
            raise TypeError("identity must be a protocol.crypto.Identity")
        self.identity = identity
        self.value_dtype = ValueDtype(value_dtype)
        self.limits = limits
        self.max_chunk = max_chunk
        # `is None`, not `or`: both define __len__, so an empty one passed in is falsy.
        self.replay = ReplayGuard() if replay is None else replay
        self.reassembler = Reassembler(max_payload=limits.max_message_bytes) if reassembler is None else reassembler
        self.masks = MaskStore(mask_capacity)
        self._seq = 0

    def remember_masks(self, version: int, masks: Masks) -> None:
        """Make a mask version known (e.g. restored from disk after a restart)."""
        self.masks.put(version, masks)

    def _next_seq(self, now: float) -> int:
        # Microseconds since the epoch, never repeating: unique across restarts without state.
        self._seq = max(self._seq + 1, int(now * 1_000_000))
        return self._seq

    def _chunks(self, envelope: bytes, seq: int) -> list[bytes]:
        return split(envelope, transfer_id=seq, max_size=self.max_chunk)

    def receive(self, topic: str, payload: bytes, now: float) -> Message | None:
        """Reassemble, authenticate, check replay, decode. None while a transfer is incomplete."""
        return _translated(self._receive, topic, payload, now)

    def _receive(self, topic: str, payload: bytes, now: float) -> Message | None:
        where = topics.parse_topic(topic)
        if where.federation != self.federation:
            raise DecodeError(f"topic {topic!r} belongs to federation {where.federation!r}, not {self.federation!r}")
        self._check_inbound(where)
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise DecodeError("payload must be bytes")
        if not payload:
            if where.kind in (TopicKind.RELEASE, TopicKind.INBOX):
                return None  # a publisher clearing a retained release chunk or key grant
            raise DecodeError(f"empty payload on {topic!r}")
        source = where.device or where.kind.value  # a device's uplinks share one reassembly budget
        envelope = self.reassembler.feed(payload, now, source)
        if envelope is None:
            return None
        return self._open(where, envelope, now)

    def _open(self, where: Topic, envelope: bytes, now: float) -> Message:
        header, header_len = parse_header(envelope)
        if _TOPIC_OF[header.kind] is not where.kind or header.federation != self.federation:
            raise DecodeError(
                f"envelope of kind {header.kind.name} for {header.federation!r} arrived on {str(where)!r}: re-targeted"
            )
        body = self._authenticate(where, header, envelope, header_len)
        self._check_replay(header, now)
        msg = codec.decode_body(header, body, limits=self.limits, layout_for=self._layout_for, masks=self.masks)
        self._accepted(msg, header)
        return msg

    def _check_inbound(self, where: Topic) -> None:
        raise NotImplementedError

    def _authenticate(self, where: Topic, header: Header, envelope: bytes, header_len: int) -> bytes | memoryview:
        raise NotImplementedError

    def _check_replay(self, header: Header, now: float) -> None:
        raise NotImplementedError

    def _layout_for(self, model: ModelRef | None) -> ModelLayout:
        raise NotImplementedError

    def _accepted(self, msg: Message, header: Header) -> None:
        """Hook for state that may change only after a message is fully accepted."""


class AgentChannel(_Channel):
    """The device side: seals uplinks to the coordinator, verifies and decrypts its broadcasts.

    ``layout`` is the model's ModelLayout, or a callable resolving a task's ``ModelRef`` to one
    (the agent's model zoo); an unknown model should raise KeyError/ValueError. ``group_keys``
    holds the federation keys granted to this device, in memory only: the retained grant on its
    inbox brings the current one back after a restart.
    """

    def __init__(
        self,
        *,
        federation: str,
        device: str,
        identity: Identity,
        coordinator: PublicIdentity,
        layout: ModelLayout | Callable[[ModelRef], ModelLayout],
        aead: Aead = Aead.AES256_GCM,
        value_dtype: ValueDtype = ValueDtype.FLOAT32,
        limits: Limits = DEFAULT_LIMITS,
        max_chunk: int = DEFAULT_MAX_CHUNK,
        replay: ReplayGuard | None = None,
        reassembler: Reassembler | None = None,
        mask_capacity: int = 4,
        key_capacity: int = 4,
    ) -> None:
        super().__init__(
            federation, identity, value_dtype=value_dtype, limits=limits, max_chunk=max_chunk,
            replay=replay, reassembler=reassembler, mask_capacity=mask_capacity,
        )
        self.device = topics.validate_id(device, "device")
        self.group_keys = KeyRing(key_capacity)
        self._will_seq = 0
        self._held: dict[Kind, _Held] = {}  # the newest verified task and release waiting for their key
        if not isinstance(coordinator, PublicIdentity):
            raise TypeError("coordinator must be the pinned PublicIdentity of the coordinator")
        self.coordinator = coordinator
        self._layout = layout
        self.suite = Suite(Aead(aead).value)

    @property
    def subscriptions(self) -> tuple[str, ...]:
        return topics.agent_filters(self.federation, self.device)

    def send(self, msg: Register | Update | Status | SecureMessage, now: float, *,
             value_dtype: ValueDtype | None = None) -> list[Publication]:
        """Seal ``msg`` to the coordinator and chunk it for this device's own topic; an update's
        values travel as ``value_dtype`` (the task's ``update_values``), else as the channel's."""
        if not isinstance(msg, (Register, Update, Status, *SECURE_UPLINKS)):
            raise TypeError(f"an agent sends Register, Update, Status or a secure stage, not {type(msg).__name__}")
        if msg.device != self.device:
            raise ValueError(f"message names device {msg.device!r}, but this channel is {self.device!r}")
        base = None
        if isinstance(msg, Update):
            base = self.masks.get(msg.mask_version)
            if not msg.mask_changed and base is not None and not _same_masks(base, msg.masks):
                raise ValueError("mask_changed=False but the delta's masks differ from mask_version's masks")
        return self._seal_and_chunk(msg, now, flags=0, base_masks=base, value_dtype=value_dtype)

    def last_will(self, now: float, reason: str = "connection lost") -> Publication:
        """A sealed offline Status to register as the MQTT last will at connect time (one chunk).

        Safe to call from another thread than ``send``'s: wills count their own sequence (the
        coordinator checks wills apart from other messages, only that each is newer than the last)."""
        status = Status(self.device, State.OFFLINE, self.replay.current_round, reason, now)
        self._will_seq = max(self._will_seq + 1, int(now * 1_000_000))
        (publication,) = self._seal_and_chunk(status, now, flags=FLAG_LAST_WILL, base_masks=None, seq=self._will_seq)
        return publication

    def _seal_and_chunk(self, msg: Message, now: float, *, flags: int, base_masks: Masks | None,
                        seq: int | None = None, value_dtype: ValueDtype | None = None) -> list[Publication]:
        dtype = self.value_dtype if value_dtype is None else ValueDtype(value_dtype)
        body = codec.encode_body(msg, value_dtype=dtype, base_masks=base_masks)
        rnd = self.replay.current_round if isinstance(msg, Register) else msg.round
        seq = self._next_seq(now) if seq is None else seq
        header = Header(msg.KIND, self.suite, self.federation, self.device, rnd, seq, float(now), flags)
        envelope = seal_envelope(header, body, self.identity, self.coordinator)
        topic = str(Topic(self.federation, _TOPIC_OF[msg.KIND], self.device))
        return [Publication(topic, c) for c in self._chunks(envelope, seq)]

    def _check_inbound(self, where: Topic) -> None:
        if where.kind.uplink:
            raise DecodeError(f"agents do not receive {where.kind.value} messages")
        if where.kind is TopicKind.INBOX and where.device != self.device:
            raise DecodeError(f"inbox of {where.device!r} delivered to {self.device!r}")

    def unlocked(self, now: float) -> list[Message | ProtocolError]:
        """The held broadcasts whose key has arrived since, oldest first: each decoded message,
        or the ProtocolError it raises now. Call it after ``receive`` returns a KeyGrant."""
        ready = sorted((h for h in self._held.values() if self._key_id(h) in self.group_keys), key=lambda h: h.header.seq)
        out: list[Message | ProtocolError] = []
        for held in ready:
            del self._held[held.header.kind]
            try:
                out.append(_translated(self._open, held.where, held.envelope, now))
            except ProtocolError as exc:
                out.append(exc)
        return out

    @staticmethod
    def _key_id(held: _Held) -> bytes:
        return bytes(held.envelope[held.header_len : held.header_len + KEY_ID_LEN])

    def _authenticate(self, where: Topic, header: Header, envelope: bytes, header_len: int) -> bytes | memoryview:
        if header.sender != COORDINATOR or header.flags:
            raise DecodeError("broadcasts must be signed by the coordinator")
        if header.suite is Suite.GROUP_AES256_GCM and header.kind in _GROUP_KINDS:
            try:
                return decrypt_broadcast(envelope, header_len, self.coordinator, self.group_keys.get)
            except UnknownKey:  # genuine (the signature verified): keep the newest of its kind for its key
                held = self._held.get(header.kind)
                if held is None or held.header.seq < header.seq:
                    self._held[header.kind] = _Held(where, header, header_len, bytes(envelope))
                raise
        if header.suite is Suite.SIGNED_ED25519 and (header.kind not in _GROUP_KINDS or header.minor < _GROUP_SINCE_MINOR):
            return verify_envelope(envelope, header_len, self.coordinator)
        raise DecodeError(f"a {header.kind.name.lower()} with suite {header.suite.name} is refused: tasks and releases "
                          "are encrypted to the members, rejects and key grants are signed")

    def _check_replay(self, header: Header, now: float) -> None:
        if header.kind is Kind.RELEASE:  # retained: may be old; the newest release wins
            self.replay.check_latest(COORDINATOR, "release", header.seq, header.sent_at, now, check_time=False)
        elif header.kind is Kind.KEY:  # retained too: the newest grant wins
            self.replay.check_latest(COORDINATOR, "key", header.seq, header.sent_at, now, check_time=False)
        else:
            self.replay.check(COORDINATOR, header.round, header.seq, header.sent_at, now)

    def _layout_for(self, model: ModelRef | None) -> ModelLayout:
        if isinstance(self._layout, ModelLayout):
            return self._layout
        if model is None:
            raise DecodeError("no model named to resolve a layout")
        return self._layout(model)

    def _accepted(self, msg: Message, header: Header) -> None:
        if isinstance(msg, (Reject, KeyGrant, *SECURE_DOWNLINKS)) and msg.device != self.device:
            raise DecodeError(f"{header.kind.name.lower()} for {msg.device!r} delivered to {self.device!r}")
        if isinstance(msg, KeyGrant):
            self.group_keys.put(unwrap_group_key(header.pack(), msg.key_id, msg.wrapped, self.identity, self.coordinator))
        if isinstance(msg, RoundTask):
            if msg.include_masks:
                self.masks.put(msg.mask_version, msg.masks)
            self.replay.advance(msg.round)


class CoordinatorChannel(_Channel):
    """The coordinator side: encrypts and signs broadcasts, opens uplinks from enrolled devices.

    ``devices`` maps a device id to its enrolled PublicIdentity (a Mapping or a callable
    returning None for an unknown or revoked device): the registry stays the source of truth.
    Tasks and releases go out under ``group_key``, granted to ``group_members`` by ``rekey``;
    when to rekey (the member set changed) is the caller's decision.
    """

    def __init__(
        self,
        *,
        federation: str,
        identity: Identity,
        devices: Mapping[str, PublicIdentity] | Callable[[str], PublicIdentity | None],
        layout: ModelLayout,
        value_dtype: ValueDtype = ValueDtype.FLOAT32,
        limits: Limits = DEFAULT_LIMITS,
        max_chunk: int = DEFAULT_MAX_CHUNK,
        replay: ReplayGuard | None = None,
        reassembler: Reassembler | None = None,
        mask_capacity: int = 4,
    ) -> None:
        if reassembler is None and isinstance(layout, ModelLayout):
            reassembler = Reassembler(max_payload=limits.max_message_bytes, max_source_bytes=sender_share(layout))
        super().__init__(
            federation, identity, value_dtype=value_dtype, limits=limits, max_chunk=max_chunk,
            replay=replay, reassembler=reassembler, mask_capacity=mask_capacity,
        )
        self._lookup = devices.get if isinstance(devices, Mapping) else devices
        if not isinstance(layout, ModelLayout):
            raise TypeError("layout must be the federation model's ModelLayout")
        self.layout = layout
        self._release_chunks = 0
        self.group_key: GroupKey | None = None
        self.group_members: dict[str, PublicIdentity] = {}

    @property
    def subscriptions(self) -> tuple[str, ...]:
        return topics.coordinator_filters(self.federation)

    def rekey(
        self, members: Mapping[str, PublicIdentity], now: float, *, dropped: Iterable[str] = (),
        key: GroupKey | None = None,
    ) -> list[Publication]:
        """A new federation key for exactly ``members``: a retained grant on each member's inbox,
        and an empty retained publish clearing each ``dropped`` device's old grant. Every task and
        release sent afterwards is encrypted under it. ``key`` is for tests and vectors only."""
        self.group_key = key or GroupKey.generate()
        self.group_members = dict(members)
        grants = [self.grant(device, now) for device in sorted(self.group_members)]
        clears = [Retained(topics.inbox_topic(self.federation, d), b"") for d in sorted(set(dropped) - set(members))]
        return grants + clears

    def grant(self, device: str, now: float) -> Publication:
        """The current federation key sealed to member ``device``: one signed, retained chunk on its inbox."""
        public = self.group_members.get(device)
        if self.group_key is None or public is None:
            raise ValueError(f"device {device!r} is not a member of the current federation key")
        seq = self._next_seq(now)
        header = Header(Kind.KEY, Suite.SIGNED_ED25519, self.federation, COORDINATOR, self.replay.current_round, seq,
                        float(now))
        grant = KeyGrant(device, self.group_key.key_id, wrap_group_key(header.pack(), self.group_key, self.identity, public))
        (chunk,) = self._chunks(sign_envelope(header, codec.encode_body(grant), self.identity), seq)
        return Retained(topics.inbox_topic(self.federation, device), chunk)

    def send(self, msg: RoundTask | ModelRelease | Reject | SecureMessage, now: float, *,
             value_dtype: ValueDtype | None = None) -> list[Publication]:
        """Encrypt a task, release or secure stage under the federation key and sign it (a
        reject: sign only), then chunk it. A RoundTask also opens its round for replay checks; its
        weights travel as ``value_dtype``, else as the channel's."""
        if isinstance(msg, (RoundTask, ModelRelease, *SECURE_DOWNLINKS)) and self.group_key is None:
            raise ValueError("no federation key yet: rekey(members) before sending a task, release or secure stage")
        if isinstance(msg, RoundTask):
            if msg.federation != self.federation:
                raise ValueError(f"task for federation {msg.federation!r} on channel {self.federation!r}")
            if msg.layout.fingerprint() != self.layout.fingerprint():
                raise ValueError("task weights do not cover the federation's model layout")
            check_masks(self.layout, msg.masks)
            self.masks.put(msg.mask_version, msg.masks)
            self.replay.advance(msg.round)
            rnd = msg.round
        elif isinstance(msg, (Reject, *SECURE_DOWNLINKS)):
            rnd = msg.round
        elif isinstance(msg, ModelRelease):
            rnd = self.replay.current_round
        else:
            raise TypeError(f"a coordinator sends RoundTask, ModelRelease, Reject or a secure stage, not {type(msg).__name__}")
        body = codec.encode_body(msg, value_dtype=self.value_dtype if value_dtype is None else ValueDtype(value_dtype))
        seq = self._next_seq(now)
        if isinstance(msg, Reject):
            header = Header(msg.KIND, Suite.SIGNED_ED25519, self.federation, COORDINATOR, rnd, seq, float(now))
            envelope = sign_envelope(header, body, self.identity)
        else:
            header = Header(msg.KIND, Suite.GROUP_AES256_GCM, self.federation, COORDINATOR, rnd, seq, float(now))
            envelope = encrypt_broadcast(header, body, self.group_key, self.identity)
        chunks = self._chunks(envelope, seq)
        if isinstance(msg, (Reject, *SECURE_DOWNLINKS)):
            return [Publication(topics.inbox_topic(self.federation, msg.device), c) for c in chunks]
        if isinstance(msg, RoundTask):
            return [Publication(topics.task_topic(self.federation), c) for c in chunks]
        out = [Publication(topics.release_topic(self.federation, i), c) for i, c in enumerate(chunks)]
        out += [Publication(topics.release_topic(self.federation, i), b"") for i in range(len(chunks), self._release_chunks)]
        self._release_chunks = len(chunks)
        return out

    def _check_inbound(self, where: Topic) -> None:
        if not where.kind.uplink:
            raise DecodeError(f"the coordinator does not receive {where.kind.value} messages")

    def _authenticate(self, where: Topic, header: Header, envelope: bytes, header_len: int) -> bytes:
        if header.sender != where.device:
            raise DecodeError(f"envelope from {header.sender!r} arrived on {where.device!r}'s topic: re-targeted")
        if not header.suite.sealed:
            raise DecodeError("device messages must be sealed to the coordinator")
        sender = self._lookup(header.sender)
        if sender is None:
            raise UnknownSender(f"device {header.sender!r} is not enrolled (or was revoked): enroll it first")
        return open_envelope(envelope, header, header_len, self.identity, sender)

    def _check_replay(self, header: Header, now: float) -> None:
        if header.kind in _ROUND_UPLINKS:
            self.replay.check(header.sender, header.round, header.seq, header.sent_at, now)
        elif header.last_will:  # sealed at connect time, delivered whenever the link drops
            self.replay.check_latest(header.sender, "will", header.seq, header.sent_at, now, check_time=False)
        else:
            self.replay.check_latest(header.sender, header.kind.name.lower(), header.seq, header.sent_at, now)

    def _layout_for(self, model: ModelRef | None) -> ModelLayout:
        return self.layout


def _same_masks(a: Masks, b: Masks) -> bool:
    return a.keys() == b.keys() and all(a[k] is b[k] or (a[k].shape == b[k].shape and (a[k] == b[k]).all()) for k in a)


def _translated(step: Callable[..., Message | None], *args: object) -> Message | None:
    """The channel's translation point: only ProtocolError leaves a receive."""
    try:
        return step(*args)
    except ProtocolError:
        raise
    except MemoryError:
        raise TooLarge("message needs more memory than allowed") from None
    except Exception as exc:
        raise DecodeError(f"{type(exc).__name__}: {str(exc)[:160]}") from None


def sender_share(layout: ModelLayout) -> int:
    """The reassembly bytes one device may hold at the coordinator: two of the largest update it
    can honestly send (every value as float32, a bitmap mask per tensor, 64 KiB for the rest), so
    an update and its resend fit while a flood stays at a model's size, not the buffer's."""
    elements = sum(spec.size for spec in layout)
    return 2 * (4 * elements + elements // 8 + (64 << 10))
