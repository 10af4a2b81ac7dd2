"""Table tests for dspex_tasks.keys: id rules and key names."""

from __future__ import annotations

import fnmatch
from typing import Any

import pytest

from dspex_tasks.errors import InvalidProgram, InvalidSessionId
from dspex_tasks.keys import Keys, check_program_id, check_session_id

GOOD_IDS = ["a", "A9", ":", "@", ".", "-", "_", "a:b@c.d-e_f", "x" * 128]
BAD_IDS = ["", "a b", "{x}", "a}b", "a*", "a?", "[a]", "a\n", "ü", "x" * 129, None, 5, b"a"]


@pytest.mark.parametrize("sid", GOOD_IDS)
def test_good_session_ids_pass_unchanged(sid: str) -> None:
    assert check_session_id(sid) == sid


@pytest.mark.parametrize("sid", BAD_IDS)
def test_bad_session_ids_are_invalid_session_id(sid: Any) -> None:
    with pytest.raises(InvalidSessionId) as info:
        check_session_id(sid)
    assert info.value.code == "invalid_session_id"
    assert "1-128 characters" in info.value.message


def test_long_bad_session_id_is_shortened_in_the_message() -> None:
    with pytest.raises(InvalidSessionId) as info:
        check_session_id("!" * 500)
    assert "..." in info.value.message and len(info.value.message) < 200


@pytest.mark.parametrize("pid", GOOD_IDS)
def test_good_program_ids_pass_unchanged(pid: str) -> None:
    assert check_program_id(pid) == pid


@pytest.mark.parametrize("pid", BAD_IDS)
def test_bad_program_ids_are_invalid_program(pid: Any) -> None:
    with pytest.raises(InvalidProgram) as info:
        check_program_id(pid)
    assert info.value.code == "invalid_program"


@pytest.mark.parametrize(
    ("method", "name"),
    [
        ("session", "p:s:{s1}"),
        ("variables", "p:s:{s1}:vars"),
        ("programs", "p:s:{s1}:progs"),
        ("done", "p:s:{s1}:done"),
        ("datasets", "p:s:{s1}:data"),
        ("program_versions", "p:s:{s1}:pver"),
        ("session_pattern", "p:s:{s1}*"),
    ],
)
def test_session_key_names(method: str, name: str) -> None:
    assert getattr(Keys("p"), method)("s1") == name


@pytest.mark.parametrize(
    ("attr", "name"),
    [
        ("sessions", "dspex:sessions"),
        ("stats", "dspex:stats"),
        ("gp_index", "dspex:gp"),
        ("task_outcomes", "dspex:task_outcomes"),
        ("ledger", "dspex:{ledger}:sent"),
        ("ledger_due", "dspex:{ledger}:due"),
        ("metrics", "dspex:metrics"),
    ],
)
def test_global_key_names_default_prefix(attr: str, name: str) -> None:
    assert getattr(Keys(), attr) == name


def test_every_session_key_shares_one_hash_tag() -> None:
    keys = Keys("x").session_keys("abc")
    assert keys == [
        "x:s:{abc}",
        "x:s:{abc}:vars",
        "x:s:{abc}:progs",
        "x:s:{abc}:done",
        "x:s:{abc}:events",
        "x:s:{abc}:runs",
        "x:s:{abc}:runq",
        "x:s:{abc}:data",
        "x:s:{abc}:pver",
    ]
    assert {k[k.index("{") : k.index("}") + 1] for k in keys} == {"{abc}"}
    assert Keys("x").global_program("g1") == "x:gp:g1"


@pytest.mark.parametrize(("a", "b"), [("s1", "s10"), ("a", "a:vars"), ("x", "x}")])
def test_one_sessions_pattern_does_not_match_another_valid_sessions_keys(a: str, b: str) -> None:
    keys = Keys("p")
    pattern = keys.session_pattern(a)
    other = keys.session_keys(b)
    # Only valid ids reach Keys; a pattern matches its own keys and no other valid id's.
    if all(c not in b for c in "{}*?[]"):
        assert not [k for k in other if fnmatch.fnmatchcase(k, pattern)]
    assert all(fnmatch.fnmatchcase(k, pattern) for k in keys.session_keys(a))
