"""The one YAML loader for recipes, overrides and saved configs: bounded, strict, fast.

A recipe is a small file a user may have been handed, so parsing it must end quickly whatever
it holds. PyYAML's ``safe_load`` does not: aliases are shared, not copied, so a 600-byte file of
nested aliases stands for 10^9 values, and whatever walks the result afterwards (an error
message's ``repr``, ``to_dict``, a merge) takes hours or all memory; a 5000-deep nesting ends
in a ``RecursionError``; a repeated key or section silently replaces the first. This loader:

- allows aliases (recipes may share a list with ``&``/``*``), but counts the values the
  document stands for with every alias expanded and refuses more than ``MAX_VALUES`` (a
  recipe has ~100) and any alias that contains itself, before a Python object is built;
- refuses nesting deeper than ``MAX_DEPTH`` while composing, before Python recursion can fail;
- refuses a key repeated in one mapping, naming both lines (YAML merge keys ``<<`` may still
  be overridden, as YAML defines).

Every error is a :class:`ConfigError` whose text quotes at most ~200 characters of the input
(:func:`clip`).
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.composer import Composer
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from mimar.errors import MAX_QUOTE, ConfigError, clip

MAX_DEPTH = 64  # the deepest recipe nests 3 levels
MAX_VALUES = 100_000  # values after alias expansion; the biggest recipe has ~150
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    """SafeLoader with a depth bound while composing and a duplicate-key check."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ConfigError(
                    f"nesting deeper than {MAX_DEPTH} levels at line {mark.line + 1} "
                    "(a recipe nests a few sections)"
                )
            return Composer.compose_node(self, parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first:
                raise ConfigError(
                    f"key {clip(key)} appears twice in one mapping, at lines {first[key]} and "
                    f"{line}: keep one (a later one would silently replace the first)"
                )
            first[key] = line
        return super().construct_mapping(node, deep=deep)


def load(text: str, where: str = "YAML") -> Any:
    """Parse ``text`` (one YAML document) with the bounds of the module docstring.

    Args:
        text: the YAML source.
        where: what ``text`` is (a path, "override x"), the prefix of error messages.
    """
    try:
        loader = _Loader(text)  # the reader refuses unprintable characters here
    except yaml.YAMLError as err:
        raise ConfigError(f"{where} is not valid YAML: {_yaml_problem(err)}") from None
    try:
        try:
            node = loader.get_single_node()
            size = 0 if node is None else _expanded_size(node, {}, set())
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        if node is None:
            return None
        if size > MAX_VALUES:
            raise ConfigError(
                f"{where}: its aliases expand to more than {MAX_VALUES:,} values (an alias "
                "bomb?); a recipe holds a few hundred"
            )
        try:
            return loader.construct_document(node)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where} is not valid YAML: {_yaml_problem(err)}") from None
    finally:
        loader.dispose()


def _expanded_size(node: Node, seen: dict[int, tuple[int, int]], open_nodes: set[int]) -> int:
    """Values ``node`` stands for with every alias expanded, memoised per node so the count
    costs one visit per distinct node. Chained aliases nest deeper than the text does, so the
    expanded depth is bounded here too (what walks the result recurses that deep)."""
    return _size_and_height(node, seen, open_nodes)[0]


def _size_and_height(
    node: Node, seen: dict[int, tuple[int, int]], open_nodes: set[int]
) -> tuple[int, int]:
    key = id(node)
    if key in seen:
        return seen[key]
    if key in open_nodes:
        raise ConfigError(f"an alias at line {node.start_mark.line + 1} contains itself")
    if len(open_nodes) > MAX_DEPTH:  # the open nodes are one path: its length is a height
        raise ConfigError(
            f"nesting deeper than {MAX_DEPTH} levels (through aliases) at line "
            f"{node.start_mark.line + 1}"
        )
    open_nodes.add(key)
    if isinstance(node, SequenceNode):
        children = node.value
    elif isinstance(node, MappingNode):
        children = [child for pair in node.value for child in pair]
    else:
        children = []
    size, height = 1, 1
    for child in children:
        child_size, child_height = _size_and_height(child, seen, open_nodes)
        size, height = size + child_size, max(height, child_height + 1)
        if height > MAX_DEPTH:
            raise ConfigError(
                f"nesting deeper than {MAX_DEPTH} levels (through aliases) at line "
                f"{node.start_mark.line + 1}"
            )
        if size > MAX_VALUES:
            break
    open_nodes.discard(key)
    seen[key] = (size, height)
    return size, height


def _yaml_problem(err: yaml.YAMLError) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 2 * MAX_QUOTE else text[: 2 * MAX_QUOTE - 3] + "..."
