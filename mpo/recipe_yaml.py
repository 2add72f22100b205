"""A recipe's YAML text, read safely: ``yaml.SafeLoader``, and two checks on the composed node graph
before any Python value is built from it.

- A key repeated in one mapping is an error naming both lines (YAML keeps the last silently: a
  second ``run:`` section would replace the first).
- Aliases are bounded: the document may expand to at most :data:`MAX_VALUES` values (an alias bomb,
  each level repeating the one before, is refused from its few hundred nodes, in milliseconds), and
  an alias to the mapping or list that holds it is refused.

Merge keys (``<<: *defaults``) are YAML working as meant and stay allowed.
"""

from __future__ import annotations

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
