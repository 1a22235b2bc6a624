"""The config file's YAML as values with line numbers, and the checks that turn a wrong value into one clear
message naming the file, the line and the field: `path: line 14, field 'accounts[1].tokens[0]': ...`."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

import yaml


class ConfigError(Exception):
    """A configuration problem, phrased for the person who wrote the file."""


# --- YAML with line numbers -------------------------------------------------------------------------


class Node:
    """A YAML value and the line it started on (1-based)."""

    __slots__ = ("value", "line")

    def __init__(self, value: Any, line: int) -> None:
        self.value = value
        self.line = line


def _convert(node: yaml.Node) -> Node:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Node] = {}
        for key_node, value_node in node.value:
            key = _LOADER.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            key = "on" if key is True and key_node.value.lower() == "on" else key  # YAML 1.1: bare `on` is true
            if not isinstance(key, str):
                raise ConfigError(f"line {key_node.start_mark.line + 1}: mapping keys must be plain names")
            if key in out:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} appears twice")
            out[key] = _convert(value_node)
        return Node(out, line)
    if isinstance(node, yaml.SequenceNode):
        return Node([_convert(n) for n in node.value], line)
    return Node(_LOADER.construct_object(node), line)


_LOADER = yaml.SafeLoader("")


def parse_yaml(text: str, source: str) -> Node | None:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{source}: {where}invalid YAML: {problem}") from None
    try:
        return None if root is None else _convert(root)
    except ConfigError as e:  # repeated or non-plain keys: name the file like every other message does
        raise ConfigError(f"{source}: {e}") from None


# --- validation helpers -----------------------------------------------------------------------------


class Ctx:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, node: Node | None, message: str) -> ConfigError:
        line = f"line {node.line}, " if node is not None else ""
        return ConfigError(f"{self.source}: {line}field '{where}': {message}")

    def mapping(self, node: Node, where: str, allowed: tuple[str, ...]) -> dict[str, Node]:
        if not isinstance(node.value, dict):
            raise self.fail(where, node, f"must be a mapping, got {type_name(node.value)}")
        for key, child in node.value.items():
            if key not in allowed:
                name = f"{where}.{key}" if where else key
                raise self.fail(name, child, f"unknown key (allowed: {', '.join(allowed)})")
        return node.value

    def string(self, node: Node, where: str, *, secret: bool = False) -> str:
        if not isinstance(node.value, str) or not node.value:
            got = "a secret of the wrong type" if secret else type_name(node.value)
            raise self.fail(where, node, f"must be a non-empty string, got {got}")
        return node.value

    def integer(self, node: Node, where: str, lo: int, hi: int) -> int:
        if not isinstance(node.value, int) or isinstance(node.value, bool):
            raise self.fail(where, node, f"must be an integer, got {type_name(node.value)}")
        if not lo <= node.value <= hi:
            raise self.fail(where, node, f"must be between {lo} and {hi}, got {node.value}")
        return node.value

    def boolean(self, node: Node, where: str) -> bool:
        if not isinstance(node.value, bool):
            raise self.fail(where, node, f"must be true or false, got {type_name(node.value)}")
        return node.value

    def price(self, node: Node, where: str) -> Decimal:
        if isinstance(node.value, bool) or not isinstance(node.value, int | float | str):
            raise self.fail(where, node, f"must be a number (USD), got {type_name(node.value)}")
        try:
            value = Decimal(str(node.value))
        except InvalidOperation:
            raise self.fail(where, node, f"must be a number (USD), got {node.value!r}") from None
        if not value.is_finite() or value < 0:
            raise self.fail(where, node, "must be a finite, non-negative number")
        return value

    def sequence(self, node: Node, where: str) -> list[Node]:
        if not isinstance(node.value, list):
            raise self.fail(where, node, f"must be a list, got {type_name(node.value)}")
        return node.value


def type_name(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer"}.get(
        type(value), type(value).__name__
    )
