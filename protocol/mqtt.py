"""MQTT 5 client set-up shared by devices and the control centre: TLS, reconnect, sessions."""

from __future__ import annotations

import contextlib
import socket
import ssl
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

SESSION_EXPIRY_S = 3600  # the broker keeps our command subscription and queue across short gaps


@dataclass(frozen=True)
class BrokerConfig:
    host: str
    port: int
    ca_file: str | None = None  # None: no TLS (only for a broker on loopback in tests)
    cert_file: str | None = None
    key_file: str | None = None
    keepalive_s: int = 30
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 8.0


def make_client(client_id: str, broker: BrokerConfig) -> mqtt.Client:
    """A paho MQTT 5 client with TLS set up as `broker` says (shared with the control centre)."""
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
    )
    if broker.ca_file:
        client.tls_set(
            ca_certs=broker.ca_file,
            certfile=broker.cert_file,
            keyfile=broker.key_file,
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    client.reconnect_delay_set(broker.reconnect_min_s, broker.reconnect_max_s)
    client.on_socket_open = _no_delay
    return client


def _no_delay(client: mqtt.Client, userdata: object, sock: socket.socket) -> None:
    """paho leaves Nagle's algorithm on: a small packet right after another (a PUBACK after a
    delivery receipt) then waits for the peer's delayed ACK, about 40 ms (`make bench`)."""
    with contextlib.suppress(OSError, AttributeError):  # not a TCP socket: nothing to do
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def session_properties() -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = SESSION_EXPIRY_S
    return props
