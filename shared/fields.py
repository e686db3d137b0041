"""Typed reads of one field of a JSON record, for the readers of users' files.

JSON written by hand or by other tools carries numbers as strings, booleans where numbers belong,
NaN (Python's json reads it), a term list as a bare string. Each read here takes one field and
either returns it as the reader's type or raises `FieldError` naming the field, the value and what
it should be; the reader turns that into a BadInput with its file and line. Nothing is converted
silently: a numeric string is refused with the fix (write 2, not "2"), since a tool that wrote one
string may have written others that do not parse the same way.
"""
from __future__ import annotations

import math


class FieldError(ValueError):
    """A field with a value of the wrong type or out of range; the message names the field."""

    def __init__(self, field: str, value, want: str):
        self.field = field
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        super().__init__(f"field {field!r} is {shown}: {want}")


_MISSING = object()


def number(d: dict, field: str, default=_MISSING, *, low: float | None = None, high: float | None = None,
           low_open: bool = False) -> float | None:
    """d[field] as a finite number within [low, high] (`low_open`: strictly above low); `default`
    when absent or null (a missing field without a default is a KeyError, the readers' 'missing')."""
    value = d.get(field, None)
    if value is None:
        if default is _MISSING:
            raise KeyError(field)
        return default
    if isinstance(value, bool):
        raise FieldError(field, value, "give a number, not true/false")
    if isinstance(value, str):
        raise FieldError(field, value, "give a number without quotes")
    if not isinstance(value, (int, float)):
        raise FieldError(field, value, "give a number")
    if not math.isfinite(value):
        raise FieldError(field, value, "give a finite number")
    if low is not None and (value <= low if low_open else value < low):
        raise FieldError(field, value, f"must be {'above' if low_open else 'at least'} {low:g}")
    if high is not None and value > high:
        raise FieldError(field, value, f"must be at most {high:g}")
    return float(value)


def flag(d: dict, field: str, default: bool = False) -> bool:
    """d[field] as a JSON boolean (true/false); 0, 1, "false"... are refused: "false" would read as true."""
    value = d.get(field, None)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise FieldError(field, value, "give true or false")
    return value


def text(d: dict, field: str, default=_MISSING, *, ids: bool = False) -> str:
    """d[field] as a string; `ids` also takes a whole number (ids and speakers are often numbers)."""
    value = d.get(field, None)
    if value is None:
        if default is _MISSING:
            raise KeyError(field)
        return default
    if isinstance(value, str):
        return value
    if ids and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise FieldError(field, value, "give a string" + (" or a whole number" if ids else ""))


def text_list(d: dict, field: str, default=_MISSING) -> list[str]:
    """d[field] as a list of strings; a bare string is refused (is "a b" one term or two?)."""
    value = d.get(field, None)
    if value is None:
        if default is _MISSING:
            raise KeyError(field)
        return list(default)
    if isinstance(value, str):
        raise FieldError(field, value, f'give a list of strings: [{value!r}] for one'.replace("'", '"'))
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FieldError(field, value, "give a list of strings")
    return list(value)


def span(start: float | None, end: float | None, names: tuple[str, str]) -> None:
    """A time span's end must not come before its start (either may be absent)."""
    if start is not None and end is not None and end < start:
        raise FieldError(names[1], end, f"ends before {names[0]} ({start:g})")
