"""A recipe's YAML text, read safely: ``yaml.SafeLoader``, and two checks on the composed node graph
before any Python value is built from it.

- A key repeated in one mapping is an error naming both lines (YAML keeps the last silently: a
  second ``run:`` section would replace the first).
- Aliases are bounded: the document may expand to at most :data:`MAX_VALUES` values (an alias bomb,
  each level repeating the one before, is refused from its few hundred nodes, in milliseconds), and
  an alias to the mapping or list that holds it is refused.

Merge keys (``<<: *defaults``) are YAML working as meant and stay allowed. OmegaConf's ``${a.b}``
interpolations, resolved later, are bounded the same way (:func:`check_interpolations`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from mpo.errors import MpoError


class ConfigError(MpoError):
    """A recipe or override that does not resolve; one line per problem."""


# A recipe holds a few hundred values; YAML aliases may repeat a node, but past this many values
# once expanded (an alias bomb: each level repeating the one before) the recipe is refused.
MAX_VALUES = 10_000
MERGE_TAG = "tag:yaml.org,2002:merge"


def parse_yaml(text: str, path: str | Path) -> Any:
    """A recipe's YAML (``yaml.SafeLoader``) with two checks before anything is built from it: a key
    repeated in one mapping is an error naming both lines (YAML would keep the last silently), and
    the document may expand to at most :data:`MAX_VALUES` values through its aliases."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, path)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from None
    finally:
        loader.dispose()


def _check_nodes(root: yaml.Node, path: str | Path) -> None:
    """Repeated keys and the expanded size, each node visited once (aliases share nodes)."""
    sizes: dict[int, int | None] = {}

    def size(node: yaml.Node, where: str) -> int:
        if id(node) in sizes:
            if sizes[id(node)] is None:  # still being walked: it holds itself
                raise ConfigError(f"{path}:{node.start_mark.line + 1}: {where}: an alias to the mapping or list "
                                  "that holds it (a value that contains itself)")
            return sizes[id(node)]
        sizes[id(node)] = None
        total = 1
        if isinstance(node, yaml.MappingNode):
            _no_repeats(node, where, path)
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else "?"
                total += size(key, where) + size(value, f"{where}.{name}" if where else str(name))
        elif isinstance(node, yaml.SequenceNode):
            total += sum(size(item, f"{where}.{i}") for i, item in enumerate(node.value))
        sizes[id(node)] = total
        if total > MAX_VALUES:
            raise ConfigError(f"{path}:{node.start_mark.line + 1}: {where or 'the recipe'}: expands to more than "
                              f"{MAX_VALUES} values through YAML aliases (an alias bomb?); a recipe needs a few hundred")
        return total

    size(root, "")


def _no_repeats(node: yaml.MappingNode, where: str, path: str | Path) -> None:
    seen: dict[tuple, int] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == MERGE_TAG:
            continue
        line = key.start_mark.line + 1
        first = seen.get((key.tag, key.value))
        if first is None:
            seen[(key.tag, key.value)] = line
        else:
            name = f"{where}.{key.value}" if where else key.value
            raise ConfigError(f"{path}:{line}: {name}: repeated key (first at line {first}); YAML would keep only "
                              "the last silently: merge them into one")


# ``${a.b}`` interpolations (OmegaConf's) may repeat a value too: a string of ten ``${x}`` where x is
# ten ``${w}``... Past this many characters and values once resolved, the recipe is refused.
MAX_RESOLVED = 1_000_000
INTERPOLATION = re.compile(r"\$\{([^${}]*)\}")


def check_interpolations(tree: Any, source: str) -> None:
    """Refuse a tree (overrides merged, interpolations not yet resolved) whose interpolations would
    resolve to more than :data:`MAX_RESOLVED` characters and values: an upper bound from the text,
    each ``${key}`` counted as the size of what it names (a resolver, ``${oc.env:X}``, as its text)."""
    costs: dict[str, int] = {}

    def lookup(dotted: str) -> Any:
        node = tree
        for part in dotted.split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return node

    def cost(node: Any, where: str) -> int:
        if where in costs:
            return costs[where]
        costs[where] = 1  # a value that names itself: OmegaConf reports the loop
        if isinstance(node, dict):
            total = 1 + sum(cost(value, f"{where}.{key}".lstrip(".")) for key, value in node.items())
        elif isinstance(node, list):
            total = 1 + sum(cost(value, f"{where}.{i}".lstrip(".")) for i, value in enumerate(node))
        elif isinstance(node, str):
            refs = [_absolute(ref, where) for ref in INTERPOLATION.findall(node) if ":" not in ref]
            total = len(node) + sum(cost(lookup(ref), ref) for ref in refs)
        else:
            total = 1
        costs[where] = total
        if total > MAX_RESOLVED:
            raise ConfigError(f"{source}: {where or 'the recipe'}: its interpolations (${{...}}) resolve to more than "
                              f"{MAX_RESOLVED} characters and values (a value repeated inside itself?)")
        return total

    cost(tree, "")


def _absolute(ref: str, where: str) -> str:
    """An interpolation's key from the root: ``${.x}`` is a sibling of ``where``, ``${..x}`` its parent's."""
    rest = ref.lstrip(".")
    ups = len(ref) - len(rest)
    if not ups:
        return ref
    parts = where.split(".")[:-ups] if ups <= where.count(".") + 1 else []
    return ".".join([*parts, rest]) if rest else ".".join(parts)
