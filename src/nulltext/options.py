"""Options declared once, on their config field (guided-diffusion's ``add_dict_to_argparser``):
``num_steps: int = option(50, flag="--steps", help=..., column="steps", widget=Widget(...))``.

The command line's arguments, the parsed arguments -> config mapping, the "ignored option"
warnings, the manifest columns, the web UI's widgets and the docs' option tables are all read
from these records (:func:`options`), so a new field with an ``option`` appears in each of them.
This module parses text and describes options; it imports neither argparse users nor Gradio."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from .errors import NulltextError

KEY = "nulltext"  # the key of a field's metadata that holds its Option


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()  # "the config's default" (dataclasses.MISSING would read as "no default" in a dataclass)


@dataclass(frozen=True)
class Widget:
    """How the web UI shows an option: ``kind`` is slider, number, radio, dropdown or textbox;
    ``props`` go to the Gradio component as they are (minimum, maximum, step, choices, ...).
    ``value``: what the widget shows for the config's default where that default is not a value
    the widget can hold (size None -> 0, "the model's native size"; no words -> "")."""

    kind: str
    label: str
    props: dict = dataclasses.field(default_factory=dict)
    value: Any = UNSET


@dataclass(frozen=True)
class Option:
    """One option of a config field. ``name`` and ``default`` are the field's (filled in by
    :func:`options`); the rest is declared with :func:`option`."""

    flag: str | None = None  # the command line's flag ("--steps"); None: no flag
    help: str = ""  # one text: the flag's help and the docs table's meaning
    parse: Callable | None = None  # the flag's text -> value; raises NulltextError (or ValueError)
    metavar: Any = None
    action: str | None = None  # argparse action (store_true, append)
    nargs: Any = None
    choices: tuple | None = None
    arg_default: Any = UNSET  # the flag's default where it is not the field's (--blend: None)
    convert: Callable | None = None  # the parsed flag -> the field's value (a tuple of values with ``fields``)
    fields: tuple[str, ...] = ()  # fields one flag sets together (--blend: blend_source, blend_target)
    dest: str | None = None  # argparse dest where it is not the flag's (--edit-method -> method)
    # the flag where one command takes both configs and this one's plain flag is the other's
    # (InversionConfig.method: --inversion-method beside the edit's --method), and where that is
    qualified: str | None = None
    qualified_where: str = ""
    column: str | None = None  # the manifest column (nulltext batch) that overrides the option per job
    cell: Any = None  # int, float or str (the cell cast, with a message naming the column), or cell -> value
    methods: tuple[str, ...] | None = None  # the only (edit) methods it acts on; None: all
    with_file: str = "ignored"  # inversion options given with an inversion file: "ignored" or "checked"
    widget: Widget | None = None
    default_text: str | None = None  # how the default reads in help and docs where the value does not say it
    name: str = ""
    default: Any = None

    def flag_for(self, qualified: bool = False) -> str | None:
        return self.qualified if qualified and self.qualified else self.flag

    def dest_for(self, qualified: bool = False) -> str:
        if self.dest:
            return self.dest
        return self.flag_for(qualified).lstrip("-").replace("-", "_")

    @property
    def names(self) -> tuple[str, ...]:
        return self.fields or (self.name,)

    def to_field(self, value):
        """The parsed flag's value as the field's (a tuple of values for ``fields``)."""
        return self.convert(value) if self.convert else value

    def describe_default(self) -> str:
        if self.default_text is not None:
            return self.default_text
        return describe(self.default)


def option(default=dataclasses.MISSING, *, default_factory=dataclasses.MISSING, **declared) -> Any:
    """A dataclass field whose metadata declares its option (see :class:`Option` for the keywords)."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={KEY: Option(**declared)})


def options(cls) -> list[Option]:
    """The declared options of a config class (or instance), in field order, with their names
    and defaults."""
    out = []
    for f in dataclasses.fields(cls):
        o = f.metadata.get(KEY)
        if o is None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out.append(dataclasses.replace(o, name=f.name, default=default))
    return out


def option_of(cls, name: str) -> Option:
    for o in options(cls):
        if o.name == name:
            return o
    raise KeyError(name)


def describe(value) -> str:
    """A default as help and docs show it: 1e-05, 0.8, 0,0,0,0, none, off."""
    if value is None or value == ():
        return "none"
    if value is False:
        return "off"
    if value is True:
        return "on"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(describe(v) for v in value)
    return str(value)


# --- text -> value: the command line's argument types (raising NulltextError; the CLI words them)

# the largest side nulltext inverts at, in pixels (SDXL's native side is 1024; 4096 needs a 512x512
# latent, far past what any of these models was trained for)
MAX_SIZE = 4096


def parse_size(text: str) -> tuple[int, int] | int:
    """'768x512' -> (768, 512) (width x height); '512' -> 512, the long side (the short one follows
    the image's aspect)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise NulltextError(f"size must be N or WxH in pixels, got {text!r}") from None
    if len(parts) not in (1, 2) or min(parts) <= 0:
        raise NulltextError(f"size must be N or WxH with positive numbers, got {text!r}")
    if max(parts) > MAX_SIZE:
        raise NulltextError(f"size {text!r} is too large: at most {MAX_SIZE} pixels a side")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def parse_reweight(text: str | None) -> tuple[tuple[str, float], ...]:
    """'fluffy=2 smiling=5' or 'fluffy=2, smiling=5' -> (("fluffy", 2.0), ("smiling", 5.0)): the
    reweight pairs of the web UI and of batch manifests (the command line's --reweight takes
    comma-separated phrases)."""
    pairs = []
    for item in re.split(r"[\s,]+", text or ""):
        if not item:
            continue
        word, sep, factor = item.partition("=")
        try:
            value = float(factor)
        except ValueError:
            value = None
        if not sep or not word or value is None:
            raise NulltextError(f"reweight takes word=factor pairs (e.g. fluffy=2), got {item!r}")
        pairs.append((word, value))
    return tuple(pairs)



def number(cast, positive: bool):
    """A finite number of ``cast`` that is > 0 (``positive``) or >= 0."""
    kind = "integer" if cast is int else "number"

    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise NulltextError(f"expected a {kind}, got {text!r}") from None
        if not math.isfinite(v) or (v <= 0 if positive else v < 0):
            raise NulltextError(f"must be {'positive' if positive else 'non-negative'}, got {text}")
        return v

    parse.__name__ = f"{'positive' if positive else 'non_negative'}_{cast.__name__}"
    return parse


positive_int, nonneg_int = number(int, True), number(int, False)
positive_float, nonneg_float = number(float, True), number(float, False)


def crop(text: str) -> tuple[int, int, int, int]:
    try:
        values = tuple(int(p) for p in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or min(values) < 0:
        raise NulltextError(f"expected four non-negative integers L,R,T,B, got {text!r}")
    return values


def fraction_or_range(text: str):
    """'0.8' -> 0.8 (the steps [0, 0.8)); '0.2,0.6' or '0.2:0.6' -> (0.2, 0.6)."""
    message = f"expected a fraction like 0.8 or a range like 0.2,0.6, got {text!r}"
    try:
        values = [float(p) for p in text.replace(":", ",").split(",")]
    except ValueError:
        raise NulltextError(message) from None
    if len(values) not in (1, 2) or not all(math.isfinite(v) for v in values):
        raise NulltextError(message)
    return values[0] if len(values) == 1 else tuple(values)


def cross_spec(text: str):
    """A fraction, a range, or per-word 'tiger=0.4,default=0.8' (ranges there as a:b)."""
    if "=" not in text:
        return fraction_or_range(text)
    spec = {}
    for item in text.split(","):
        word, sep, value = item.partition("=")
        if not sep or not word.strip():
            raise NulltextError(f"expected word=fraction pairs like 'tiger=0.4,default=0.8', got {text!r}")
        spec[word.strip()] = fraction_or_range(value.strip())
    return spec


def reweight_pairs(text: str) -> list[tuple[str, float]]:
    """'fluffy=2' or 'fluffy=2,smiling=5' (the command line's --reweight)."""
    out = []
    for item in text.split(","):
        word, sep, value = item.partition("=")
        try:
            factor = float(value)
        except ValueError:
            factor = float("nan")
        if not sep or not word.strip() or not math.isfinite(factor):
            raise NulltextError(f"expected word=factor like 'fluffy=2', got {text!r}")
        out.append((word.strip(), factor))
    return out


def words(text: str) -> tuple[str, ...]:
    """'cat' or 'cat,mirror' (each item a word or phrase of the prompt)."""
    return tuple(w.strip() for w in text.split(",") if w.strip())


# --- manifest cells: a CSV cell is the text the flag takes ('0.2,0.6', 'tiger=0.4,default=0.8',
# '96x64'); a JSON cell may also be the value itself (a number, true/false, a list, an object). Each
# parser takes the column's name, for its one-line error; the value's range is checked by the config.

def _kind_error(name: str, kind: str, value) -> NulltextError:
    return NulltextError(f"{name} must be {kind}, got {value!r}"[:200])


def integer_cell(name: str, value) -> int:
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


def number_cell(name: str, value) -> float:
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value.strip() if isinstance(value, str) else value)
        except (ValueError, OverflowError):
            pass
    raise _kind_error(name, "a number", value)


def text_cell(name: str, value) -> str:
    if not isinstance(value, str):
        raise _kind_error(name, "text", value)
    return value.strip()


def flag_cell(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower() if isinstance(value, (str, int)) else None
    if word in ("true", "yes", "1"):
        return True
    if word in ("false", "no", "0"):
        return False
    raise _kind_error(name, "true or false", value)


def size_cell(name: str, value):
    if isinstance(value, str):
        return parse_size(value.strip())
    if isinstance(value, list) and len(value) == 2:
        return (integer_cell(name, value[0]), integer_cell(name, value[1]))
    return integer_cell(name, value)


def crop_cell(name: str, value) -> tuple[int, ...]:
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else None
    if items is None or len(items) != 4:
        raise _kind_error(name, "four integers L,R,T,B", value)
    return tuple(integer_cell(name, v) for v in items)


def fraction_cell(name: str, value):
    """0.8 (the steps [0, 0.8)) or a range: [0.2, 0.6], '0.2,0.6' or '0.2:0.6'."""
    if isinstance(value, str):
        value = value.replace(":", ",").split(",")
        value = value[0] if len(value) == 1 else value
    if isinstance(value, list):
        if len(value) != 2:
            raise _kind_error(name, "a fraction or a range a,b", value)
        return (number_cell(name, value[0]), number_cell(name, value[1]))
    return number_cell(name, value)


def cross_cell(name: str, value):
    """A fraction or range, or per word: 'tiger=0.4,default=0.8' (ranges a:b) or {"tiger": 0.4}."""
    if isinstance(value, str) and "=" in value:
        pairs = [item.partition("=") for item in value.split(",")]
        if any(not sep or not word.strip() for word, sep, _ in pairs):
            raise _kind_error(name, "word=fraction pairs like 'tiger=0.4,default=0.8'", value)
        value = {word.strip(): spec.strip() for word, _, spec in pairs}
    if isinstance(value, dict):
        return {str(word): fraction_cell(f"{name} for {word!r}", spec) for word, spec in value.items()}
    return fraction_cell(name, value)


def words_cell(name: str, value) -> tuple[str, ...]:
    """'cat' or 'cat,mirror', or a list of words."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else None
    if items is None or not all(isinstance(w, str) for w in items):
        raise _kind_error(name, "words separated by commas", value)
    return tuple(w.strip() for w in items if w.strip())


def blend_cell(name: str, value) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """'SRC TGT' (comma-separated words on each side) or [SRC, TGT]: the two values of --blend
    (and of --masactrl-mask)."""
    sides = value.split() if isinstance(value, str) else value if isinstance(value, list) else None
    if sides is None or len(sides) != 2 or not all(isinstance(s, str) for s in sides):
        raise NulltextError(f"{name} takes two word lists, 'SRC TGT', got {value!r}"[:200])
    source, target = words_cell(name, sides[0]), words_cell(name, sides[1])
    if not source or not target:
        raise NulltextError(f"{name} takes two word lists, 'SRC TGT', got {value!r}"[:200])
    return source, target


def reweight_cell(name: str, value) -> tuple[tuple[str, float], ...]:
    return parse_reweight(text_cell(name, value))


def manifest_columns(*classes) -> dict[str, tuple[str | tuple[str, ...], Callable]]:
    """column -> (field, parser) of the configs' options that a manifest row may override. The
    parser takes a cell that is not None or "" and returns the field's value; it raises a one-line
    NulltextError naming the column. An option that sets several fields (``blend``) has a tuple of
    field names and its parser returns a tuple of values."""
    out = {}
    for cls in classes:
        for o in options(cls):
            if o.column is None:
                continue
            if o.column in out:
                raise ValueError(f"manifest column {o.column!r} is declared twice")
            out[o.column] = (o.fields or o.name, functools.partial(o.cell, o.column))
    return out


def row_overrides(cls, row: dict) -> dict:
    """The fields of ``cls`` a manifest row overrides: {field: value} (for dataclasses.replace)."""
    out = {}
    for column, (field, parse) in manifest_columns(cls).items():
        if row.get(column) in (None, ""):
            continue
        value = parse(row[column])
        out.update(zip(field, value) if isinstance(field, tuple) else [(field, value)])
    return out


# --- docs

def options_table(cls) -> str:
    """The Markdown table of a config's options (docs/cli.md holds one per config)."""
    lines = ["| option | default | manifest column | meaning |", "|---|---|---|---|"]
    for o in options(cls):
        if o.flag is None and o.column is None:
            continue
        if o.flag is None:
            flag = "(no flag)"
        else:
            metavar = " ".join(o.metavar) if isinstance(o.metavar, tuple) else o.metavar
            if o.choices and not metavar:
                metavar = "|".join(o.choices)
            flag = f"`{o.flag}{' ' + metavar if metavar else ''}`".replace("|", "\\|")
            if o.qualified:
                flag += f", `{o.qualified}`"
        meaning = o.help
        if o.qualified:
            meaning += f" (`{o.qualified}` {o.qualified_where})"
        if o.methods:
            meaning += f" ({' and '.join(f'`{m}`' for m in o.methods)} only)"
        column = f"`{o.column}`" if o.column else ""
        lines.append(f"| {flag} | {o.describe_default()} | {column} | {meaning.replace('|', chr(92) + '|')} |")
    return "\n".join(lines) + "\n"
