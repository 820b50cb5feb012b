"""The console's accounts and sessions (control_center/web/accounts.py), on a fixed clock."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from control_center.store import Store
from control_center.web.accounts import (
    IDLE_S,
    MAX_AGE_S,
    RIGHTS,
    ROLES,
    TOUCH_EVERY_S,
    AccountError,
    Accounts,
    Session,
    User,
    rights_of,
)

T0 = 1_764_770_000.0
PASSWORD = "correct horse battery"
# argon2id still, at a cost a test suite can afford; the defaults are tested once, below.
FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def accounts(tmp_path: Path, clock: Clock) -> Iterator[Accounts]:
    with Accounts(tmp_path / "centre.sqlite", clock=clock, hasher=FAST) as opened:
        yield opened


@pytest.fixture
def alice(accounts: Accounts) -> User:
    return accounts.add("alice", "operator", PASSWORD)


def login(accounts: Accounts, now: float = T0) -> Session:
    session = accounts.login("alice", PASSWORD, now)
    assert session is not None
    return session


# -- users -----------------------------------------------------------------------------------------
def test_an_added_user_is_listed_enabled_with_its_role(accounts: Accounts) -> None:
    accounts.add("bob", "auditor", PASSWORD)
    accounts.add("alice", "supervisor", PASSWORD)
    assert accounts.list() == [User("alice", "supervisor", False, T0),
                               User("bob", "auditor", False, T0)]


def test_a_duplicate_user_is_refused(accounts: Accounts, alice: User) -> None:
    with pytest.raises(AccountError, match="'alice' already exists"):
        accounts.add("alice", "auditor", "another long password")
    assert accounts.list() == [alice]


def test_a_short_password_is_refused_with_the_rule(accounts: Accounts) -> None:
    with pytest.raises(AccountError, match="at least 12 characters"):
        accounts.add("alice", "operator", "short pass!")  # 11
    assert accounts.list() == []


def test_a_password_of_twelve_characters_is_enough(accounts: Accounts) -> None:
    accounts.add("alice", "operator", "x" * 12)
    assert accounts.login("alice", "x" * 12, T0) is not None


def test_an_overlong_password_is_refused(accounts: Accounts) -> None:
    with pytest.raises(AccountError, match="at most 1024"):
        accounts.add("alice", "operator", "x" * 1025)


@pytest.mark.parametrize("name", ["a", "Alice", "1alice", "al ice", "alice\n", "al/ice",
                                  "a" * 33, ""])
def test_a_bad_user_name_is_refused(accounts: Accounts, name: str) -> None:
    with pytest.raises(AccountError, match="lower-case letters"):
        accounts.add(name, "operator", PASSWORD)


@pytest.mark.parametrize("name", ["al", "j.smith", "op_2", "night-shift", "a" * 32])
def test_good_user_names_are_taken(accounts: Accounts, name: str) -> None:
    assert accounts.add(name, "operator", PASSWORD).username == name


def test_a_role_that_does_not_exist_is_refused(accounts: Accounts) -> None:
    with pytest.raises(AccountError, match="role 'admin' does not exist: use one of operator, "
                                           "supervisor, auditor"):
        accounts.add("alice", "admin", PASSWORD)


@pytest.mark.parametrize("action", ["set_password", "disable", "enable"])
def test_changing_an_unknown_user_is_refused(accounts: Accounts, action: str) -> None:
    args = ("nobody", PASSWORD) if action == "set_password" else ("nobody",)
    with pytest.raises(AccountError, match="no user 'nobody'"):
        getattr(accounts, action)(*args)


def test_account_errors_are_value_errors_of_one_line(accounts: Accounts) -> None:
    with pytest.raises(ValueError) as refused:
        accounts.add("Alice", "operator", PASSWORD)
    assert "\n" not in str(refused.value)


# -- rights ----------------------------------------------------------------------------------------
def test_rights_per_role_are_the_console_api_table() -> None:
    """docs/CONSOLE-API.md's table of rights is what the code grants, row for row."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "CONSOLE-API.md").read_text()
    lines = doc.split("## Accounts, roles and rights", 1)[1].split("\n\n")[1].splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[1:4] == list(ROLES)
    granted: dict[str, set[str]] = {role: set() for role in ROLES}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        for role, cell in zip(ROLES, cells[1:4], strict=True):
            if cell == "yes":
                granted[role].add(cells[0])
    assert {role: rights_of(role) for role in ROLES} == granted
    assert set(RIGHTS) == set(ROLES)


def test_rights_of_an_unknown_role_is_refused() -> None:
    with pytest.raises(AccountError, match="role 'root'"):
        rights_of("root")


@pytest.mark.parametrize("role", ROLES)
def test_a_session_carries_its_role_and_rights(accounts: Accounts, role: str) -> None:
    accounts.add("carol", role, PASSWORD)
    session = accounts.login("carol", PASSWORD, T0)
    assert session is not None
    assert (session.username, session.role, session.rights) == ("carol", role, rights_of(role))
    assert accounts.session(session.token, T0) == session


# -- log-in ----------------------------------------------------------------------------------------
def test_the_right_password_logs_in(accounts: Accounts, alice: User) -> None:
    session = login(accounts)
    assert len(session.token) >= 43 and len(session.csrf) >= 43 and session.token != session.csrf
    assert session.expires_at == T0 + IDLE_S


def test_each_log_in_is_a_new_session(accounts: Accounts, alice: User) -> None:
    first, second = login(accounts), login(accounts)
    assert first.token != second.token and first.csrf != second.csrf
    assert accounts.session(first.token, T0) is not None
    assert accounts.session(second.token, T0) is not None


def test_a_wrong_password_does_not_log_in(accounts: Accounts, alice: User) -> None:
    assert accounts.login("alice", PASSWORD + "!", T0) is None
    assert accounts.login("alice", "", T0) is None


def test_an_unknown_user_does_not_log_in(accounts: Accounts, alice: User) -> None:
    assert accounts.login("mallory", PASSWORD, T0) is None
    assert accounts.login("Not A Name", PASSWORD, T0) is None


def test_an_unknown_user_costs_one_password_check_like_a_wrong_password(
        tmp_path: Path) -> None:
    """So the time a refusal takes does not tell which names exist."""
    class Counting(PasswordHasher):
        checks = 0

        def __init__(self) -> None:
            super().__init__(time_cost=1, memory_cost=1024, parallelism=1)

        def verify(self, hash: str | bytes, password: str | bytes) -> bool:
            Counting.checks += 1
            return super().verify(hash, password)

    with Accounts(tmp_path / "c.sqlite", hasher=Counting()) as accounts:
        accounts.add("alice", "operator", PASSWORD)
        for name, password in (("alice", "wrong password!"), ("mallory", PASSWORD),
                               ("Bad Name", PASSWORD), ("alice", "x" * 5000)):
            Counting.checks = 0
            assert accounts.login(name, password, T0) is None
            assert Counting.checks == 1, name


def test_a_disabled_user_does_not_log_in(accounts: Accounts, alice: User) -> None:
    accounts.disable("alice")
    assert accounts.login("alice", PASSWORD, T0) is None
    assert accounts.list() == [User("alice", "operator", True, T0)]


def test_an_enabled_user_logs_in_again_with_the_same_password(accounts: Accounts,
                                                              alice: User) -> None:
    accounts.disable("alice")
    accounts.enable("alice")
    assert accounts.login("alice", PASSWORD, T0) is not None


def test_a_log_in_with_values_that_are_not_text_is_refused(accounts: Accounts,
                                                           alice: User) -> None:
    assert accounts.login(None, PASSWORD, T0) is None  # type: ignore[arg-type]
    assert accounts.login("alice", ["x"], T0) is None  # type: ignore[arg-type]


# -- sessions --------------------------------------------------------------------------------------
def test_an_unknown_token_is_no_session(accounts: Accounts, alice: User) -> None:
    login(accounts)
    assert accounts.session("not-a-token", T0) is None
    assert accounts.session("", T0) is None
    assert accounts.session(None, T0) is None


def test_a_session_unused_for_the_idle_time_ends(accounts: Accounts, alice: User) -> None:
    used, unused = login(accounts), login(accounts)
    assert accounts.session(used.token, T0 + IDLE_S - 1) is not None
    assert accounts.session(unused.token, T0 + IDLE_S) is None
    assert accounts.session(unused.token, T0) is None  # gone for good, not just out of time


def test_using_a_session_keeps_it_alive(accounts: Accounts, alice: User) -> None:
    session = login(accounts)
    used = accounts.session(session.token, T0 + 5 * 3600)
    assert used is not None and used.expires_at == T0 + 5 * 3600 + IDLE_S
    for hour in range(6, 14):
        assert accounts.session(session.token, T0 + hour * 3600) is not None


def test_no_session_outlives_the_absolute_maximum(accounts: Accounts, alice: User) -> None:
    session = login(accounts)
    for hour in range(1, 24):
        assert accounts.session(session.token, T0 + hour * 3600) is not None
    near_end = accounts.session(session.token, T0 + MAX_AGE_S - 1)
    assert near_end is not None and near_end.expires_at == T0 + MAX_AGE_S
    assert accounts.session(session.token, T0 + MAX_AGE_S) is None


def test_idle_and_maximum_age_are_settings(tmp_path: Path) -> None:
    with Accounts(tmp_path / "c.sqlite", idle_s=600, max_age_s=900, hasher=FAST) as accounts:
        accounts.add("alice", "operator", PASSWORD)
        idle = login(accounts)
        assert accounts.session(idle.token, T0 + 600) is None
        busy = login(accounts)
        assert accounts.session(busy.token, T0 + 500) is not None
        assert accounts.session(busy.token, T0 + 899) is not None
        assert accounts.session(busy.token, T0 + 900) is None


def test_use_is_recorded_at_most_once_a_minute(tmp_path: Path, accounts: Accounts,
                                               alice: User) -> None:
    session = login(accounts)

    def last_used() -> float:
        with sqlite3.connect(tmp_path / "centre.sqlite") as db:
            return db.execute("SELECT last_used FROM console_sessions").fetchone()[0]

    accounts.session(session.token, T0 + TOUCH_EVERY_S - 1)
    assert last_used() == T0
    accounts.session(session.token, T0 + TOUCH_EVERY_S)
    assert last_used() == T0 + TOUCH_EVERY_S


def test_log_out_ends_the_session(accounts: Accounts, alice: User) -> None:
    session, other = login(accounts), login(accounts)
    accounts.logout(session.token)
    assert accounts.session(session.token, T0) is None
    assert accounts.session(other.token, T0) is not None
    accounts.logout(session.token)  # twice: nothing to do


def test_a_new_password_ends_the_users_sessions(accounts: Accounts, alice: User) -> None:
    accounts.add("bob", "operator", PASSWORD)
    session = login(accounts)
    bobs = accounts.login("bob", PASSWORD, T0)
    assert accounts.set_password("alice", "a new long password") == 1
    assert accounts.session(session.token, T0) is None
    assert bobs is not None and accounts.session(bobs.token, T0) is not None
    assert accounts.login("alice", PASSWORD, T0) is None
    assert accounts.login("alice", "a new long password", T0) is not None


def test_a_weak_new_password_is_refused_and_changes_nothing(accounts: Accounts,
                                                            alice: User) -> None:
    session = login(accounts)
    with pytest.raises(AccountError, match="at least 12 characters"):
        accounts.set_password("alice", "short")
    assert accounts.session(session.token, T0) is not None


def test_disabling_ends_the_users_sessions_at_once(accounts: Accounts, alice: User) -> None:
    session = login(accounts)
    assert accounts.disable("alice") == 1
    assert accounts.session(session.token, T0) is None


def test_a_session_of_a_user_disabled_by_another_instance_ends(tmp_path: Path, clock: Clock,
                                                               accounts: Accounts,
                                                               alice: User) -> None:
    """The centre's instances share the store: one's `disable` ends a session on all."""
    session = login(accounts)
    with Accounts(tmp_path / "centre.sqlite", clock=clock, hasher=FAST) as other:
        other.disable("alice")
    assert accounts.session(session.token, T0) is None


# -- CSRF ------------------------------------------------------------------------------------------
def test_the_csrf_check_takes_only_the_sessions_token(accounts: Accounts, alice: User) -> None:
    session, other = login(accounts), login(accounts)
    assert Accounts.check_csrf(session, session.csrf)
    assert not accounts.check_csrf(session, other.csrf)
    assert not accounts.check_csrf(session, None)
    assert not accounts.check_csrf(session, "")
    assert not accounts.check_csrf(session, session.csrf[:-1])
    assert not accounts.check_csrf(session, session.csrf + "é")


# -- what is stored --------------------------------------------------------------------------------
def stored_bytes(directory: Path) -> bytes:
    """The database and its WAL and shared memory, as a copy of the disk would show them."""
    return b"".join(p.read_bytes() for p in sorted(directory.glob("centre.sqlite*")))


def test_neither_the_password_nor_the_token_is_stored(tmp_path: Path, clock: Clock) -> None:
    with Accounts(tmp_path / "centre.sqlite", clock=clock, hasher=FAST) as accounts:
        accounts.add("alice", "operator", PASSWORD)
        session = login(accounts)
        accounts.set_password("alice", "second long password")
        later = accounts.login("alice", "second long password", T0)
        assert later is not None
        on_disk = stored_bytes(tmp_path)
        assert b"alice" in on_disk  # the search does see the file's contents
        for secret in (PASSWORD, "second long password", session.token, later.token):
            assert secret.encode() not in on_disk
    on_disk = stored_bytes(tmp_path)  # after the WAL is folded in at close
    for secret in (PASSWORD, "second long password", session.token, later.token):
        assert secret.encode() not in on_disk


def test_the_stored_password_hash_is_argon2id_with_the_librarys_defaults(tmp_path: Path) -> None:
    with Accounts(tmp_path / "centre.sqlite") as accounts:
        accounts.add("alice", "operator", PASSWORD)
    with sqlite3.connect(tmp_path / "centre.sqlite") as db:
        (stored,) = db.execute("SELECT password_hash FROM console_users").fetchone()
    assert stored.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert not PasswordHasher().check_needs_rehash(stored)


def test_a_hash_with_old_parameters_is_replaced_at_log_in(tmp_path: Path) -> None:
    path = tmp_path / "centre.sqlite"
    cheap = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    with Accounts(path, hasher=cheap) as accounts:
        accounts.add("alice", "operator", PASSWORD)

    def stored() -> str:
        with sqlite3.connect(path) as db:
            return db.execute("SELECT password_hash FROM console_users").fetchone()[0]

    assert "m=8,t=1,p=1" in stored()
    with Accounts(path) as accounts:
        assert accounts.login("alice", "wrong password!", T0) is None
        assert "m=8,t=1,p=1" in stored()  # only a correct password may be rehashed
        assert accounts.login("alice", PASSWORD, T0) is not None
    assert not PasswordHasher().check_needs_rehash(stored())
    with Accounts(path) as accounts:
        assert accounts.login("alice", PASSWORD, T0) is not None


def test_accounts_live_beside_the_centres_store_tables(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "centre.sqlite"
    store = Store(path)
    try:
        with Accounts(path, clock=clock, hasher=FAST) as accounts:
            accounts.add("alice", "operator", PASSWORD)
            assert login(accounts).username == "alice"
        Store(path).close()  # the store opens it again with our tables in it
    finally:
        store.close()
    with sqlite3.connect(path) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master "
                                               "WHERE type = 'table'")}
    assert {"alerts", "console_users", "console_sessions"} <= tables
    with Accounts(path, hasher=FAST) as again:
        assert [u.username for u in again.list()] == ["alice"]
