"""``lbmqtt user``: the accounts file (AUTH_FILE) and Mosquitto's ACL made from it."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .cli import Exit
from .config import Settings
from .errors import ConfigError

USER_HELP = "manage the accounts file (AUTH_FILE): logins, passwords and roles"
USER_EPILOG = (
    "examples:\n  lbmqtt user add alice --role user --file accounts\n"
    "  lbmqtt user add gpu-box --role node --generate --file accounts  # prints it\n"
    '  echo "$PW" | lbmqtt user add bob --role user --password-stdin\n'
    "  lbmqtt user list\n  lbmqtt user remove bob\n"
    "  lbmqtt user mosquitto      # writes ACCOUNTS.acl for Mosquitto's acl_file\n"
    "  lbmqtt user mosquitto --plugin  # and builds lbmqtt's Mosquitto plugin\n\n"
    "roles: user (its own tasks), node (its own assignments and reports),\n"
    "monitor (reads stats: the dashboard, lbmqtt status), balancer (everything)"
)


def add_user_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``lbmqtt user``."""
    p.add_argument("action", choices=["add", "remove", "list", "mosquitto"])
    p.add_argument("name", nargs="?", help="account name (= user or node name)")
    p.add_argument(
        "--role",
        choices=["user", "node", "monitor", "balancer"],
        help="with add: what the account may do",
    )
    p.add_argument("--file", metavar="FILE", help="accounts file (default AUTH_FILE)")
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="with add: read the password from stdin (else asked on a terminal, "
        "or generated and printed once)",
    )
    p.add_argument(
        "--generate",
        action="store_true",
        help="with add: generate a random password and print it once",
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="with add: replace an existing account (new password or role)",
    )
    p.add_argument(
        "--acl", metavar="FILE", help="with mosquitto: where to write the ACL (default FILE.acl)"
    )
    p.add_argument(
        "--plugin",
        nargs="?",
        const="",
        metavar="SO",
        help="with mosquitto: also build lbmqtt's Mosquitto plugin (forbidden subscriptions "
        "refused in the SUBACK, client ids bound to logins) into SO (default: "
        "lbmqtt_mosquitto.so next to the ACL); needs gcc, mosquitto-dev and libmosquitto-dev",
    )


def cmd_user(ns: argparse.Namespace, s: Settings) -> int:
    """Add, remove or list accounts, or write the Mosquitto ACL (see ``lbmqtt user --help``)."""
    from . import access

    path = ns.file or s.auth_file
    if not path:
        raise ConfigError("which accounts file? give --file FILE or set AUTH_FILE")
    acl_path = ns.acl or f"{path}.acl"
    if ns.action in ("add", "remove") and not ns.name:
        raise ConfigError(f"lbmqtt user {ns.action} NAME: the account name is missing")
    exists = os.path.exists(path)
    accounts = access.read_accounts(path) if exists or ns.action != "add" else {}
    if ns.action == "list":
        for a in sorted(accounts.values(), key=lambda a: a.name):
            print(f"{a.name}\t{a.role}")
        return Exit.OK
    if ns.action == "mosquitto":
        plugin = None
        if ns.plugin is not None:
            where = ns.plugin or os.path.join(os.path.dirname(acl_path), "lbmqtt_mosquitto.so")
            plugin = access.build_mosquitto_plugin(where)
        _write_acl(acl_path, accounts, s.topic_prefix)
        print(
            f"wrote {acl_path}"
            + (f" and {plugin}" if plugin else "")
            + "; in mosquitto.conf:\n"
            + access.mosquitto_conf_snippet(
                os.path.abspath(path), os.path.abspath(acl_path), plugin
            ),
            end="",
        )
        return Exit.OK
    access.check_name(ns.name)
    if ns.action == "remove":
        if ns.name not in accounts:
            raise ConfigError(f"{path}: no account {ns.name!r}")
        del accounts[ns.name]
        access.write_accounts(path, accounts.values())
        print(f"removed {ns.name} from {path}")
    else:
        if not ns.role:
            raise ConfigError(
                "lbmqtt user add NAME --role ROLE: the role is missing "
                "(user, node, monitor or balancer)"
            )
        if ns.name in accounts and not ns.replace:
            raise ConfigError(f"{path}: account {ns.name!r} exists (--replace to change it)")
        generated = False
        if ns.generate:
            password, generated = access.new_password(), True
        elif ns.password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        elif sys.stdin.isatty():
            import getpass

            password = getpass.getpass(f"password for {ns.name}: ")
            if getpass.getpass("again: ") != password:
                raise ConfigError("the passwords differ")
        else:
            password, generated = access.new_password(), True
        if not password:
            raise ConfigError("empty password")
        accounts[ns.name] = access.Account(
            ns.name, access.check_role(ns.role), access.hash_password(password)
        )
        access.write_accounts(path, accounts.values())
        print(f"{'replaced' if exists and ns.replace else 'added'} {ns.name} ({ns.role}) in {path}")
        if generated:
            print(
                f"password: {password}\n(shown once: give it to {ns.name} as "
                f"LBMQTT_BROKER_PASSWORD or in a BROKER_PASSWORD_FILE)"
            )
    if os.path.exists(acl_path):
        _write_acl(acl_path, accounts, s.topic_prefix)
        print(f"updated {acl_path} (send Mosquitto a SIGHUP to reload)")
    return Exit.OK


def _write_acl(path: str, accounts: dict[str, Any], prefix: str) -> None:
    from .access import mosquitto_acl

    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(mosquitto_acl(accounts.values(), prefix))
    os.replace(tmp, path)
