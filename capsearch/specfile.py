"""Reading a spec file: YAML with `1e-4` read as a float, `extends:` chains and `--set` overrides.

The result is plain data; capsearch.config validates it against the schema.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from capsearch.errors import UserError


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string; learning rates are written that way, so read it as a float.
    A key given twice in one mapping is an error naming both lines (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                line = first.setdefault(key, key_node.start_mark.line)
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            if line != key_node.start_mark.line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {line + 1})",
                    key_node.start_mark,
                )  # fmt: skip
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)(?:\.\d*)?[eE][-+]?\d+$"),
    list("-+0123456789"),
)


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file's top-level mapping (UserError if missing, unreadable or not a mapping)."""
    if not path.is_file():
        raise UserError(f"spec file {path} does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}:{where}: invalid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of keys")
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Override merged into base: mappings merge key by key, anything else (lists too) replaces."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_extends(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A spec file with its `extends:` chain merged in (paths relative to the file that names them)."""
    path = path.resolve()
    if path in _seen:
        raise UserError(f"{path}: extends loops back to itself")
    data = read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise UserError(f"{path}: extends: must be a path, got {parent!r}")
    if not (path.parent / parent).is_file():
        raise UserError(f"{path}: extends: {path.parent / parent} does not exist")
    base = resolve_extends((path.parent / parent), (*_seen, path))
    return deep_merge(base, data)


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `a.b.c=VALUE` overrides (VALUE read as YAML; `groups[0]` indexes a list)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. search.num_samples=4")
        try:
            value = yaml.load(text, Loader=_Loader)
        except yaml.YAMLError:
            raise UserError(f"--set {item!r}: the value is not valid YAML") from None
        parts = [int(p) if p.isdigit() else p for p in re.split(r"\.|\[(\d+)\]", key) if p]
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, dict) and isinstance(part, str):
                if not last and not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
            elif not (isinstance(node, list) and isinstance(part, int) and part < len(node)):
                raise UserError(f"--set {key}: there is no {part!r} at that place in the spec")
            if last:
                node[part] = value
            else:
                node = node[part]
    return data
