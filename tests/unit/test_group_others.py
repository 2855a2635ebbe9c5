"""Who else a group lets write (``paths.group_others``), against a made-up
user database: the rule must not depend on this host's."""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Iterator

import pytest

from pytest_bottle.host import paths

ME, MY_GID = 1000, 1000


def _user(name: str, uid: int, gid: int) -> pwd.struct_passwd:
    return pwd.struct_passwd((name, "x", uid, gid, "", f"/home/{name}", "/bin/sh"))


def _database(
    monkeypatch: pytest.MonkeyPatch, users: list[pwd.struct_passwd], groups: dict[int, list[str]]
) -> list[str]:
    asked: list[str] = []

    def getpwall() -> list[pwd.struct_passwd]:
        asked.append("getpwall")
        return users

    def getpwuid(uid: int) -> pwd.struct_passwd:
        return next(u for u in users if u.pw_uid == uid)

    def getgrgid(gid: int) -> grp.struct_group:
        if gid not in groups:
            raise KeyError(gid)
        return grp.struct_group((f"g{gid}", "x", gid, groups[gid]))

    monkeypatch.setattr(pwd, "getpwall", getpwall)
    monkeypatch.setattr(pwd, "getpwuid", getpwuid)
    monkeypatch.setattr(grp, "getgrgid", getgrgid)
    monkeypatch.setattr(os, "geteuid", lambda: ME)
    monkeypatch.setattr(os, "getegid", lambda: MY_GID)
    paths.group_others.cache_clear()
    return asked


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    yield
    paths.group_others.cache_clear()


USERS = [_user("me", ME, MY_GID), _user("root", 0, 0), _user("sync", 5, 0), _user("bob", 1001, 1001)]


@pytest.mark.parametrize(
    ("groups", "gid", "expected"),
    [
        ({MY_GID: []}, MY_GID, ""),  # a user private group
        ({MY_GID: ["me", "root"]}, MY_GID, ""),  # root does not count: it can do anything anyway
        ({MY_GID: ["alice"]}, MY_GID, "has alice in it"),  # listed by the group, not by passwd (LDAP)
        ({MY_GID: [], 1001: []}, 1001, "not this user's own group"),
        ({}, 4242, "group gid 4242, which is not this user's own group"),
    ],
)
def test_who_else_a_group_lets_write(
    monkeypatch: pytest.MonkeyPatch, groups: dict[int, list[str]], gid: int, expected: str
) -> None:
    asked = _database(monkeypatch, USERS, groups)
    got = paths.group_others(gid)
    assert (got == "") if expected == "" else (expected in got), got
    if gid != MY_GID:
        assert not asked, "a group not ours is refused without listing every user"


def test_a_user_whose_own_group_it_is_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    _database(monkeypatch, [*USERS, _user("carol", 1002, MY_GID)], {MY_GID: []})
    assert "has carol in it" in paths.group_others(MY_GID)


def test_root_with_gid_0_shared_by_system_users(monkeypatch: pytest.MonkeyPatch) -> None:
    """RHEL's sync, shutdown, halt and operator have gid 0: a 0775 root:root
    directory is theirs to rename in too."""
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    users = [_user("root", 0, 0), _user("sync", 5, 0)]
    monkeypatch.setattr(pwd, "getpwall", lambda: users)
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: users[0])
    monkeypatch.setattr(grp, "getgrgid", lambda gid: grp.struct_group(("root", "x", 0, [])))
    monkeypatch.setattr(os, "getegid", lambda: 0)
    paths.group_others.cache_clear()
    assert "has sync in it" in paths.group_others(0)
