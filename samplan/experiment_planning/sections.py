"""Typed plan sections: a method's part of plans.json as frozen dataclasses, read once at the boundary.

A section class lists every key it accepts as a field. `from_dict` refuses unknown and missing keys and values of
the wrong type, naming the key's path and the plans file, so a misspelt key fails when the plan is loaded, not at
epoch 40; `to_dict` gives back the JSON form. A field typed with a section class is a nested section; a field typed
with a *tagged* section class (`TAG_KEY` on the base, `TAG` on each variant) takes the variant named by that key,
e.g. intensity rules by their "mode".

Fields declared with `info()` only inform a reader of plans.json (why a size was chosen, the paper's setting, the
choices); every other field must be read by the code that uses the section. `record_reads()` records which fields
are read while it is active (tests/test_plan_keys.py runs every method with it and fails on a key nothing reads).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from contextlib import contextmanager
from typing import Any, ClassVar, Iterator, Literal, TypeVar, Union

from samplan.errors import SamplanError

S = TypeVar("S", bound="PlanSection")
_INFO = "samplan_info"
_reads: set[tuple[type, str]] | None = None
_REPLAN = "re-plan with samplan_plan_and_preprocess (plans written by another samplan version need it too)"


def info(**kwargs: Any) -> Any:
    """A field that only documents the plan: written and shown, never read to make a choice."""
    return dataclasses.field(metadata={_INFO: True}, **kwargs)


def is_info(f: dataclasses.Field) -> bool:
    """True for fields declared with `info()`."""
    return bool(f.metadata.get(_INFO))


@contextmanager
def record_reads() -> Iterator[set[tuple[type, str]]]:
    """Record the (section class, field name) of every field read while the block runs."""
    global _reads
    previous, _reads = _reads, set()
    try:
        yield _reads
    finally:
        seen, _reads = _reads, previous
        if previous is not None:
            previous.update(seen)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanSection:
    """Base of every typed plan section (subclasses are frozen, keyword-only dataclasses)."""

    TAG_KEY: ClassVar[str | None] = None  # on a tagged base: the key that names the variant
    TAG: ClassVar[str | None] = None  # on a variant: its value of TAG_KEY

    def __getattribute__(self, name: str) -> Any:
        if _reads is not None and name[:1] != "_":
            cls = object.__getattribute__(self, "__class__")
            if name in cls.__dataclass_fields__:
                _reads.add((cls, name))
        return object.__getattribute__(self, name)

    @classmethod
    def from_dict(cls: type[S], data: Any, where: str = "section") -> S:
        """Parse the JSON form; SamplanError naming `where` and the key for unknown, missing or mistyped keys."""
        return _parse_section(cls, data, where)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: every field in declaration order, nested sections as dicts."""
        return {f.name: _to_json(object.__getattribute__(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self: S, **changes: Any) -> S:
        """A copy with `changes` (field names checked); reads nothing, so read recording stays exact."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {', '.join(unknown)}")
        values = {n: object.__getattribute__(self, n) for n in names}
        return type(self)(**{**values, **changes})


def _variants(cls: type[PlanSection]) -> dict[str, type[PlanSection]]:
    """The tagged variants below `cls`, by tag."""
    out, todo = {}, list(cls.__subclasses__())
    while todo:
        sub = todo.pop()
        if sub.TAG is not None:
            out[sub.TAG] = sub
        todo.extend(sub.__subclasses__())
    return out


def _parse_section(cls: type[S], data: Any, where: str) -> S:
    if not isinstance(data, dict):
        raise SamplanError(f"{where} must be a JSON object, got {_shown(data)}; {_REPLAN}.")
    if cls.TAG is None and cls.TAG_KEY is not None:  # a tagged base: the key picks the variant
        variants = _variants(cls)
        tag = data.get(cls.TAG_KEY)
        if tag not in variants:
            raise SamplanError(f"{where}.{cls.TAG_KEY} is {_shown(tag)}; use one of {', '.join(sorted(variants))}.")
        cls = variants[tag]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise SamplanError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} (known: {', '.join(fields)}); "
                           f"fix the spelling or {_REPLAN}.")
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise SamplanError(f"{where} lacks {', '.join(map(repr, missing))}; {_REPLAN}.")
    hints = typing.get_type_hints(cls)
    values = {n: _parse_value(hints[n], data[n], f"{where}.{n}") for n in fields if n in data}
    return cls(**values)


def _parse_value(tp: Any, value: Any, where: str) -> Any:
    """`value` checked against the annotation `tp` (nested sections parsed); SamplanError naming `where`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if isinstance(tp, type) and issubclass(tp, PlanSection):
        return _parse_section(tp, value, where)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _parse_value(option, value, where)
            except SamplanError as e:
                errors.append(str(e))
        raise SamplanError(errors[0] if len(errors) == 1 else f"{where} is {_shown(value)}, which fits none of its types.")
    if origin is Literal:
        if value not in args:
            raise SamplanError(f"{where} is {_shown(value)}; use one of {', '.join(map(repr, args))}.")
        return value
    if origin is list or tp is list:
        if not isinstance(value, list):
            raise SamplanError(f"{where} must be a list, got {_shown(value)}.")
        item = args[0] if args else Any
        return [_parse_value(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise SamplanError(f"{where} must be a JSON object, got {_shown(value)}.")
        item = args[1] if args else Any
        return {k: _parse_value(item, v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise SamplanError(f"{where} must be true or false, got {_shown(value)}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SamplanError(f"{where} must be an integer, got {_shown(value)}.")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SamplanError(f"{where} must be a number, got {_shown(value)}.")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise SamplanError(f"{where} must be a string, got {_shown(value)}.")
        return value
    if tp is type(None):
        if value is not None:
            raise SamplanError(f"{where} must be null, got {_shown(value)}.")
        return None
    raise TypeError(f"{where}: plan sections cannot hold values of type {tp!r}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _to_json(value: Any) -> Any:
    if isinstance(value, PlanSection):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


def section_leaves(section: PlanSection, path: str = "") -> Iterator[tuple[str, type, str, bool]]:
    """(key path, section class, field name, info?) of every leaf key of a section: fields whose value is not a
    section (nor a list of sections); values of info fields are not walked into."""
    for f in dataclasses.fields(section):
        value = object.__getattribute__(section, f.name)
        here = f"{path}.{f.name}" if path else f.name
        nested = [value] if isinstance(value, PlanSection) else (
            value if isinstance(value, list) and value and all(isinstance(v, PlanSection) for v in value) else [])
        if nested and not is_info(f):
            for i, v in enumerate(nested):
                yield from section_leaves(v, here if len(nested) == 1 and nested[0] is value else f"{here}[{i}]")
        else:
            yield here, type(section), f.name, is_info(f)
