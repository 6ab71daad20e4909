"""The generic reader: what a field's type and its `key` metadata make of a key.

tests/test_config.py holds one test per rule of the real config; these drive the reader
with small dataclasses of their own, so each mechanism is seen apart from the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import pytest

from gateway.core import config
from gateway.core.config import key, rules
from gateway.core.configparse import _CUSTOM, Reader


@dataclass(frozen=True)
class Inner:
    size: int = key(4, low=1, high=8)


@dataclass(frozen=True)
class Toy:
    name: str = field(metadata=rules(placeholder="", pattern=r"[a-z]+", says="{value!r} is not lower case"))
    ratio: float = key(0.5, low=0, high=1, open_low=True)
    count: int | None = key(None, low=1, high=10)
    mode: str = key("on", choices=("on", "off"))
    tags: tuple[str, ...] = ()
    people: frozenset[str] = frozenset()
    flag: bool = False
    inner: Inner = Inner()
    extra: Inner | None = None
    derived: str | None = key(None, read="none")


@dataclass(frozen=True)
class Unreadable:
    pairs: tuple[tuple[str, int], ...] = ()


def walk(raw: Any, cls: type = Toy, env: dict[str, str] | None = None) -> tuple[dict[str, Any], list[str]]:
    reader = Reader(env or {}, None, True)
    values = reader.walk(cls, reader.section(raw, "toy", cls), "toy")
    return values, reader.problems


def test_a_full_section_is_read_by_each_fields_type() -> None:
    values, problems = walk(
        {
            "name": "abc", "ratio": "0.25", "count": 3, "mode": "off", "tags": "one", "people": ["a", "b", "a"],
            "flag": True, "inner": {"size": 8}, "extra": {},
        }
    )
    assert problems == []
    assert values == {
        "name": "abc", "ratio": 0.25, "count": 3, "mode": "off", "tags": ("one",), "people": frozenset({"a", "b"}),
        "flag": True, "inner": Inner(8), "extra": Inner(4),
    }


def test_left_out_keys_take_the_field_defaults_and_an_optional_section_stays_off() -> None:
    values, problems = walk({"name": "x"})
    assert problems == []
    assert (values["ratio"], values["count"], values["mode"], values["inner"], values["extra"]) == (0.5, None, "on", Inner(), None)


def test_the_allowed_keys_are_the_fields_but_those_that_are_no_key() -> None:
    _, problems = walk({"name": "x", "derived": "y"})
    assert problems == [
        "toy.derived: unknown key (allowed: count, extra, flag, inner, mode, name, people, ratio, tags)"
    ]


def test_bounds_come_from_the_metadata_and_a_bad_value_leaves_the_default() -> None:
    values, problems = walk({"name": "x", "ratio": 0, "count": 11, "inner": {"size": 0}})
    assert problems == [
        "toy.ratio: 0 is out of range (0, 1]",
        "toy.count: 11 is out of range [1, 10]",
        "toy.inner.size: 0 is out of range [1, 8]",
    ]
    assert (values["ratio"], values["count"]) == (0.5, None)


def test_a_value_not_among_the_choices_is_named_with_them() -> None:
    values, problems = walk({"name": "x", "mode": "maybe"})
    assert problems == ["toy.mode: 'maybe' is not one of on, off"]
    assert values["mode"] == "on"


def test_a_value_that_misses_the_pattern_gets_the_fields_own_words() -> None:
    _, problems = walk({"name": "ABC"})
    assert problems == ["toy.name: 'ABC' is not lower case"]


def test_a_missing_required_key_is_checked_as_its_placeholder() -> None:
    values, problems = walk({})
    assert problems == ["toy.name: '' is not lower case"]
    assert values["name"] == ""


def test_strings_and_numbers_expand_the_environment() -> None:
    values, problems = walk({"name": "${NAME}", "count": "${COUNT:-2}"}, env={"NAME": "env"})
    assert problems == []
    assert (values["name"], values["count"]) == ("env", 2)


def test_a_type_without_a_reader_is_a_programming_error_naming_the_key() -> None:
    with pytest.raises(TypeError, match=r"toy\.pairs: no reader for .*rules\(read='custom'\)"):
        walk({}, Unreadable)


def model_sections() -> list[type]:
    found: list[type] = []
    for name in dir(config):
        value = getattr(config, name)
        if isinstance(value, type) and name.endswith("Config") and name != "ConfigError":
            found.append(value)
    return found


@pytest.mark.parametrize("section", model_sections(), ids=lambda cls: cls.__name__)
def test_every_key_of_the_model_has_a_reader(section: type) -> None:
    values, _ = walk({}, section)  # a key no reader reads raises TypeError
    assert set(values) == {f.name for f in fields(section) if f.metadata.get("read") != "none"}


def test_the_hand_written_readers_are_exactly_the_keys_marked_custom() -> None:
    marked = {(cls, f.name) for cls in model_sections() for f in fields(cls) if f.metadata.get("read") == "custom"}
    assert marked == set(_CUSTOM)
