"""The Lua scripts' texts: each carries every library function it calls, and only those.

Redis evaluates a script's whole text on each call, so ``lua_script`` keeps only the
library paragraphs a script needs. A script missing one fails only when that line runs
(a global that does not exist), so this checks every script statically, against what
Lua and Redis provide, and compiles them all on a real server.
"""

from __future__ import annotations

import re

import pytest
import redis
from support.store import StoreFactory

from dspex_tasks.store.scripts import all_scripts
from dspex_tasks.store.scripts.lua import PRELUDE, lua_script

#: Names a script may use without defining them: Lua's and Redis's globals.
BUILTINS = {
    "redis", "cjson", "string", "table", "math", "tonumber", "tostring", "type", "ipairs",
    "pairs", "next", "select", "unpack", "error", "pcall", "assert", "KEYS", "ARGV",
}  # fmt: skip
KEYWORDS = {
    "and", "break", "do", "else", "elseif", "end", "false", "for", "function", "if", "in",
    "local", "nil", "not", "or", "repeat", "return", "then", "true", "until", "while",
}  # fmt: skip


def _code(text: str) -> str:
    """The script without comments and string literals (their words are not names)."""
    text = re.sub(r"--.*$", "", text, flags=re.MULTILINE)
    return re.sub(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", "''", text)


def _free_names(text: str) -> set[str]:
    """Words used as variables (not fields, not keywords) that nothing in ``text`` binds:
    a local, a function, a parameter or a loop variable."""
    code = _code(text)
    bound: set[str] = set()
    for names in re.findall(r"\blocal\s+(?:function\s+)?([\w\s,]+?)(?:=|\(|$|\n)", code):
        bound.update(n.strip() for n in names.split(",") if n.strip())
    for params in re.findall(r"\bfunction\s*\w*\s*\(([^)]*)\)", code):
        bound.update(p.strip() for p in params.split(",") if p.strip())
    for names in re.findall(r"\bfor\s+([\w\s,]+?)\s*(?:=|\bin\b)", code):
        bound.update(n.strip() for n in names.split(","))
    code = re.sub(r"([{,]\s*)\w+\s*=(?!=)", r"\1", code)  # table constructor keys
    used = set(re.findall(r"(?<![.\w:])([A-Za-z_]\w*)", code))
    return used - bound - BUILTINS - KEYWORDS


@pytest.mark.parametrize("name", sorted(all_scripts()))
def test_every_name_a_script_uses_is_defined_in_it(name: str) -> None:
    assert _free_names(all_scripts()[name]) == set()


def test_the_check_sees_a_missing_library_function() -> None:
    # What a script that lost a paragraph would look like: the check must fail on it.
    whole = lua_script("local d = open_session(TOUCH)\nbackstop(d)\nreturn 1\n")
    assert _free_names(whole) == set()
    without_backstop = whole.replace("local function backstop", "local function other")
    assert _free_names(without_backstop) == {"backstop"}


def test_a_script_carries_only_what_it_uses() -> None:
    text = lua_script("return redis.call('HGET', KEYS[2], ARGV[4])\n")
    assert "local function" not in text and "TIME" not in text
    # A function the body calls brings what that function calls, in library order.
    text = lua_script("local d = open_session(true)\nreturn d\n")
    assert text.index("local NOW") < text.index("local function open_session")
    assert "local function backstop" not in text
    assert len(all_scripts()["GET_VARIABLES"]) < len(PRELUDE) / 3


def test_every_script_compiles_on_the_server(raw: redis.Redis) -> None:
    for name, source in all_scripts().items():
        try:
            raw.script_load(source)
        except redis.ResponseError as e:  # pragma: no cover - the failure message
            pytest.fail(f"{name}: {e}")


def test_a_flushed_script_cache_is_loaded_again(make_store: StoreFactory, raw: redis.Redis) -> None:
    # A server that restarted (or SCRIPT FLUSH): the store's next calls load the scripts.
    store = make_store()
    store.create_session("flushed")
    store.register_variable("flushed", "x", "integer", 1)
    raw.script_flush()
    assert store.update_variable("flushed", "x", 2).version == 2
    assert store.get_variable("flushed", "x").value == 2
