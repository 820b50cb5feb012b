"""`sos-center user ...`: console accounts in the centre's store, as an administrator runs it."""

from __future__ import annotations

import argparse
import io
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from control_center import user_cli
from control_center.config import CenterConfig, load_center_config
from control_center.web.accounts import Accounts

PASSWORD = "correct horse battery"
T0 = 1_764_770_000.0


@pytest.fixture
def config(tmp_path: Path) -> CenterConfig:
    path = tmp_path / "center.toml"
    path.write_text('[center]\ndb = "store/centre.sqlite"\nfleet_dir = "fleet"\n'
                    '[broker]\nhost = "localhost"\nport = 8883\nca_file = "ca.pem"\n')
    return load_center_config(path)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def run(config: CenterConfig, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[int, str, str]]:
    """`sos-center user ARGV` with `stdin` piped in (text, or a stand-in for a terminal):
    (exit status, stdout, stderr)."""
    parser = argparse.ArgumentParser(prog="sos-center")
    user_cli.add_parser(parser.add_subparsers(dest="action", required=True))

    def running(*argv: str, stdin: str | io.StringIO = "") -> tuple[int, str, str]:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin) if isinstance(stdin, str) else stdin)
        status = user_cli.run(parser.parse_args(["user", *argv]), config)
        out, err = capsys.readouterr()
        return status, out, err
    return running


def test_add_reads_the_password_from_stdin_and_the_user_can_log_in(run, config) -> None:
    status, out, err = run("add", "alice", "--role", "operator", stdin=PASSWORD + "\n")
    assert (status, err) == (0, "")
    assert out == ("added alice (operator: view, act, evidence); they can log in to the console "
                   "now\n")
    with Accounts(config.db) as accounts:
        session = accounts.login("alice", PASSWORD, T0)
    assert session is not None and session.role == "operator"


def test_the_accounts_are_in_the_centres_store_file(run, config) -> None:
    run("add", "alice", "--role", "auditor", stdin=PASSWORD + "\n")
    assert config.db == config.db.parent / "centre.sqlite" and config.db.exists()
    with sqlite3.connect(config.db) as db:
        assert db.execute("SELECT username, role FROM console_users").fetchall() == [
            ("alice", "auditor")]


def test_the_password_is_never_printed(run) -> None:
    status, out, err = run("add", "alice", "--role", "supervisor", stdin=PASSWORD + "\n")
    assert status == 0 and PASSWORD not in out + err


def test_list_shows_each_user_role_and_state(run) -> None:
    run("add", "bob", "--role", "auditor", stdin=PASSWORD + "\n")
    run("add", "alice", "--role", "supervisor", stdin=PASSWORD + "\n")
    run("disable", "bob")
    status, out, _ = run("list")
    lines = out.splitlines()
    assert status == 0 and len(lines) == 2
    assert lines[0].split()[:3] == ["alice", "supervisor", "enabled"]
    assert lines[1].split()[:3] == ["bob", "auditor", "disabled"]


def test_list_with_no_users_says_how_to_add_one(run) -> None:
    status, out, _ = run("list")
    assert status == 0 and "sos-center user add" in out


def test_disable_refuses_log_in_and_ends_sessions(run, config) -> None:
    run("add", "alice", "--role", "operator", stdin=PASSWORD + "\n")
    with Accounts(config.db) as accounts:
        session = accounts.login("alice", PASSWORD, T0)
        assert session is not None
        status, out, _ = run("disable", "alice")
        assert status == 0
        assert out == "disabled alice: log-in refused, 1 console session(s) ended\n"
        assert accounts.session(session.token, T0) is None
        assert accounts.login("alice", PASSWORD, T0) is None


def test_enable_lets_a_disabled_user_log_in_again(run, config) -> None:
    run("add", "alice", "--role", "operator", stdin=PASSWORD + "\n")
    run("disable", "alice")
    status, out, _ = run("enable", "alice")
    assert status == 0 and out.startswith("enabled alice")
    with Accounts(config.db) as accounts:
        assert accounts.login("alice", PASSWORD, T0) is not None


def test_passwd_sets_a_new_password_and_ends_sessions(run, config) -> None:
    run("add", "alice", "--role", "operator", stdin=PASSWORD + "\n")
    with Accounts(config.db) as accounts:
        session = accounts.login("alice", PASSWORD, T0)
        assert session is not None
        status, out, _ = run("passwd", "alice", stdin="a brand new passphrase\n")
        assert status == 0
        assert out == "password of alice changed; 1 console session(s) ended\n"
        assert accounts.session(session.token, T0) is None
        assert accounts.login("alice", PASSWORD, T0) is None
        assert accounts.login("alice", "a brand new passphrase", T0) is not None


def test_a_short_password_is_refused_with_the_rule(run) -> None:
    status, out, err = run("add", "alice", "--role", "operator", stdin="short\n")
    assert (status, out) == (2, "")
    assert err.startswith("error: password too short") and "at least 12 characters" in err
    assert err.count("\n") == 1
    assert "no console users" in run("list")[1]


def test_a_duplicate_user_is_refused(run) -> None:
    run("add", "alice", "--role", "operator", stdin=PASSWORD + "\n")
    status, out, err = run("add", "alice", "--role", "auditor", stdin=PASSWORD + "\n")
    assert (status, out) == (2, "")
    assert err == ("error: user 'alice' already exists (change the password: sos-center user "
                   "passwd alice)\n")


def test_a_bad_user_name_is_refused(run) -> None:
    status, _, err = run("add", "Alice", "--role", "operator", stdin=PASSWORD + "\n")
    assert status == 2 and "user name 'Alice'" in err and err.count("\n") == 1


@pytest.mark.parametrize("action", ["passwd", "disable", "enable"])
def test_an_unknown_user_is_refused(run, action: str) -> None:
    status, out, err = run(action, "nobody", stdin=PASSWORD + "\n")
    assert (status, out) == (2, "")
    assert err == "error: no user 'nobody' (see: sos-center user list)\n"


def test_an_empty_stdin_is_refused(run) -> None:
    status, _, err = run("add", "alice", "--role", "operator", stdin="")
    assert status == 2 and "no password on stdin" in err


def test_a_role_that_does_not_exist_is_refused_by_the_parser(run) -> None:
    with pytest.raises(SystemExit) as refused:
        run("add", "alice", "--role", "admin", stdin=PASSWORD + "\n")
    assert refused.value.code == 2


def test_on_a_terminal_the_password_is_asked_twice(run, config, monkeypatch) -> None:
    answers = iter([PASSWORD, PASSWORD])
    prompts: list[str] = []
    monkeypatch.setattr("getpass.getpass", lambda prompt: prompts.append(prompt) or next(answers))
    status, out, _ = run("add", "alice", "--role", "operator", stdin=Terminal())
    assert status == 0 and out.startswith("added alice")
    assert len(prompts) == 2 and "at least 12 characters" in prompts[0]
    with Accounts(config.db) as accounts:
        assert accounts.login("alice", PASSWORD, T0) is not None


def test_on_a_terminal_two_different_passwords_change_nothing(run, config, monkeypatch) -> None:
    answers = iter([PASSWORD, PASSWORD + "x"])
    monkeypatch.setattr("getpass.getpass", lambda prompt: next(answers))
    status, _, err = run("add", "alice", "--role", "operator", stdin=Terminal())
    assert status == 2 and "the two passwords differ" in err
    with Accounts(config.db) as accounts:
        assert accounts.list() == []
