"""A manifest cell as an option's value (:data:`nulltext.jobs.OPTION_COLUMNS`): a CSV cell is the
text the command line's flag takes ('0.2,0.6', 'tiger=0.4,default=0.8', '96x64'); a JSON cell may
also be the value itself (a number, true/false, a list, an object). Each parser takes the column's
name, for its one-line error. The value's range is checked by the config it goes into, once.
"""

from __future__ import annotations

from .config import parse_reweight, parse_size
from .errors import NulltextError


def _kind_error(name: str, kind: str, value) -> NulltextError:
    return NulltextError(f"{name} must be {kind}, got {value!r}"[:200])


def integer(name: str, value) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    elif isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _kind_error(name, "an integer", value)


def number(name: str, value) -> float:
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value.strip() if isinstance(value, str) else value)
        except (ValueError, OverflowError):
            pass
    raise _kind_error(name, "a number", value)


def text(name: str, value) -> str:
    if not isinstance(value, str):
        raise _kind_error(name, "text", value)
    return value.strip()


def flag(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower() if isinstance(value, (str, int)) else None
    if word in ("true", "yes", "1"):
        return True
    if word in ("false", "no", "0"):
        return False
    raise _kind_error(name, "true or false", value)


def size(name: str, value):
    if isinstance(value, str):
        return parse_size(value.strip())
    if isinstance(value, list) and len(value) == 2:
        return (integer(name, value[0]), integer(name, value[1]))
    return integer(name, value)


def crop(name: str, value) -> tuple[int, ...]:
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else None
    if items is None or len(items) != 4:
        raise _kind_error(name, "four integers L,R,T,B", value)
    return tuple(integer(name, v) for v in items)


def fraction(name: str, value):
    """0.8 (the steps [0, 0.8)) or a range: [0.2, 0.6], '0.2,0.6' or '0.2:0.6'."""
    if isinstance(value, str):
        value = value.replace(":", ",").split(",")
        value = value[0] if len(value) == 1 else value
    if isinstance(value, list):
        if len(value) != 2:
            raise _kind_error(name, "a fraction or a range a,b", value)
        return (number(name, value[0]), number(name, value[1]))
    return number(name, value)


def cross_spec(name: str, value):
    """A fraction or range, or per word: 'tiger=0.4,default=0.8' (ranges a:b) or {"tiger": 0.4}."""
    if isinstance(value, str) and "=" in value:
        pairs = [item.partition("=") for item in value.split(",")]
        if any(not sep or not word.strip() for word, sep, _ in pairs):
            raise _kind_error(name, "word=fraction pairs like 'tiger=0.4,default=0.8'", value)
        value = {word.strip(): spec.strip() for word, _, spec in pairs}
    if isinstance(value, dict):
        return {str(word): fraction(f"{name} for {word!r}", spec) for word, spec in value.items()}
    return fraction(name, value)


def words(name: str, value) -> tuple[str, ...]:
    """'cat' or 'cat,mirror', or a list of words."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else None
    if items is None or not all(isinstance(w, str) for w in items):
        raise _kind_error(name, "words separated by commas", value)
    return tuple(w.strip() for w in items if w.strip())


def blend(name: str, value) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """'SRC TGT' (comma-separated words on each side) or [SRC, TGT]: the --blend flag's two values."""
    sides = value.split() if isinstance(value, str) else value if isinstance(value, list) else None
    if sides is None or len(sides) != 2 or not all(isinstance(s, str) for s in sides):
        raise NulltextError(f"blend takes two word lists, 'SRC TGT', got {value!r}"[:200])
    source, target = words(name, sides[0]), words(name, sides[1])
    if not source or not target:
        raise NulltextError(f"blend takes two word lists, 'SRC TGT', got {value!r}"[:200])
    return source, target


def reweight(name: str, value) -> tuple[tuple[str, float], ...]:
    return parse_reweight(text(name, value))
