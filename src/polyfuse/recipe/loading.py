"""Reading recipe YAML (duplicate keys are errors, ``1e-5`` is a float) and ``key=value`` overrides."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from polyfuse.errors import RecipeError
from polyfuse.validation import one_line

__all__ = ["apply_overrides", "read_recipe_file"]


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads `1e-5` as a float (YAML 1.2 style)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first at line {seen[key]}), keep one",
                    key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def _parse_override(item: str) -> tuple[str, list[str], Any, bool]:
    """Split one override into (key, parts, value, delete)."""
    text = item.strip()
    usage = "use key=value (e.g. eval.batch_size=4) or ~key to delete a key"
    if text.startswith("~"):
        key, value, delete = text[1:], None, True
    elif "=" in text and not text.startswith("-"):
        key, raw = text.split("=", 1)
        key, delete = key.strip(), False
        try:
            value = _yaml_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or err
            raise RecipeError(f"override {item!r}: value is not valid YAML ({one_line(problem)})") from None
    else:
        raise RecipeError(f"override {item!r}: not understood, {usage}")
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise RecipeError(f"override {item!r}: empty key, {usage}")
    return key, parts, value, delete


def _child(container: Any, part: str, item: str, where: str) -> tuple[Any, Any]:
    """(container, key) addressing `part` inside `container`; list parts must be indices."""
    if isinstance(container, dict):
        return container, part
    if isinstance(container, list):
        if not part.isdigit():
            raise RecipeError(
                f"override {item!r}: {where} is a list, index it with a number such as {where}.0"
            )
        index = int(part)
        if index > len(container):
            raise RecipeError(
                f"override {item!r}: {where} has {len(container)} items, use an index up to {len(container)}"
            )
        return container, index
    raise RecipeError(f"override {item!r}: {where} is {container!r}, not a mapping or list")


def _apply_overrides(
    data: Mapping[str, Any], overrides: Sequence[str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Apply overrides to a deep copy of `data`; also return {dotted key: override} for error notes."""
    out: dict[str, Any] = copy.deepcopy(dict(data))
    notes: dict[str, str] = {}
    for item in overrides:
        key, parts, value, delete = _parse_override(item)
        node: Any = out
        for depth, part in enumerate(parts[:-1]):
            where = ".".join(parts[:depth]) or "the recipe"
            container, k = _child(node, part, item, where)
            missing = (isinstance(container, list) and k == len(container)) or (
                isinstance(container, dict) and (k not in container or container[k] is None)
            )
            if missing:
                if delete:
                    raise RecipeError(f"override {item!r}: {key} is not in the recipe, nothing to delete")
                fresh: Any = [] if parts[depth + 1].isdigit() else {}
                if isinstance(container, list):
                    container.append(fresh)
                else:
                    container[k] = fresh
            node = container[k]
        where = ".".join(parts[:-1]) or "the recipe"
        container, k = _child(node, parts[-1], item, where)
        if delete:
            if (isinstance(container, dict) and k not in container) or (
                isinstance(container, list) and k >= len(container)
            ):
                raise RecipeError(f"override {item!r}: {key} is not in the recipe, nothing to delete")
            del container[k]
        elif isinstance(container, list) and k == len(container):
            container.append(value)
        else:
            container[k] = value
        notes[key] = item
    return out, notes


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of `data` with torchtune-style overrides applied.

    `a.b=value` sets a key (value parsed as YAML, so `eval.batch_size=4` is an int and `key=` is null),
    `sources.0.model=/x` indexes a list (index == length appends), `~a.b` deletes a key.
    """
    return _apply_overrides(data, overrides)[0]


# --------------------------------------------------------------------------------------------------
# error formatting


def read_recipe_file(path: str | Path) -> Any:
    """The YAML mapping of a recipe file (``{}`` for an empty file); RecipeError (one line, with the line and
    column of a syntax error) for a missing file or invalid YAML."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a recipe file" if path.is_dir() else "recipe file not found"
        raise RecipeError(f"{path}: {what}, check the path")
    try:
        data = _yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = one_line(getattr(err, "problem", None) or err)
        context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and context_mark is not None:
            problem += f" ({one_line(context)} started at line {context_mark.line + 1})"
        if not isinstance(err, yaml.constructor.ConstructorError):
            problem += ", fix the syntax there"
        raise RecipeError(f"{where}: invalid YAML: {problem}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: cannot read the recipe ({one_line(err)})") from None
    return {} if data is None else data
