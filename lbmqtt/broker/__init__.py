"""The embedded MQTT broker: amqtt 0.12.1 with lbmqtt's patches for its known bugs.

It runs in its own process by default (``lbmqtt broker``, started by ``lbmqtt up``): its
CPU per message would otherwise compete with the balancer's event loop. Each patch can be
switched off (``patches=``) so that the tests can show the bug it fixes.

(Not to be confused with the repository's top-level ``broker/`` folder: deployment files.)

One module per concern:

``listeners``
    amqtt's configuration (listeners, TLS, plugins), the bound port, the loopback
    Mosquitto configuration for tests and benchmarks.
``streams``
    The reader and writer every connection goes through: packet size limits, the
    CONNECT deadline, closing the socket for good.
``auth``
    With accounts: logins checked (off the loop, before any session is touched), topic
    rights, subscription caps (:class:`~lbmqtt.broker.auth.GuardedBroker`).
``patches``
    :class:`PatchedBroker`: each patch for an amqtt bug, documented with the bug and its
    upstream issue where there is one (:data:`ALL_PATCHES`).
``embedded``
    :class:`EmbeddedBroker` on the running loop (start, stop, ports, accounts watch,
    retained status) and :func:`embedded_broker` from the settings.
``process``
    The broker process: :func:`serve`, :func:`quiet_amqtt_logs`.
"""

from .auth import MAX_SUBSCRIPTIONS, GuardedBroker
from .embedded import EmbeddedBroker, embedded_broker
from .listeners import (
    AMQTT_VERSION,
    TlsListener,
    bound_port,
    broker_config,
    loopback_mosquitto_conf,
)
from .patches import ALL_PATCHES, MAX_OFFLINE_BYTES, MAX_OFFLINE_MESSAGES, PatchedBroker
from .process import quiet_amqtt_logs, serve
from .streams import PacketTooLarge

__all__ = [
    "ALL_PATCHES",
    "AMQTT_VERSION",
    "MAX_OFFLINE_BYTES",
    "MAX_OFFLINE_MESSAGES",
    "MAX_SUBSCRIPTIONS",
    "EmbeddedBroker",
    "GuardedBroker",
    "PacketTooLarge",
    "PatchedBroker",
    "TlsListener",
    "bound_port",
    "broker_config",
    "embedded_broker",
    "loopback_mosquitto_conf",
    "quiet_amqtt_logs",
    "serve",
]
