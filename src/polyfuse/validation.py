"""Pydantic validation errors as one line: ``file: dotted.key: problem (fix)``, all problems at once.

Shared by recipes (:mod:`polyfuse.recipe`) and mergekit-style merge configs (:mod:`polyfuse.merge.config`)."""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

__all__ = ["format_validation_error", "one_line"]


def one_line(text: str) -> str:
    """``text`` on one line: every run of whitespace becomes one space."""
    return " ".join(str(text).split())


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _is_union(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType)


def _strip_none(annotation: Any) -> Any:
    if _is_union(annotation):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _walk(root: type[BaseModel], loc: Sequence[str | int]) -> tuple[list[str | int], Any, FieldInfo | None]:
    """Follow a pydantic error loc through the model classes.

    Returns the clean path (union tags dropped), the annotation reached (None past an unknown key)
    and the FieldInfo of the last field (None for list items).
    """
    path: list[str | int] = []
    annotation: Any = root
    field: FieldInfo | None = None
    for part in loc:
        current = _strip_none(annotation)
        origin = get_origin(current)
        if isinstance(part, int) and origin in (list, tuple):
            path.append(part)
            annotation, field = (get_args(current) or (Any,))[0], None
        elif isinstance(part, str) and _is_model(current):
            path.append(part)
            field = current.model_fields.get(part)
            annotation = field.annotation if field is not None else None
        elif isinstance(part, str) and origin is dict:
            path.append(part)
            annotation, field = (get_args(current) or (Any, Any))[-1], None
        elif annotation is None:
            path.append(part)
        # else: a union member tag such as 'int' or 'function-after[...]': not part of the key
    return path, annotation, field


def _plural(annotation: Any) -> str:
    annotation = _strip_none(annotation)
    if annotation is str:
        return "strings"
    if annotation is int:
        return "integers"
    if annotation is float:
        return "numbers"
    if _is_model(annotation):
        return "mappings"
    return "values"


def _constraints(metadata: Sequence[Any]) -> str:
    parts = []
    for item in metadata:
        for attr, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(item, attr, None) is not None:
                parts.append(f"{symbol} {getattr(item, attr)}")
    return " " + " and ".join(parts) if parts else ""


def _expected(annotation: Any, metadata: Sequence[Any] = ()) -> str:
    """What a value of `annotation` looks like, in words ('an integer >= 1 or null')."""
    if _is_union(annotation):
        args = get_args(annotation)
        words = " or ".join(_expected(a, metadata) for a in args if a is not type(None))
        return words + (" or null" if type(None) in args else "")
    origin = get_origin(annotation)
    min_len = next((m.min_length for m in metadata if getattr(m, "min_length", None)), None)
    pattern = next((m.pattern for m in metadata if getattr(m, "pattern", None)), None)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    if origin in (list, tuple):
        item = (get_args(annotation) or (Any,))[0]
        head = "a non-empty list" if min_len == 1 else "a list"
        if min_len and min_len > 1:
            head = f"a list of at least {min_len}"
        return f"{head} of {_plural(item)}"
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "an integer" + _constraints(metadata)
    if annotation is float:
        return "a number" + _constraints(metadata)
    if annotation is str:
        if pattern:
            return f"a string matching {pattern}"
        return "a non-empty string" if min_len == 1 else "a string"
    if _is_model(annotation):
        return "a mapping with keys " + ", ".join(annotation.model_fields)
    return getattr(annotation, "__name__", str(annotation))


def _show(value: Any, limit: int = 60) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fix_hint(field: FieldInfo | None) -> str:
    if field is None:
        return ""
    example = field.examples[0] if field.examples else None
    if example is None and field.default is not None and not field.is_required():
        default = field.get_default(call_default_factory=False)
        if isinstance(default, str | int | float | bool):
            example = default
    if example is not None:
        example_text = example if isinstance(example, str) else _show(example)
        return f" (set it to e.g. {example_text}" + (")" if field.is_required() else ", or remove the key)")
    return "" if field.is_required() else " (fix the value or remove the key)"


def _describe(error: Mapping[str, Any], root: type[BaseModel]) -> tuple[str, str]:
    """(dotted key, problem) for one pydantic error dict."""
    kind, loc, msg = error["type"], error["loc"], one_line(error["msg"])
    if kind == "extra_forbidden":
        path, annotation, _ = _walk(root, loc[:-1])
        key = str(loc[-1])
        dotted = ".".join(str(p) for p in (*path, key))
        allowed = list(_strip_none(annotation).model_fields) if _is_model(_strip_none(annotation)) else []
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        hint = f", did you mean {close[0]!r}?" if close else ""
        return dotted, f"unknown key{hint} (allowed keys: {', '.join(allowed)})"
    path, annotation, field = _walk(root, loc)
    dotted = ".".join(str(p) for p in path)
    if kind == "missing":
        what = f" (add it: {field.description})" if field is not None and field.description else ""
        return dotted, f"required key missing{what}"
    if kind in ("value_error", "assertion_error"):
        return dotted, re.sub(r"^(Value error|Assertion failed), ", "", msg)
    metadata = field.metadata if field is not None else ()
    expected = _expected(annotation, metadata) if annotation is not None else msg
    return dotted, f"expected {expected}, got {_show(error.get('input'))}{_fix_hint(field)}"


def format_validation_error(
    err: ValidationError,
    source: str,
    root_model: type[BaseModel],
    *,
    overridden: Mapping[str, str] | None = None,
) -> str:
    """All problems of `err` as ONE line: `source: dotted.key: problem (fix)` joined by `; `.

    `overridden` maps dotted keys to the override that set them, so a problem caused by a
    command-line override says so.
    """
    problems: list[str] = []
    for error in err.errors(include_url=False):
        dotted, problem = _describe(error, root_model)
        note = ""
        for key, item in (overridden or {}).items():
            if dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + "."):
                note = f" (from override {item!r})"
        line = f"{source}: {dotted}: {problem}{note}" if dotted else f"{source}: {problem}{note}"
        if line not in problems:
            problems.append(line)
    return "; ".join(problems)

