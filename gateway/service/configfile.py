"""Reading the config file: the I/O boundary in front of the pure `configparse.parse_config`.

`load_config` is the only function that touches the filesystem: it reads the YAML file
(refusing duplicate keys), reads `auth.public_key_file` relative to the config file's
directory and checks it is a PEM public key, and hands `os.environ` to the parser unless
given another environment. Hot reload and `check-config` both go through it, so what ops
validate by hand is exactly what the gateway accepts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from ..core.config import Config, ConfigError
from ..core.configparse import PublicKeyReader, parse_config


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of letting the last one win silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(
    path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None, need_secret: bool = True
) -> Config:
    """Read and validate the YAML file at `path`; every failure is a `ConfigError` naming it."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror or exc}"], source) from None
    except UnicodeDecodeError:
        raise ConfigError(["the file is not UTF-8 text"], source) from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise ConfigError([yaml_problem(text, exc)], source) from None
    base_dir = Path(path).resolve().parent
    read_key = _public_key_file_reader(base_dir)
    try:
        config = parse_config(
            raw, env=os.environ if env is None else env, read_public_key=read_key, need_secret=need_secret
        )
    except ConfigError as exc:
        raise ConfigError(exc.problems, source) from None
    if config.usage.path is None:
        return config
    # `serve` and `report` must find the same file whatever directory each is started in.
    return replace(config, usage=replace(config.usage, path=str(base_dir / config.usage.path)))


_KEY_LINE = re.compile(r" *(?:- +)?([^\s:#\-'\"{\[][^:#]*?|'[^']*'|\"[^\"]*\") *:(?:\s|$)")


def yaml_problem(text: str, exc: yaml.YAMLError) -> str:
    """One line for a YAML syntax error: the key path, the line and column, what is wrong.

    PyYAML marks where it *noticed* the error. For an unclosed quote or bracket, or a key
    without its colon, that is the next line or the end of the file, while the mistake is
    where the construct started (its context mark): that is the line reported.
    """
    problem = getattr(exc, "problem", None) or "invalid YAML"
    mark = getattr(exc, "problem_mark", None)
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    if context_mark is not None and context and not context.startswith("while parsing a block"):
        mark = context_mark
        problem = f"{problem} ({context})"
    if mark is None:
        return problem
    lines = text.splitlines()
    line, column = mark.line, mark.column
    if line >= len(lines) or not lines[line].strip():  # the end of the file: the unclosed thing is on the last line written
        line = next((n for n in range(min(line, len(lines) - 1), -1, -1) if lines[n].strip()), 0)
        column = len(lines[line]) - 1 if lines else 0
    if problem == "mapping values are not allowed here":
        # "key value" then "key: value" reads as one plain scalar until that second colon:
        # the key without its colon is the line above, at the same indentation.
        above = next((n for n in range(line - 1, -1, -1) if lines[n].strip() and not lines[n].lstrip().startswith("#")), None)
        indent = len(lines[line]) - len(lines[line].lstrip())
        if above is not None and _KEY_LINE.match(lines[above]) is None and len(lines[above]) - len(lines[above].lstrip()) == indent:
            line, column, problem = above, indent, "could not find expected ':' (a key without its colon)"
    keys = yaml_key_path(lines, line)
    return f"{keys + ': ' if keys else ''}line {line + 1}, column {column + 1}: {problem}"


def yaml_key_path(lines: list[str], index: int) -> str:
    """The dotted key path of line `index` of a block-style YAML text, from indentation alone
    (the text does not parse, so this is all there is): its own key, under every key above
    it that is less indented."""
    path: list[tuple[int, str]] = []
    for number, line in enumerate(lines[: index + 1]):
        match = _KEY_LINE.match(line)
        if match is None and number < index:
            continue
        indent = match.start(1) if match else len(line) - len(line.lstrip())
        while path and path[-1][0] >= indent:
            path.pop()
        if match is not None:
            path.append((indent, match.group(1).strip("'\"")))
    return ".".join(key for _, key in path)


def _public_key_file_reader(base_dir: Path) -> PublicKeyReader:
    """Reads `auth.public_key_file` relative to `base_dir` (the config file's) and checks it is PEM."""

    def read(name: str) -> str:
        key_path = Path(name)
        if not key_path.is_absolute():
            key_path = base_dir / key_path
        try:
            text = key_path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read {str(key_path)!r}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:  # DER or other binary: not PEM either
            raise ValueError(f"{str(key_path)!r} is not a PEM public key") from None
        if "PUBLIC KEY" not in text:
            raise ValueError(f"{str(key_path)!r} is not a PEM public key")
        return text

    return read
