"""EmbeddedBroker: an in-process amqtt broker for the single-box demo and for tests.

It is never a security boundary. It accepts anonymous clients, speaks MQTT 3.1.1 only (MqttLink's
``protocol="auto"`` falls back to it), keeps nothing across restarts, and has no ``%u`` ACL
patterns. Worse, amqtt 0.12 sends every new client the retained messages matching *any* client's
subscription, whatever its ACL says (docs/INFRA.md): never retain in it anything that not every client
may read, and do not rely on ACLs there. fedprune stays confidential over it only because updates
are sealed and broadcasts signed. Production uses Mosquitto (deploy/mosquitto/).

amqtt's ``Broker`` must be built inside a running asyncio loop, so the broker gets its own thread
and loop; ``start``/``stop`` are synchronous for the caller.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from concurrent.futures import Future

from amqtt.broker import Broker
from amqtt.errors import BrokerError

from fedprune.common.configkit import ConfigError
from fedprune.common.events import emit

log = logging.getLogger("fedprune.broker")

_BIND_ATTEMPTS = 5


class EmbeddedBroker:
    """amqtt on ``host:port`` (port 0: a free one is picked), anonymous, in a daemon thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 10.0) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port}: expected 0..65535 (0 picks a free port)")
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._start_timeout_s = start_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Broker | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("EmbeddedBroker is not running; call start() first")
        return self._port

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> EmbeddedBroker:
        if self._thread is not None:
            raise RuntimeError("EmbeddedBroker already started")
        # Per-connection lines would drown the daemon's own: INFO for every client, and a WARNING
        # for every MqttLink whose MQTT 5 probe amqtt refuses before it falls back to 3.1.1.
        for noisy in ("amqtt", "transitions"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        if self._requested_port:
            check_bindable(self.host, self._requested_port)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="fedprune-embedded-broker", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            for attempt in range(_BIND_ATTEMPTS):
                port = self._requested_port or free_port(self.host)
                future: Future[Broker] = asyncio.run_coroutine_threadsafe(self._serve(port), loop)
                try:
                    self._broker = future.result(self._start_timeout_s)
                except BrokerError:
                    # A port picked free can be taken before amqtt binds it; a fixed port is final.
                    if self._requested_port or attempt == _BIND_ATTEMPTS - 1:
                        raise
                    continue
                self._port = port
                break
        except BaseException:
            self._stop_loop()
            raise
        emit(log, logging.WARNING, "embedded_broker_started", url=self.url, anonymous=True, acl="none",
             note="demo/test only, not a security boundary; production uses Mosquitto")
        return self

    def stop(self) -> None:
        """Shut the broker down and end its thread. Idempotent."""
        if self._loop is None:
            return
        if self._broker is not None:
            asyncio.run_coroutine_threadsafe(self._shut_down(self._broker), self._loop).result(self._start_timeout_s)
            self._broker = None
        self._stop_loop()
        emit(log, logging.INFO, "embedded_broker_stopped", port=self._port)
        self._port = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _serve(self, port: int) -> Broker:
        broker = Broker(
            {
                "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{port}"}},
                # Naming plugins replaces amqtt's defaults (packet logger, $SYS publisher): keep only auth.
                "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
            }
        )
        await broker.start()
        return broker

    @staticmethod
    async def _shut_down(broker: Broker) -> None:
        await broker.shutdown()
        # amqtt leaves per-connection tasks of still-connected clients behind; end them here,
        # or closing the loop reports "Task was destroyed but it is pending".
        leftovers = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(self._start_timeout_s)
        loop.close()


def check_bindable(host: str, port: int) -> None:
    """Refuse a port the broker cannot listen on (taken, privileged, not a local address) with a
    message naming the key to change: amqtt would log a 60-line traceback and systemd would
    restart the coordinator into the same failure forever."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's server does
            probe.bind(address)
    except OSError as exc:
        raise ConfigError(
            f"[broker] url: the embedded broker cannot listen on {host}:{port} ({exc.strerror or exc}); if "
            "another broker or coordinator holds the port, stop it, change the port in [broker] url, or set "
            "[broker] embedded = false to use that broker"
        ) from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])
