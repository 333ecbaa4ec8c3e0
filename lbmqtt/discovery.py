"""Finding the broker on the LAN: mDNS / DNS-SD (python-zeroconf).

``lbmqtt broker`` and ``lbmqtt up`` advertise the embedded broker as an ``_mqtt._tcp``
service (TXT ``lbmqtt=<version>``, ``prefix=<TOPIC_PREFIX>``) on every non-loopback address
they listen on. A component whose ``BROKER_HOST`` is ``"auto"`` browses for it for up to
``DISCOVERY_TIMEOUT_S``; when several answer, one advertising the same topic prefix wins,
then the first by name (all are logged). Explicit addresses never touch the network for
discovery.

An external broker (Mosquitto, EMQX) can be made discoverable the same way, e.g. with
Avahi: see broker/README.md.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass

from . import __version__
from .config import Settings, is_loopback
from .errors import BrokerUnavailable, ConfigError

log = logging.getLogger(__name__)

SERVICE_TYPE = "_mqtt._tcp.local."
AUTO = "auto"


@dataclass(frozen=True, slots=True)
class Found:
    """One advertised broker."""

    name: str
    host: str
    port: int
    prefix: str | None
    lbmqtt: str | None


def local_ipv4_addresses() -> list[str]:
    """The machine's non-loopback IPv4 addresses (what ``0.0.0.0`` listens on)."""
    import ifaddr

    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not is_loopback(ip.ip):
                out.append(ip.ip)
    return sorted(set(out))


class Advertiser:
    """Advertises a broker listening on ``bind``:``port`` until :meth:`close`.

    Nothing is advertised for a loopback-only listener (no other machine could use it).
    """

    def __init__(self, bind: str, port: int, prefix: str):
        self.addresses = (
            local_ipv4_addresses()
            if bind in ("0.0.0.0", "", "::")  # noqa: S104
            else []
            if is_loopback(bind)
            else [bind]
        )
        self.port = port
        self.prefix = prefix
        self._zc: object | None = None
        self._info: object | None = None

    def start(self) -> list[str]:
        """Register the service (blocking: a fraction of a second). Returns the addresses."""
        if not self.addresses:
            return []
        from zeroconf import InterfaceChoice, IPVersion, ServiceInfo, Zeroconf

        host = socket.gethostname().split(".")[0] or "lbmqtt"
        name = f"lbmqtt broker on {host} port {self.port}.{SERVICE_TYPE}"
        info = ServiceInfo(
            SERVICE_TYPE,
            name,
            port=self.port,
            addresses=[socket.inet_aton(a) for a in self.addresses],
            properties={"lbmqtt": __version__, "prefix": self.prefix},
            server=f"{host}-lbmqtt-{self.port}.local.",
        )
        interfaces = self.addresses if len(self.addresses) == 1 else InterfaceChoice.All
        zc = Zeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        try:
            zc.register_service(info, allow_name_change=True)
        except BaseException:
            zc.close()
            raise
        self._zc, self._info = zc, info
        return self.addresses

    def close(self) -> None:
        zc, info = self._zc, self._info
        self._zc = self._info = None
        if zc is not None:
            try:
                zc.unregister_service(info)  # type: ignore[attr-defined]
            finally:
                zc.close()  # type: ignore[attr-defined]


def browse(timeout_s: float, *, settle_s: float = 0.3) -> list[Found]:
    """Every lbmqtt-compatible broker advertised within ``timeout_s`` (blocking).

    Returns soon after the first answer (``settle_s`` later, to hear the others).
    """
    from zeroconf import IPVersion, ServiceBrowser, ServiceStateChange, Zeroconf

    found: dict[str, Found] = {}
    lock = threading.Lock()
    first = threading.Event()
    zc = Zeroconf(ip_version=IPVersion.V4Only)

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            return
        info = zeroconf.get_service_info(service_type, name, timeout=int(timeout_s * 1000))
        if info is None or not info.port:
            return
        addrs = info.parsed_addresses(IPVersion.V4Only)
        if not addrs:
            return
        addrs = sorted(addrs, key=lambda a: (not _on_a_local_subnet(a), a))
        props = {
            k.decode(): (v.decode() if v is not None else None)
            for k, v in (info.properties or {}).items()
        }
        with lock:
            found[name] = Found(
                name=name,
                host=addrs[0],
                port=int(info.port),
                prefix=props.get("prefix"),
                lbmqtt=props.get("lbmqtt"),
            )
        first.set()

    try:
        browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
        try:
            if first.wait(timeout_s):
                time.sleep(settle_s)  # let the other brokers on the LAN answer too
        finally:
            browser.cancel()
    finally:
        zc.close()
    with lock:
        return list(found.values())


def choose(found: list[Found], prefix: str) -> Found | None:
    """The broker to use: an lbmqtt one (TXT ``lbmqtt``; other MQTT brokers on the LAN,
    a home-automation hub say, are ignored), preferring one advertising ``prefix``."""
    ours = [f for f in found if f.lbmqtt]

    def rank(f: Found) -> tuple[int, str]:
        return (0 if f.prefix == prefix else 1, f.name)

    return min(ours, key=rank) if ours else None


def _on_a_local_subnet(addr: str) -> bool:
    """Whether ``addr`` is on one of this machine's IPv4 subnets (reachable directly: of a
    broker's addresses, prefer those over, say, its docker0 address)."""
    import ifaddr

    try:
        ip = ipaddress.ip_address(addr)
        for adapter in ifaddr.get_adapters():
            for a in adapter.ips:
                if isinstance(a.ip, str) and not is_loopback(a.ip):
                    net = ipaddress.ip_network(f"{a.ip}/{a.network_prefix}", strict=False)
                    if ip in net:
                        return True
    except (ValueError, OSError):
        return False
    return False


def discover(settings: Settings) -> tuple[str, int]:
    """Find the broker by mDNS (blocking). Raises BrokerUnavailable if none answers."""
    try:
        found = browse(settings.discovery_timeout_s)
    except Exception as exc:  # no usable interface, no multicast...: say so plainly
        raise BrokerUnavailable(
            f'BROKER_HOST is "auto" but mDNS discovery cannot run here ({exc}): set '
            f"BROKER_HOST to the broker's address"
        ) from exc
    best = choose(found, settings.topic_prefix)
    if best is None:
        raise BrokerUnavailable(
            f'BROKER_HOST is "auto" but no broker advertised itself on the LAN within '
            f"{settings.discovery_timeout_s:g} s (mDNS, {SERVICE_TYPE}): start `lbmqtt up` "
            f"or `lbmqtt broker` with a non-loopback --bind, or set BROKER_HOST"
        )
    others = [f"{f.host}:{f.port}" for f in found if f is not best]
    log.info(
        "found the broker %s:%d by mDNS (%s)%s",
        best.host,
        best.port,
        best.name,
        f"; also seen: {', '.join(others)}" if others else "",
    )
    return best.host, best.port


async def resolve(settings: Settings) -> Settings:
    """``settings`` with ``BROKER_HOST: "auto"`` replaced by the discovered broker."""
    if settings.broker_host != AUTO:
        return settings
    if settings.broker_username and not settings.broker_tls:
        raise ConfigError(
            'BROKER_HOST "auto" with a login and without TLS: the password would go in '
            "clear to whichever machine answers on mDNS first (anyone on the LAN can). "
            'Give the broker\'s address (BROKER_HOST), or turn on TLS ("BROKER_TLS": true '
            "and the broker's CA in BROKER_CA_FILE: the certificate proves it is your "
            'broker); see README, "Running on a shared LAN"'
        )
    host, port = await asyncio.to_thread(discover, settings)
    return settings.with_overrides(broker_host=host, broker_port=port)
