"""Read a TOML settings file into the settings dataclasses of ``pipeline.config``.

Each value is checked against its field's annotated type, and each error is one line naming the file, the
section and the key (with the nearest valid name for a typo). ``pipeline.config.load_settings`` is the entry point.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from collections.abc import Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union, get_args, get_origin, get_type_hints

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .config import Settings

# the longest any duration setting may be (a ``_s`` field; ``_ms`` in milliseconds): longer than any wait here
# needs, and far inside what the OS's timers, select() and SQLite's busy timeout take (past ~2.9e8 years of
# seconds, or 2^31 ms, they raise OverflowError in the thread that waits, which then dies)
MAX_DURATION_S = 86_400.0


def check_durations(section: str, config: Any) -> None:
    """Every duration of ``config`` (a field named ``*_s``, or ``*_ms``) between 0 and ``MAX_DURATION_S``."""
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        unit = "s" if f.name.endswith("_s") else "ms" if f.name.endswith("_ms") else None
        if unit is None:
            continue
        limit = MAX_DURATION_S * (1000 if unit == "ms" else 1)
        if not 0 <= value <= limit:
            raise ConfigurationError(f"{section}.{f.name} must be between 0 and {limit:,.0f} {unit} (a day), "
                                     f"not {value:g}")


def read_toml(path: Path) -> dict[str, Any]:
    import tomllib  # only with --config: a start without a settings file does not pay for it

    try:
        return tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"{path}: cannot read settings: {exc}") from exc


def with_section(settings: Settings, section: str, values: Any, source: str,
                  given_as: Mapping[str, str] | None = None, home: Path | None = None) -> Settings:
    """Return ``settings`` with ``values`` applied to ``section``; ``source`` (the file) prefixes errors, and a
    key of ``values`` that ``given_as`` names is called by its command-line option in them. A relative path
    value is taken relative to ``home`` (the file's directory) if given."""
    prefix = f"{source}: " if source else ""
    sections = [f.name for f in fields(settings) if dataclasses.is_dataclass(getattr(settings, f.name))]
    if section not in sections:
        what = f"settings section [{_shown(section)}]" if isinstance(values, dict) else f"setting {_shown(section)}"
        raise ConfigurationError(f"{prefix}unknown {what} {_nearest(section, [*sections, 'data_dir'])}")
    if not isinstance(values, dict):
        raise ConfigurationError(f"{prefix}[{section}] must be a table of settings, not {_describe_value(values)}")
    updated = _replace_section(getattr(settings, section), values, section, prefix, home)
    try:
        updated.validate()
        check_durations(section, updated)
    except ConfigurationError as exc:
        options = {f"{section}.{key}": (given_as or {}).get(f"{section}.{key}") for key in values}
        raise ConfigurationError(f"{prefix}{_as_given(str(exc), options)}") from exc
    return replace(settings, **{section: updated})


def _as_given(message: str, options: Mapping[str, str | None]) -> str:
    """``message`` with each setting (``gateway.port``) named as the option that gave it (``--port``): a user who
    typed ``--port 70000`` need not know the settings file's key."""
    for key, option in options.items():
        if option:
            message = re.sub(rf"(?<![\w.]){re.escape(key)}(?!\w)", option, message)
    return message


def _replace_section(current: Any, values: dict[str, Any], section: str, prefix: str = "",
                     home: Path | None = None) -> Any:
    """Return ``current`` with ``values`` replaced, each checked against the field's annotated type (a relative
    path relative to ``home``, if given)."""
    hints = get_type_hints(type(current))
    known = [f.name for f in fields(current)]
    checked = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigurationError(f"{prefix}unknown setting [{section}] {_shown(key)} {_nearest(key, known)}")
        checked[key] = checked_value(value, hints[key], f"{prefix}[{section}] {key}", home)
    return replace(current, **checked)


def _nearest(name: str, known: list[str]) -> str:
    import difflib  # only for an error message

    close = difflib.get_close_matches(name, known, n=1)
    return f"(did you mean {close[0]}?)" if close else f"(known: {', '.join(known)})"


def _shown(name: str) -> str:
    return name if name.isidentifier() else repr(name)[:60]


_WRONG = object()  # _convert's answer for a value that does not fit the type
_TYPE_NAMES = {bool: ("true or false", "booleans"), int: ("an integer", "integers"),
               float: ("a finite number", "finite numbers"),
               str: ("a string", "strings"), Path: ("a path (a string)", "paths")}


def checked_value(value: Any, hint: Any, where: str, home: Path | None = None) -> Any:
    """Return ``value`` as field type ``hint`` holds it, a path with ``~`` expanded and, if relative, joined to
    ``home`` (if given); ConfigurationError "<where> must be X, not Y" if it cannot."""
    converted = _convert(value, hint)
    if converted is _WRONG:
        raise ConfigurationError(f"{where} must be {_describe_type(hint)}, not {_describe_value(value)}")
    if isinstance(converted, Path):  # "~/pdata" in a file was <the file's dir>/~/pdata
        converted = converted.expanduser()
    return home / converted if home is not None and isinstance(converted, Path) else converted


def _convert(value: Any, hint: Any) -> Any:
    """Fit a TOML value to a field type: ints are floats too, strings paths; bools are never numbers."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        fits = (_convert(value, arm) for arm in args if arm is not type(None))
        return next((v for v in fits if v is not _WRONG), _WRONG)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return _WRONG
        item_types = [args[0]] * len(value) if args[-1:] == (Ellipsis,) else list(args)
        items = [_convert(v, t) for v, t in zip(value, item_types, strict=False)]
        return _WRONG if len(item_types) != len(value) or _WRONG in items else tuple(items)
    if isinstance(value, bool) and hint is not bool:
        return _WRONG
    if hint is float and isinstance(value, int):
        return float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):  # TOML has nan and inf
        return _WRONG
    if hint is Path and isinstance(value, str):
        return Path(value)
    if hint is Any:
        return value
    return value if isinstance(value, origin or hint) else _WRONG


def _describe_type(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe_type(a) for a in args if a is not type(None))
    if origin is tuple:
        return f"a list of {_TYPE_NAMES.get(args[0], ('', 'values'))[1]}"
    return _TYPE_NAMES.get(hint, (getattr(hint, "__name__", str(hint)), ""))[0]


def _describe_value(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    kind = {int: "integer", float: "number", str: "string", list: "list", dict: "table"}.get(type(value))
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return f"the {kind} {shown}" if kind else f"a {type(value).__name__} ({shown})"
