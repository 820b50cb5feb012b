"""`sos-center user ...`: the operator console's accounts, kept in the centre's store file.

  add USERNAME --role ROLE   a new user (roles: operator, supervisor, auditor; the rights of
                             each are in docs/CONSOLE-API.md)
  passwd USERNAME            a new password; the user's console sessions end
  disable USERNAME           refuse their log-in and end their sessions at once
  enable USERNAME            let them log in again
  list                       every user, role and state

A password is asked twice on a terminal; from a pipe, the first line of stdin is the password
(`printf '%s\\n' "$PW" | sos-center user add alice --role operator`). It is never printed. It
must be at least 12 characters. Each command prints one line per result; a refusal goes to
stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import getpass
import sqlite3
import sys
from collections.abc import Callable
from datetime import UTC, datetime

from control_center.config import CenterConfig
from control_center.web.accounts import (
    MIN_PASSWORD,
    ROLES,
    AccountError,
    Accounts,
    check_password,
    check_role,
    check_username,
    rights_of,
)


def _read_password(username: str) -> str:
    """Twice from the terminal (a typo would lock the user out), else one line from stdin."""
    if sys.stdin is not None and sys.stdin.isatty():
        first = getpass.getpass(f"new password for {username} (at least {MIN_PASSWORD} "
                                f"characters): ")
        check_password(first)  # say so now, not after typing it twice
        if getpass.getpass("the same password again: ") != first:
            raise AccountError("the two passwords differ: nothing changed, try again")
        return first
    line = sys.stdin.readline() if sys.stdin is not None else ""
    if not line:
        raise AccountError("no password on stdin: run it on a terminal, or pipe the password "
                           "as one line")
    return line.removesuffix("\n").removesuffix("\r")


# -- commands ------------------------------------------------------------------------------------
def cmd_add(accounts: Accounts, args: argparse.Namespace) -> None:
    check_username(args.username)
    check_role(args.role)
    if accounts.user(args.username) is not None:  # before asking for a password in vain
        raise AccountError(f"user '{args.username}' already exists (change the password: "
                           f"sos-center user passwd {args.username})")
    user = accounts.add(args.username, args.role, _read_password(args.username))
    print(f"added {user.username} ({user.role}: {', '.join(_rights(user.role))}); they can log "
          f"in to the console now")


def cmd_passwd(accounts: Accounts, args: argparse.Namespace) -> None:
    accounts.known(args.username)
    ended = accounts.set_password(args.username, _read_password(args.username))
    print(f"password of {args.username} changed; {ended} console session(s) ended")


def cmd_disable(accounts: Accounts, args: argparse.Namespace) -> None:
    ended = accounts.disable(args.username)
    print(f"disabled {args.username}: log-in refused, {ended} console session(s) ended")


def cmd_enable(accounts: Accounts, args: argparse.Namespace) -> None:
    accounts.enable(args.username)
    print(f"enabled {args.username}: they can log in again with their password")


def cmd_list(accounts: Accounts, args: argparse.Namespace) -> None:
    users = accounts.list()
    if not users:
        print("no console users yet (add one: sos-center user add NAME --role operator)")
    for user in users:
        created = datetime.fromtimestamp(user.created_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        print(f"{user.username:<32} {user.role:<10} "
              f"{'disabled' if user.disabled else 'enabled':<8} created {created}")


def _rights(role: str) -> list[str]:
    """In the order of the table in docs/CONSOLE-API.md."""
    return [r for r in ("view", "act", "evidence", "export") if r in rights_of(role)]


# -- wiring --------------------------------------------------------------------------------------
COMMANDS: dict[str, Callable[[Accounts, argparse.Namespace], None]] = {
    "add": cmd_add, "passwd": cmd_passwd, "disable": cmd_disable, "enable": cmd_enable,
    "list": cmd_list,
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `user` and its commands to `sos-center`'s subcommands."""
    user = sub.add_parser("user", help="the operator console's accounts (in the centre's store)",
                          description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = user.add_subparsers(dest="user_action", required=True, metavar="USER_COMMAND")
    p = cmds.add_parser("add", help="add a user (asks for the password)")
    p.add_argument("username", metavar="USERNAME")
    p.add_argument("--role", required=True, choices=ROLES)
    for name, text in (("passwd", "set a user's password (ends their sessions)"),
                       ("disable", "refuse a user's log-in and end their sessions"),
                       ("enable", "let a disabled user log in again")):
        cmds.add_parser(name, help=text).add_argument("username", metavar="USERNAME")
    cmds.add_parser("list", help="list users, roles and whether they are disabled")


def run(args: argparse.Namespace, config: CenterConfig) -> int:
    """Run `sos-center user ...` on the store `config.db`; exit status 2 for a refusal, with the
    reason on stderr."""
    try:
        with Accounts(config.db) as accounts:
            COMMANDS[args.user_action](accounts, args)
    except AccountError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.Error) as exc:
        print(f"error: cannot use the store {config.db}: {exc} (check center.db in the config "
              f"and that you run as the centre's user)", file=sys.stderr)
        return 2
    except (EOFError, KeyboardInterrupt):
        print("error: no password given: nothing changed", file=sys.stderr)
        return 2
    return 0
