"""Settings: parameters.json -> typed, validated :class:`Settings`; ``LBMQTT_<KEY>`` overrides.

The keys keep pyLoadBalancer's names where the meaning holds (``BROKER_*`` replace its
socket ports, since everything now goes through one MQTT broker). Every command takes
``--parameters FILE``; without it, ``./parameters.json`` is used when it exists, else the
built-in defaults. Environment variables ``LBMQTT_<KEY>`` override the file; their value is
parsed as JSON when it parses (``LBMQTT_BROKER_PORT=0``, ``LBMQTT_WKHUB_WORKERS='[...]'``),
else taken as a string. Only this module reads the environment.

A bad file raises :class:`~lbmqtt.errors.ConfigError` with one line naming the file and the
offending key; the CLI prints that line and exits with status 2.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .protocol.names import NAME_PATTERN, PREFIX_PATTERN, RESOURCE_PATTERN

log = logging.getLogger(__name__)

ENV_PREFIX = "LBMQTT_"
DEFAULT_FILE = "parameters.json"

#: pyLoadBalancer keys that have no meaning over a broker (its ZeroMQ ports and the worker
#: hub's address): accepted, and listed in one warning, so an old parameters file keeps loading.
OBSOLETE_KEYS = frozenset(
    {
        "LB_WKPULLPORT",
        "LB_HCREPPORT",
        "LB_CLIENTPULLPORT",
        "WKHUB_IP",
        "WKHUB_LBPORT",
        "WKHUB_HCPORT",
    }
)

#: pyLoadBalancer keys that keep a meaning: ``LB_IP`` is where the balancer ran, so where the
#: broker runs now (``BROKER_HOST``); ``SOCKET_TIMEOUT`` (ms) bounded each of a client's
#: three tries, so it bounds how long a client waits (``CLIENT_ACK_TIMEOUT_S`` and
#: ``CONNECT_TIMEOUT_S``: three tries and the one-second pauses between them).
TRANSLATED_KEYS = frozenset({"LB_IP", "SOCKET_TIMEOUT"})

WARNED_ENV = "LBMQTT_OLD_KEYS_WARNED"
"""Files whose obsolete keys were already listed (``os.pathsep``-separated): set by the
process that warns, inherited by the processes it starts, so a system warns once."""


def old_timeout_s(socket_timeout_ms: float) -> float:
    """How long pyLoadBalancer's client took to give up with ``SOCKET_TIMEOUT`` (ms): three
    tries of ``SOCKET_TIMEOUT`` each, one second apart."""
    return 3 * socket_timeout_ms / 1000.0 + 2.0


def _translate_old_keys(data: dict[str, Any], source: str, file_key: str) -> None:
    """Give pyLoadBalancer's keys their meaning in place (unless the new key is set too),
    and warn once per system about the keys that have none."""
    if "LB_IP" in data:
        lb_ip = data.pop("LB_IP")
        if not isinstance(lb_ip, str) or not lb_ip:
            raise ConfigError(f"{source}: LB_IP: must be a host name or address (got {lb_ip!r})")
        data.setdefault("BROKER_HOST", lb_ip)
    if "SOCKET_TIMEOUT" in data:
        ms = data.pop("SOCKET_TIMEOUT")
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not 0 < ms < 3.6e6:
            raise ConfigError(
                f"{source}: SOCKET_TIMEOUT: milliseconds, a number above 0 (got {ms!r})"
            )
        data.setdefault("CLIENT_ACK_TIMEOUT_S", old_timeout_s(ms))
        data.setdefault("CONNECT_TIMEOUT_S", old_timeout_s(ms))
    ignored = sorted(OBSOLETE_KEYS & data.keys())
    for key in ignored:
        del data[key]
    if not ignored:
        return
    warned = os.environ.get(WARNED_ENV, "")
    if file_key in warned.split(os.pathsep):
        return
    os.environ[WARNED_ENV] = f"{warned}{os.pathsep}{file_key}" if warned else file_key
    log.warning(
        "%s: ignoring pyLoadBalancer keys %s: lbmqtt talks through the MQTT broker "
        "(LB_IP is its host, BROKER_PORT its port)",
        source,
        ", ".join(ignored),
    )


class WorkerGroup(BaseModel):
    """A group of worker slots on a node sharing a priority band (pyLoadBalancer's format).

    A slot of the group runs a task of priority ``p`` only if ``minP <= p <= maxP``;
    ``processP`` is the nice increment of its worker processes (10 = polite background work).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    n_workers: int = Field(alias="nWorkers", ge=0, le=1024)
    min_p: int = Field(alias="minP", ge=-(2**31), le=2**31 - 1)
    max_p: int = Field(alias="maxP", ge=-(2**31), le=2**31 - 1)
    process_p: int = Field(default=0, alias="processP", ge=-20, le=19)

    @model_validator(mode="after")
    def _band_is_ordered(self) -> WorkerGroup:
        if self.min_p > self.max_p:
            raise ValueError(f"minP ({self.min_p}) must not exceed maxP ({self.max_p})")
        return self


def _default_groups() -> list[WorkerGroup]:
    """One slot per core for ordinary work (0..9, nice 10, so the machine stays usable),
    plus one slot kept free for urgent work (10..1000)."""
    return [
        WorkerGroup(nWorkers=max(1, os.cpu_count() or 1), minP=0, maxP=9, processP=10),
        WorkerGroup(nWorkers=1, minP=10, maxP=1000, processP=0),
    ]


class Settings(BaseModel):
    """Every setting of lbmqtt, keyed in parameters.json by its UPPER_CASE alias.

    Durations are float seconds (``*_S``). Ports of 0 mean "pick a free one"; the chosen
    port is printed and published by the component that binds it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    # -- broker ---------------------------------------------------------------------------
    broker_host: str = Field("127.0.0.1", alias="BROKER_HOST", min_length=1)
    """Host every component connects to (and the embedded broker binds to by default);
    ``"auto"``: find the broker on the LAN by mDNS (the embedded one then binds 0.0.0.0)."""
    broker_port: int = Field(1883, alias="BROKER_PORT", ge=0, le=65535)
    broker_embedded: bool = Field(True, alias="BROKER_EMBEDDED")
    """``lbmqtt up`` starts the embedded amqtt broker; false: use an external broker."""
    broker_bind: str | None = Field(None, alias="BROKER_BIND")
    """Address the embedded broker listens on (default: BROKER_HOST), e.g. ``0.0.0.0``;
    with a TLS listener, the address of that listener (default: ``0.0.0.0``)."""
    broker_username: str | None = Field(None, alias="BROKER_USERNAME")
    broker_password: str | None = Field(None, alias="BROKER_PASSWORD")
    """The login's password (better in the environment: ``LBMQTT_BROKER_PASSWORD``)."""
    broker_password_file: str | None = Field(None, alias="BROKER_PASSWORD_FILE")
    """A file holding the password (its first line), when BROKER_PASSWORD is not set."""
    broker_tls: bool = Field(False, alias="BROKER_TLS")
    """Clients connect to BROKER_HOST:BROKER_PORT with TLS (the broker's TLS port)."""
    broker_ca_file: str | None = Field(None, alias="BROKER_CA_FILE")
    """CA certificate (PEM) that signed the broker's certificate (default: the system's)."""
    broker_tls_port: int = Field(8883, alias="BROKER_TLS_PORT", ge=0, le=65535)
    """The embedded broker's TLS listener, on when BROKER_TLS_CERT and _KEY are set: it
    listens on 0.0.0.0 (or BROKER_BIND); plain MQTT then stays on 127.0.0.1 (for the parts
    ``lbmqtt up`` starts)."""
    broker_tls_cert: str | None = Field(None, alias="BROKER_TLS_CERT")
    broker_tls_key: str | None = Field(None, alias="BROKER_TLS_KEY")
    auth_file: str | None = Field(None, alias="AUTH_FILE")
    """Accounts file (``lbmqtt user add``): with it, the embedded broker admits only these
    logins, each to its role's topics. Without it, the broker must listen on loopback."""
    broker_max_packet_bytes: int = Field(
        64 * 2**20, alias="BROKER_MAX_PACKET_BYTES", ge=65_536, le=256 * 2**20
    )
    """Largest MQTT packet the embedded broker takes from the balancer (and, without
    accounts, from anyone); other logins: MAX_PAYLOAD_BYTES + 64 KiB."""
    broker_keepalive_s: int = Field(5, alias="BROKER_KEEPALIVE_S", ge=1, le=3600)
    broker_advertise: bool = Field(True, alias="BROKER_ADVERTISE")
    """The embedded broker advertises itself by mDNS when it listens beyond loopback."""
    discovery_timeout_s: float = Field(5.0, alias="DISCOVERY_TIMEOUT_S", gt=0, le=300)
    """How long ``BROKER_HOST: "auto"`` looks for a broker."""
    topic_prefix: str = Field("lbmqtt/v1", alias="TOPIC_PREFIX", pattern=PREFIX_PATTERN)

    # -- dashboard ------------------------------------------------------------------------
    monitor_ip: str = Field("127.0.0.1", alias="MONITOR_IP", min_length=1)
    monitor_port: int = Field(9000, alias="MONITOR_PORT", ge=0, le=65535)
    metrics_ip: str = Field("127.0.0.1", alias="METRICS_IP", min_length=1)
    metrics_port: int | None = Field(None, alias="METRICS_PORT", ge=0, le=65535)
    """The balancer's Prometheus endpoint (``/metrics``); null: none, 0: any free port."""

    # -- balancer -------------------------------------------------------------------------
    lb_queing_maxperuser: int = Field(1000, alias="LB_QUEING_MAXPERUSER", ge=0)
    """Maximum queued tasks per user; 0 = no cap."""
    lb_running_maxperuser: int = Field(0, alias="LB_RUNNING_MAXPERUSER", ge=0)
    """Maximum placed (assigned or running) tasks per user; 0 = no cap."""
    task_max_attempts: int = Field(3, alias="TASK_MAX_ATTEMPTS", ge=1, le=100)
    """Attempts per task when a node or worker process is lost under it."""
    result_ttl_s: float = Field(48 * 3600.0, alias="RESULT_TTL_S", gt=0)
    """A finished task is kept at most this long."""
    result_collected_ttl_s: float = Field(60.0, alias="RESULT_COLLECTED_TTL_S", ge=0)
    """A finished task is kept this long after its result was collected."""
    queued_ttl_s: float = Field(48 * 3600.0, alias="QUEUED_TTL_S", ge=0)
    """A task still queued this long after its submission expires (status ``expired``),
    as in pyLoadBalancer; 0: queued tasks never expire."""
    stats_interval_s: float = Field(0.5, alias="STATS_INTERVAL_S", gt=0)
    max_payload_bytes: int = Field(1_048_576, alias="MAX_PAYLOAD_BYTES", ge=1024)
    """Larger inbound messages are refused (code ``too_large``)."""
    max_batch: int = Field(10_000, alias="MAX_BATCH", ge=1)
    """Most tasks in one submit message."""
    submit_rate: float = Field(0.0, alias="SUBMIT_RATE", ge=0)
    """Tasks per second each user may submit, on average; 0: no limit. Tasks beyond it
    are refused (code ``rate_limited``) and the Python client resends them later."""
    submit_burst: int = Field(0, alias="SUBMIT_BURST", ge=0)
    """Tasks a user may submit at once above SUBMIT_RATE (0: MAX_BATCH)."""
    pipeline_window_max: int = Field(128, alias="PIPELINE_WINDOW_MAX", ge=0, le=512)
    """Most tasks a node holds per slot beyond its running ones (0: no pipelining). The
    window of a node is sized from its recent runtimes and the time a refill takes (the
    dispatch round trip and the balancer's part, measured), and holds at most 512 tasks
    (and 1 MiB of tasks) over all the node's slots, yet one a slot at least."""
    pipeline_long_s: float = Field(0.5, alias="PIPELINE_LONG_S", gt=0)
    """A node whose recent tasks run this long gets no window (nothing to gain)."""
    speculate: bool = Field(True, alias="SPECULATE")
    """Start speculative copies of stragglers on idle faster slots (tasks opt out with
    ``speculate=false``); false: never."""
    node_timeout_s: float = Field(5.0, alias="NODE_TIMEOUT_S", gt=0)
    """A node silent for this long is considered dead (its will covers dropped links)."""
    journal_path: str = Field("auto", alias="JOURNAL_PATH")
    """The balancer's task journal (see JOURNAL_FORMAT): ``auto`` = one file per broker and
    prefix under ``$XDG_STATE_HOME/lbmqtt/`` (``~/.local/state/lbmqtt/``); ``none`` = no
    journal (tasks do not survive a balancer restart); else a file path."""
    journal_sync: Literal["normal", "full"] = Field("normal", alias="JOURNAL_SYNC")
    """``normal`` survives a killed balancer; ``full`` also a power cut (an fsync per
    group commit)."""
    journal_format: Literal["sqlite", "log"] = Field("log", alias="JOURNAL_FORMAT")
    """How a new journal is written: ``sqlite`` (a row per task, rewritten at each change)
    or ``log`` (appended, compacted now and then: less work per change). A journal that
    exists is read and written in the format it has."""

    # -- node -----------------------------------------------------------------------------
    wkhub_workers: list[WorkerGroup] = Field(default_factory=_default_groups, alias="WKHUB_WORKERS")
    node_name: str | None = Field(None, alias="NODE_NAME", pattern=NAME_PATTERN)
    """Unique name of this node on the LAN (default: its BROKER_USERNAME, else the host
    name). With accounts, a node's name is its login."""
    node_tasks: list[str] = Field(default_factory=list, alias="NODE_TASKS")
    """Task modules the node loads: dotted module names or .py paths (relative to the file)."""
    node_speed: float = Field(1.0, alias="NODE_SPEED", gt=0)
    """Relative speed of this machine (used by placement; 2.0 = twice as fast)."""
    node_resources: dict[str, float] = Field(default_factory=dict, alias="NODE_RESOURCES")
    """Counted resources of this node, e.g. ``{"gpu": 2}``; ``cores`` and ``memory_mb``
    default to the machine's."""
    node_tags: list[str] = Field(default_factory=list, alias="NODE_TAGS")
    """Tags of this node, e.g. ``["avx2", "cuda12"]``; a task's ``tags`` must all be here."""
    heartbeat_s: float = Field(1.0, alias="HEARTBEAT_S", gt=0)
    node_drain_s: float = Field(10.0, alias="NODE_DRAIN_S", ge=0)
    """On SIGTERM/Ctrl-C a node takes no more work and lets its running tasks finish for at
    most this long (a second signal: at once); what it has not started goes back."""
    result_resend_s: float = Field(3.0, alias="RESULT_RESEND_S", gt=0)
    """A node resends a result the balancer has not acknowledged after this long."""

    # -- client ---------------------------------------------------------------------------
    client_user: str | None = Field(None, alias="CLIENT_USER", pattern=NAME_PATTERN)
    """User name the client submits as (default: BROKER_USERNAME, else the login name).
    With accounts, a user's name is its login."""
    client_ack_timeout_s: float = Field(30.0, alias="CLIENT_ACK_TIMEOUT_S", gt=0)
    """How long a client waits for the balancer to acknowledge a request."""
    connect_timeout_s: float = Field(10.0, alias="CONNECT_TIMEOUT_S", gt=0)
    """How long a client waits for the broker at start-up before giving up."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", alias="LOG_LEVEL")

    @field_validator("node_resources")
    @classmethod
    def _resources_are_counted(cls, v: dict[str, float]) -> dict[str, float]:
        for key, amount in v.items():
            if not re.match(RESOURCE_PATTERN, key):
                raise ValueError(f"resource name {key!r}: letters, digits and _.- only")
            if not (0 <= amount < float("inf")):
                raise ValueError(f"resource {key!r}: amount must be a finite number >= 0")
        return v

    @field_validator("node_tags")
    @classmethod
    def _tags_are_names(cls, v: list[str]) -> list[str]:
        for tag in v:
            if not re.match(RESOURCE_PATTERN, tag):
                raise ValueError(f"tag {tag!r}: letters, digits and _.- only")
        return v

    # where the settings came from (not a key of the file)
    source: str = Field("defaults", exclude=True)

    @property
    def password(self) -> str | None:
        """BROKER_PASSWORD, else the first line of BROKER_PASSWORD_FILE."""
        if self.broker_password is not None or not self.broker_password_file:
            return self.broker_password
        try:
            with open(os.path.expanduser(self.broker_password_file), encoding="utf-8") as f:
                return f.readline().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"BROKER_PASSWORD_FILE {self.broker_password_file}: {exc}") from exc

    @property
    def tls_listener(self) -> bool:
        """The embedded broker serves TLS (BROKER_TLS_CERT and BROKER_TLS_KEY are set)."""
        return bool(self.broker_tls_cert and self.broker_tls_key)

    @property
    def bind_host(self) -> str:
        """Address the embedded broker listens on."""
        if self.broker_bind:
            return self.broker_bind
        return "0.0.0.0" if self.broker_host == "auto" else self.broker_host  # noqa: S104

    @property
    def tls_bind_host(self) -> str:
        """Address the embedded broker's TLS listener listens on: BROKER_BIND when set, else
        every address (a certificate is for clients on other machines)."""
        return self.broker_bind or "0.0.0.0"  # noqa: S104

    def with_overrides(self, **values: Any) -> Settings:
        """Return a copy with some settings replaced (keys are field names), validated."""
        data = self.model_dump(by_alias=False)
        data.update(values)
        data["source"] = self.source
        try:
            return Settings.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_format_validation_error(self.source, exc)) from exc


PATH_KEYS: tuple[str, ...] = (
    "AUTH_FILE",
    "BROKER_PASSWORD_FILE",
    "BROKER_CA_FILE",
    "BROKER_TLS_CERT",
    "BROKER_TLS_KEY",
)

SERVICE_ACCOUNTS_ENV = "LBMQTT_SERVICE_ACCOUNTS"
"""Accounts ``lbmqtt up`` gives the embedded broker for the parts it starts (JSON
``{name: [role, password]}``), so that they need no entry in the accounts file."""


def service_accounts(env: Mapping[str, str] | None = None) -> dict[str, tuple[str, str]]:
    raw = (os.environ if env is None else env).get(SERVICE_ACCOUNTS_ENV)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
        return {str(k): (str(v[0]), str(v[1])) for k, v in data.items()}
    except (ValueError, TypeError, IndexError, AttributeError) as exc:
        raise ConfigError(
            f"{SERVICE_ACCOUNTS_ENV}: not a JSON object of name: [role, password]"
        ) from exc


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; a wildcard (``0.0.0.0``) is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


ALIASES: dict[str, str] = {
    f.alias: name for name, f in Settings.model_fields.items() if f.alias is not None
}


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _format_validation_error(source: str, exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = _format_loc(tuple(err["loc"]))
    if err["type"] == "extra_forbidden":
        key = str(err["loc"][-1])
        candidates = (
            list(ALIASES) if len(err["loc"]) == 1 else ["nWorkers", "minP", "maxP", "processP"]
        )
        close = difflib.get_close_matches(key, candidates, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{source}: unknown key {loc!r}{hint}"
    value = err.get("input")
    shown = json.dumps(value)[:60] if _jsonable(value) else repr(value)[:60]
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{source}: {loc or 'file'}: {err['msg']} (got {shown}){more}"


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such parameters file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read parameters file: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object of KEY: value")
    return data


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX) :]
        if name not in ALIASES:
            continue  # LBMQTT_* variables of other tools or later versions are not ours
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        field = Settings.model_fields[ALIASES[name]]
        if isinstance(value, (int, float, bool)) and field.annotation in (str, str | None):
            value = raw  # e.g. LBMQTT_NODE_NAME=007 stays a string
        out[name] = value
    return out


def _resolve_task_paths(items: list[Any], base: Path) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if isinstance(item, str) and (item.endswith(".py") or "/" in item):
            p = Path(item).expanduser()
            out.append(str(p if p.is_absolute() else (base / p).resolve()))
        else:
            out.append(item)
    return out


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Load settings from a parameters file, the environment and explicit overrides.

    Args:
        path: a parameters.json; ``None`` means ``./parameters.json`` if it exists, else
            built-in defaults.
        env: environment to read ``LBMQTT_<KEY>`` overrides from (default ``os.environ``).
        overrides: final overrides keyed by UPPER_CASE key (e.g. from command-line flags).

    Returns:
        The validated, frozen settings.

    Raises:
        ConfigError: the file is missing, not JSON, has an unknown key or a bad value.
    """
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    source = "defaults"
    base = Path.cwd()
    if path is None and Path(DEFAULT_FILE).is_file():
        path = DEFAULT_FILE
    if path is not None:
        p = Path(path)
        source = str(p)
        base = p.resolve().parent
        data = _read_file(p)
        # keys starting with "_" are comments (JSON has none): "_about": "..."
        data = {k: v for k, v in data.items() if not k.startswith("_")}
        _translate_old_keys(data, source, str(p.resolve()))
        if "NODE_TASKS" in data and isinstance(data["NODE_TASKS"], list):
            data["NODE_TASKS"] = _resolve_task_paths(data["NODE_TASKS"], base)
        for key in PATH_KEYS:  # relative to the file, like NODE_TASKS
            if isinstance(data.get(key), str):
                data[key] = str((base / Path(data[key]).expanduser()).resolve())
    env_values = _env_overrides(env)
    if "NODE_TASKS" in env_values and isinstance(env_values["NODE_TASKS"], list):
        env_values["NODE_TASKS"] = _resolve_task_paths(env_values["NODE_TASKS"], Path.cwd())
    if env_values:
        source_env = ", ".join(f"{ENV_PREFIX}{k}" for k in sorted(env_values))
        data.update(env_values)
        source = f"{source} (+ {source_env})"
    if overrides:
        data.update({k: v for k, v in overrides.items() if v is not None})
    data["source"] = source
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(source, exc)) from exc


def coerce_settings(parameters: Settings | str | os.PathLike[str] | None) -> Settings:
    """Accept what the public API accepts for ``parameters``: settings, a file, or None."""
    if isinstance(parameters, Settings):
        return parameters
    return load_settings(parameters)
