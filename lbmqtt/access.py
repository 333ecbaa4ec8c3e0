"""Accounts, roles and the topic rules the broker enforces (embedded amqtt and Mosquitto).

Identity comes from the broker login: a user's topics are ``users/{login}/...`` and a
node's ``nodes/{login}/...``, so one set of rules, derived here from the topic table of
:mod:`lbmqtt.protocol.topics` (who publishes and who reads each topic) and written with
Mosquitto's ``%u`` (login) and ``%c`` (client id) patterns, says who may publish and
subscribe where.
The embedded broker evaluates them directly (:class:`AccessGuard`); for Mosquitto,
:func:`mosquitto_acl` renders them into an ``acl_file``.

The accounts file *is* a Mosquitto password file: ``NAME:$7$ITERATIONS$SALT$HASH`` lines
(PBKDF2-HMAC-SHA512, the format ``mosquitto_passwd`` writes), each preceded by a comment
``# role: ROLE`` that Mosquitto skips. So Mosquitto's ``password_file`` can point at the
same file the embedded broker reads, and a hash written by either tool works in both.

Roles (:data:`ROLES`):

``user``
    submits, cancels, acknowledges and queries its own tasks; reads its own task states,
    results, events and errors, and the balancer's status and stats.
``node``
    reads its own assignments; publishes its own status, heartbeats and reports.
``monitor``
    reads the balancer's status, stats and history and the nodes' status (the dashboard,
    ``lbmqtt status``); its only publish is its presence on ``dashboard/status``, which
    asks the balancer for the chart history (at most once a second).
``balancer``
    everything under the topic prefix.

Every role may also use ``probe/%c`` (its own client id): the retained-message probe of
:func:`lbmqtt.health.read_retained`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import tempfile
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from .errors import ConfigError
from .protocol import NAME_RE, ROLES, TOPICS, Role, TopicSpec
from .protocol.topics import NAMESPACES, OWN_PARAM, OWNER

__all__ = [
    "NAME_RE",
    "PBKDF2_ITERATIONS",
    "ROLES",
    "RULES",
    "AccessGuard",
    "Account",
    "Action",
    "Role",
    "allowed",
    "check_name",
    "check_role",
    "filter_within",
    "hash_password",
    "mosquitto_acl",
    "mosquitto_conf_snippet",
    "new_password",
    "read_accounts",
    "render",
    "verify_password",
    "write_accounts",
]

log = logging.getLogger(__name__)

Action = Literal["publish", "subscribe", "retain"]


def _rules_of(role: Role) -> dict[Action, tuple[str, ...]]:
    """A role's rules, from :data:`~lbmqtt.protocol.TOPICS`: it publishes the topics whose
    publishers hold it, subscribes to those whose subscribers do, retains on the retained
    ones it publishes. ``{user}``/``{node}`` becomes ``%u`` where it is the role's own
    (:data:`~lbmqtt.protocol.topics.OWN_PARAM`), else ``+``; ``{client}`` becomes ``%c``.
    A role granted every topic of a namespace (:data:`~lbmqtt.protocol.topics.NAMESPACES`)
    is granted the namespace with ``#``; the :data:`~lbmqtt.protocol.topics.OWNER`, ``#``."""
    if role == OWNER:
        return {"publish": ("#",), "subscribe": ("#",), "retain": ("#",)}
    own = OWN_PARAM.get(role)

    def render(pattern: str) -> str:
        levels = pattern.split("/")
        for i, level in enumerate(levels):
            if level.startswith("{"):
                param = level[1:-1]
                levels[i] = "%u" if param == own else "%c" if param == "client" else "+"
        return "/".join(levels)

    def granted(specs: list[TopicSpec]) -> tuple[str, ...]:
        out: list[str] = []
        for spec in specs:
            ns = next((n for n in NAMESPACES if spec.pattern.startswith(n + "/")), None)
            members = [s for s in TOPICS if ns is not None and s.pattern.startswith(ns + "/")]
            if ns is not None and all(m in specs for m in members):
                rule = render(ns) + "/#"
            else:
                rule = render(spec.pattern)
            if rule not in out:
                out.append(rule)
        return tuple(out)

    return {
        "publish": granted([s for s in TOPICS if role in s.publishers]),
        "subscribe": granted([s for s in TOPICS if role in s.subscribers]),
        "retain": granted([s for s in TOPICS if s.retained and role in s.publishers]),
    }


#: Topic rules per role, relative to the topic prefix, derived from the topic table of
#: :mod:`lbmqtt.protocol.topics`. ``%u`` is the login, ``%c`` the client id. "subscribe"
#: also covers receiving: a filter is granted only if every topic it can match is
#: readable, so a granted subscription never delivers a forbidden topic. "retain": where
#: a publish may carry the retain flag (elsewhere it is dropped: a retained message would
#: stay in the broker's memory for good). Mosquitto's ACL has no such rule; see README.
RULES: Final[dict[Role, dict[Action, tuple[str, ...]]]] = {r: _rules_of(r) for r in ROLES}

PBKDF2_ITERATIONS: Final = 100_000
"""Iterations of new hashes: ~90 ms to verify on a 2-core machine (Mosquitto pays it on
its only thread per CONNECT, the embedded broker in a worker thread)."""


# ------------------------------------------------------------------------------ passwords


def hash_password(
    password: str, *, iterations: int = PBKDF2_ITERATIONS, salt: bytes | None = None
) -> str:
    """A Mosquitto ``$7$`` hash (PBKDF2-HMAC-SHA512, 12-byte salt, 64-byte key)."""
    salt = os.urandom(12) if salt is None else salt
    key = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    """True if ``password`` matches a ``$7$`` hash. Slow on purpose: call it off the loop
    (hashlib releases the GIL while it works)."""
    try:
        _, seven, iterations, salt, key = hashed.split("$")
        if seven != "7":
            return False
        n = int(iterations)
        if not 1 <= n <= 10_000_000:
            return False
        want = base64.b64decode(key, validate=True)
        got = hashlib.pbkdf2_hmac(
            "sha512",
            password.encode(errors="surrogateescape"),
            base64.b64decode(salt, validate=True),
            n,
            len(want),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


# ------------------------------------------------------------------------------ accounts


@dataclass(frozen=True)
class Account:
    name: str
    role: Role
    hash: str


def check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise ConfigError(
            f"account name {name!r}: 1-64 letters, digits and _.- (not first "
            f".-); it becomes a topic level"
        )


def check_role(role: str) -> Role:
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    return role


def read_accounts(path: str | os.PathLike[str]) -> dict[str, Account]:
    """The accounts of a file (see the module docstring).

    Raises:
        ConfigError: the file cannot be read, or a line is malformed (named by number).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{p}: no such accounts file (create it with "
            f"`lbmqtt user add NAME --role ROLE --file {p}`)"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read the accounts file: {exc}") from exc
    accounts: dict[str, Account] = {}
    role: str | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            m = re.match(r"^#\s*role:\s*(\S+)\s*$", line)
            if m:
                role = m.group(1)
            continue
        name, sep, hashed = line.partition(":")
        if not sep or not NAME_RE.match(name) or not hashed.startswith("$7$"):
            raise ConfigError(
                f"{p}:{number}: expected NAME:$7$... (a Mosquitto password "
                f"line written by `lbmqtt user add`)"
            )
        if role not in ROLES:
            raise ConfigError(
                f"{p}:{number}: account {name!r} has no '# role: ROLE' line "
                f"above it (one of {', '.join(ROLES)})"
            )
        accounts[name] = Account(name, check_role(role), hashed)
        role = None
    return accounts


def write_accounts(path: str | os.PathLike[str], accounts: Iterable[Account]) -> None:
    """Write the accounts file atomically: a new one readable by its owner only, an
    existing one keeping its mode and group (e.g. 0640 root:mosquitto, for Mosquitto)."""
    p = Path(path)
    lines = [
        "# lbmqtt accounts: a Mosquitto password file; each account's role is on",
        "# the comment line above it. Manage it with `lbmqtt user add/remove/list`.",
    ]
    for a in sorted(accounts, key=lambda a: a.name):
        lines += [f"# role: {a.role}", f"{a.name}:{a.hash}"]
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        try:
            st = p.stat()
        except FileNotFoundError:
            os.chmod(tmp, 0o600)
        else:
            os.chmod(tmp, stat.S_IMODE(st.st_mode))
            with contextlib.suppress(OSError):
                os.chown(tmp, -1, st.st_gid)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_password() -> str:
    """A random password for an account nobody types (a node, the balancer)."""
    return secrets.token_urlsafe(18)


# ------------------------------------------------------------------------------ rules


def render(pattern: str, prefix: str, login: str, client_id: str) -> str | None:
    """A rule with ``%u`` / ``%c`` filled in, under the prefix; None if the value could
    widen it (a wildcard or ``/`` in a login or client id)."""
    for value, mark in ((login, "%u"), (client_id, "%c")):
        if mark in pattern and (not value or any(ch in value for ch in "/+#")):
            return None
    return f"{prefix}/" + pattern.replace("%u", login).replace("%c", client_id)


def filter_within(requested: str, allowed: str) -> bool:
    """True if every topic ``requested`` (a topic or filter) can match also matches
    ``allowed``: a client cannot widen its access with a wildcard."""
    req = requested.split("/")
    alw = allowed.split("/")
    for i, a in enumerate(alw):
        if a == "#":
            return True
        if i >= len(req):
            return False
        r = req[i]
        if r == "#":
            return False
        if a not in ("+", r):
            return False
    return len(req) == len(alw)


def allowed(
    role: Role, action: Action, topic: str, *, prefix: str, login: str, client_id: str
) -> bool:
    """May a ``role`` logged in as ``login`` with ``client_id`` publish on (or subscribe
    to) ``topic``?"""
    if topic.startswith("$"):
        return False
    for pattern in RULES[role][action]:
        rule = render(pattern, prefix, login, client_id)
        if rule is not None and filter_within(topic, rule):
            return True
    return False


def mosquitto_acl(accounts: Iterable[Account], prefix: str) -> str:
    """The Mosquitto ``acl_file`` for these accounts: the same :data:`RULES`.

    Mosquitto applies ``pattern`` lines to every login whatever its role, so a pattern
    like ``nodes/%u/reports`` would let the user ``alice`` act as a node named ``alice``.
    The role rules are therefore written per account (``user NAME`` blocks, ``%u``
    filled in); only the role-independent ``%c`` rules (``probe/%c``) stay patterns.
    """
    out = [
        "# Generated by lbmqtt from its accounts file: do not edit; run",
        "# `lbmqtt user mosquitto` again after adding or removing accounts.",
        *(f"pattern {mode} {prefix}/{p}" for p, mode in _client_patterns()),
        "",
    ]
    for a in sorted(accounts, key=lambda a: a.name):
        out.append(f"# role: {a.role}")
        out.append(f"user {a.name}")
        rules = RULES[a.role]  # ("retain" has no Mosquitto equivalent)
        pubs = [p for p in rules["publish"] if "%c" not in p]
        subs = [p for p in rules["subscribe"] if "%c" not in p]
        for p in sorted(set(pubs) | set(subs)):
            out.append(f"topic {_mode(p in pubs, p in subs)} {prefix}/{p.replace('%u', a.name)}")
        out.append("")
    return "\n".join(out)


def _mode(write: bool, read: bool) -> str:
    return "readwrite" if write and read else "write" if write else "read"


def _client_patterns() -> tuple[tuple[str, str], ...]:
    """The ``%c`` rules and their Mosquitto mode. A Mosquitto ``pattern`` applies to every
    login, so every role must hold them alike (the owner does through its ``#``)."""
    roles = [r for r in ROLES if r != OWNER]
    modes: dict[str, set[str]] = {}
    holders: dict[str, set[Role]] = {}
    for role in roles:
        pubs, subs = RULES[role]["publish"], RULES[role]["subscribe"]
        for p in {*pubs, *subs}:
            if "%c" in p:
                modes.setdefault(p, set()).add(_mode(p in pubs, p in subs))
                holders.setdefault(p, set()).add(role)
    for p, held in holders.items():
        if len(held) < len(roles) or len(modes[p]) > 1:
            raise AssertionError(f"{p}: the roles differ on it; a Mosquitto pattern cannot")
    return tuple(sorted((p, mode) for p, (mode,) in modes.items()))


def mosquitto_conf_snippet(accounts_file: str, acl_file: str, plugin: str | None = None) -> str:
    out = f"allow_anonymous false\npassword_file {accounts_file}\nacl_file {acl_file}\n"
    if plugin:
        out += f"plugin {plugin}\nplugin_opt_acl_file {acl_file}\n"
    return out


MOSQUITTO_PLUGIN_SOURCE = Path(__file__).parent / "broker" / "mosquitto_plugin.c"
"""lbmqtt's Mosquitto plugin (C, plugin API v5): forbidden subscriptions refused in the
SUBACK, client ids bound to the login that holds them, as the embedded broker does."""


def build_mosquitto_plugin(out: str, cc: str | None = None) -> str:
    """Compile :data:`MOSQUITTO_PLUGIN_SOURCE` into the shared object ``out``; returns its
    absolute path. Needs a C compiler and Mosquitto's plugin headers (Debian:
    ``apt install gcc mosquitto-dev libmosquitto-dev``); raises :class:`ConfigError` saying so."""
    import shutil
    import subprocess

    compiler = cc or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise ConfigError(
            "building the Mosquitto plugin needs a C compiler: "
            "apt install gcc mosquitto-dev libmosquitto-dev"
        )
    out = os.path.abspath(out)
    tmp = f"{out}.tmp"
    cmd = [compiler, "-shared", "-fPIC", "-O2", "-o", tmp, str(MOSQUITTO_PLUGIN_SOURCE)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    except OSError as e:
        raise ConfigError(f"{compiler}: {e}") from None
    if r.returncode != 0:
        first = (r.stderr.strip().splitlines() or ["(no output)"])[0]
        hint = " (apt install mosquitto-dev libmosquitto-dev)" if "mosquitto" in r.stderr else ""
        raise ConfigError(f"building the Mosquitto plugin failed{hint}: {first}")
    os.replace(tmp, out)
    return out


# ------------------------------------------------------------------------------ the guard


class AccessGuard:
    """Logins and topic rules for the embedded broker.

    Args:
        prefix: the topic prefix.
        accounts_file: the accounts file (re-read when it changes), or None.
        extra: accounts held in memory only: ``{name: (role, password)}`` (the parts
            ``lbmqtt up`` starts get random ones, so a shared LAN needs no file entry
            for them).
    """

    def __init__(
        self,
        prefix: str,
        accounts_file: str | os.PathLike[str] | None = None,
        extra: Mapping[str, tuple[Role, str]] | None = None,
    ):
        self.prefix = prefix.rstrip("/")
        self.accounts_file = Path(accounts_file) if accounts_file is not None else None
        self._extra = {name: (check_role(role), pw) for name, (role, pw) in (extra or {}).items()}
        self._accounts: dict[str, Account] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._lock = threading.Lock()
        # logins verified since the file last changed: sha256(pepper + password)
        self._pepper = os.urandom(16)
        self._verified: dict[str, bytes] = {}
        self.reload_error: str | None = None
        if self.accounts_file is not None:
            self._reload()

    def _reload(self) -> bool:
        assert self.accounts_file is not None
        try:
            st = self.accounts_file.stat()
        except OSError:
            st = None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size) if st is not None else None
        if stamp == self._stamp:
            return False
        accounts = read_accounts(self.accounts_file)
        with self._lock:
            self._accounts = accounts
            self._verified.clear()
            self._stamp = stamp
        return True

    def refresh(self) -> bool:
        """Re-read the accounts file if it changed; True if it did. A broken file is
        logged (once per error) and the accounts read before stay in force."""
        if self.accounts_file is None:
            return False
        try:
            changed = self._reload()
        except ConfigError as exc:
            if str(exc) != self.reload_error:
                log.error("%s; still using the accounts read before", exc)
            self.reload_error = str(exc)
            return False
        self.reload_error = None
        return changed

    def role_of(self, login: str) -> Role | None:
        extra = self._extra.get(login)
        if extra is not None:
            return extra[0]
        account = self._accounts.get(login)
        return account.role if account is not None else None

    def quick_check(self, login: str | None, password: str | None) -> Role | Literal[False] | None:
        """What can be decided without hashing, on the caller's thread (microseconds):
        the role (a login seen to succeed since the file changed, or one of ``extra``),
        None (refused: no such login), or False (only :meth:`slow_check` can tell)."""
        if not login or password is None:
            return None
        extra = self._extra.get(login)
        if extra is not None:
            return extra[0] if hmac.compare_digest(extra[1].encode(), password.encode()) else None
        self.refresh()
        with self._lock:
            account = self._accounts.get(login)
            seen = self._verified.get(login)
        if account is None:
            return None
        if seen is not None and hmac.compare_digest(seen, self._digest(password)):
            return account.role
        return False

    def slow_check(self, login: str, password: str) -> Role | None:
        """Verify the password hash (~90 ms: in a worker thread)."""
        with self._lock:
            account = self._accounts.get(login)
        if account is None or not verify_password(password, account.hash):
            return None
        with self._lock:
            if self._accounts.get(login) is account:  # (not replaced meanwhile)
                self._verified[login] = self._digest(password)
        return account.role

    def _digest(self, password: str) -> bytes:
        return hashlib.sha256(self._pepper + password.encode(errors="surrogateescape")).digest()

    def in_file(self, login: str) -> bool:
        return login in self._accounts

    def account_key(self, login: str) -> tuple[str, str] | None:
        """What a live connection's rights rest on: (role, password hash); None if the
        login is gone. A change ends the connection (see EmbeddedBroker)."""
        extra = self._extra.get(login)
        if extra is not None:
            return extra[0], "extra"
        account = self._accounts.get(login)
        return (account.role, account.hash) if account is not None else None

    def may(self, role: Role, action: Action, topic: str, login: str, client_id: str) -> bool:
        return allowed(role, action, topic, prefix=self.prefix, login=login, client_id=client_id)
