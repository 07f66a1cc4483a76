"""Every option of every command, declared once.

An option is a field of a pydantic dataclass (`LocateConfig`, `Criterion`, an
experiment's own options): its type with its checks (a range, a finite number, one line
of text), its default and its help, written with `option`. From that one declaration
come the command-line options of every command that takes it (`add_options`), the value
the command hands to the library (`from_args`), and the check of the same option in a
sweep file (`check_table`), which `to_argv` turns back into command-line words.

Why pydantic fields and argparse rather than tyro or jsonargparse: pydantic already
types our results documents, so one library checks both; argparse keeps a usage
mistake to one line (`experiments._cli.Parser`), where those libraries print panels or
several lines; and the derivation below is the whole of the glue.
"""

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import AfterValidator, BeforeValidator, Field, TypeAdapter, ValidationError

from sw_lens.errors import SwLensError

# --- checked types: the message of each check is the one line a user sees -------------------


def _at_least(minimum: int, what: str, maximum: int | None = None):
    def check(value: int) -> int:
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" <= {maximum}" if maximum is not None else ""
            raise ValueError(f"must be {what}{upper}, got {value}")
        return value

    return AfterValidator(check)


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value!r}")
    return value


def _positive_number(value: float) -> float:
    if not value > 0:
        raise ValueError(f"must be a positive number, got {value!r}")
    return value


def _fraction(value: float) -> float:
    if not 0 < value <= 1:
        raise ValueError(f"must be above 0 and at most 1, got {value!r}")
    return value


def one_line(value: str) -> str:
    """Nothing from a sweep file or a command line may start a new line of a generated
    script or a log."""
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValueError(f"contains a newline or control character: {value!r:.60}")
    return value


def _comma_separated(value: Any) -> Any:
    return [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value


def _listed(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


PositiveInt = Annotated[int, _at_least(1, "a positive integer")]
NonNegativeInt = Annotated[int, _at_least(0, "a non-negative integer")]
Seed = Annotated[int, _at_least(0, "a non-negative integer", 2**32 - 1)]  # numpy's limit
Finite = Annotated[float, AfterValidator(_finite)]
PositiveFinite = Annotated[float, AfterValidator(_finite), AfterValidator(_positive_number)]
Fraction = Annotated[float, AfterValidator(_finite), AfterValidator(_fraction)]
Text = Annotated[str, AfterValidator(one_line)]
Texts = Annotated[list[Text], BeforeValidator(_listed)]  # a string is a list of one
FiniteList = Annotated[list[Finite], BeforeValidator(_comma_separated)]  # "0.5,2" or [0.5, 2]
Bos = Literal["auto", "yes", "no"]


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    metavar: str | None = None,
    cli: Literal["append", "nargs"] | None = None,
    const: Any = None,
    group: str | None = None,
) -> Any:
    """A field of an options dataclass. `flag` names it on the command line and in sweep
    files when its field name is not the user's word; a list is given by repeating the
    flag (``cli="append"``), as several words (``"nargs"``) or, by default, as one
    comma-separated word. An option with a `const` may be given without a value, meaning
    `const`. A `group` names the commands that take the option beyond the job's own
    (`sw_lens.setup`): declaring it there is the one edit that reaches them all."""
    extra = {"flag": flag, "metavar": metavar, "cli": cli, "const": const, "group": group}
    extra = {key: value for key, value in extra.items() if value is not None}
    if isinstance(default, list):
        return Field(
            default_factory=lambda: list(default), description=help, json_schema_extra=extra
        )
    return Field(default, description=help, json_schema_extra=extra)


# --- the derivation -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Option:
    path: tuple[str, ...]  # field names from the options class down to this option
    key: str  # its name in sweep files; --key-with-dashes on the command line
    annotation: Any
    default: Any
    help: str
    extra: dict

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def is_flag(self) -> bool:
        return self.annotation is bool

    @property
    def style(self) -> str | None:
        return self.extra.get("cli")


def _options(cls: type, path: tuple[str, ...] = ()) -> Iterable[_Option]:
    for name, info in cls.__pydantic_fields__.items():
        if hasattr(info.annotation, "__pydantic_fields__"):  # options nested in options
            yield from _options(info.annotation, (*path, name))
            continue
        extra = info.json_schema_extra or {}
        default = info.get_default(call_default_factory=True)
        annotation = (
            Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
        )
        yield _Option(
            (*path, name), extra.get("flag", name), annotation, default, info.description, extra
        )


def options_of(cls: type, names: Iterable[str] | None = None) -> list[_Option]:
    """The options of `cls` (by their keys; all when `names` is None)."""
    every = list(_options(cls))
    if names is None:
        return every
    wanted = list(names)
    by_key = {o.key: o for o in every}
    missing = [n for n in wanted if n not in by_key]
    if missing:
        raise KeyError(f"{cls.__name__} has no option {missing}")
    return [by_key[n] for n in wanted]


def keys(cls: type, group: str | None) -> tuple[str, ...]:
    """The keys of the options of `cls` in `group` (None: in no group)."""
    return tuple(o.key for o in _options(cls) if o.extra.get("group") == group)


def _item_annotation(annotation: Any) -> Any:
    """The type of one element of a list option (what one repeated flag gives)."""
    base = get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation
    return get_args(base)[0]


def first_error(err: ValidationError) -> str:
    """A pydantic error as the one line a user reads: ``must be ...``."""
    first = err.errors()[0]
    message = first["msg"].removeprefix("Value error, ")
    if message.startswith("Input should be "):
        message = "must be " + message.removeprefix("Input should be ")
        message += f", got {first['input']!r:.60}"
    return message


def _converter(annotation: Any) -> Callable[[str], Any]:
    adapter = TypeAdapter(annotation)

    def convert(text: str) -> Any:
        try:
            return adapter.validate_python(text, strict=False)
        except ValidationError as err:
            raise argparse.ArgumentTypeError(first_error(err)) from None

    return convert


def add_options(
    parser: argparse.ArgumentParser,
    cls: type,
    names: Iterable[str] | None = None,
    *,
    defaults: dict | None = None,
    helps: dict | None = None,
) -> None:
    """Add the options of `cls` (or those named) to `parser`; `defaults` and `helps`
    change a command's default or help of an option by key."""
    defaults, helps = defaults or {}, helps or {}
    for o in options_of(cls, names):
        default = defaults.get(o.key, o.default)
        help = helps.get(o.key, o.help)
        if o.style == "append" and o.default:
            help += f" (none given: {_shown(o.default)})"
        kwargs: dict[str, Any] = {"dest": o.key, "help": help}
        if "metavar" in o.extra:
            kwargs["metavar"] = o.extra["metavar"]
        if o.is_flag:
            parser.add_argument(o.flag, action="store_true", **kwargs)
            continue
        choices = _choices(o.annotation)
        if choices:
            kwargs["choices"] = choices
        if o.style == "append":
            kwargs |= {"action": "append", "type": _converter(_item_annotation(o.annotation))}
            default = None  # argparse appends to a given default; `from_args` fills it in
        elif "const" in o.extra:
            kwargs |= {"nargs": "?", "const": o.extra["const"], "type": _converter(o.annotation)}
        elif o.style == "nargs":
            kwargs |= {"nargs": "+", "type": _converter(_item_annotation(o.annotation))}
        else:
            kwargs["type"] = _converter(o.annotation)
        parser.add_argument(o.flag, default=default, **kwargs)


def _shown(default: Any) -> str:
    return ", ".join(repr(str(v)) for v in default)


def _choices(annotation: Any) -> list | None:
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return None


def from_args(cls: type, args: argparse.Namespace):
    """An instance of `cls` from the options `args` holds (defaults for the others)."""
    values: dict[str, Any] = {}
    for o in _options(cls):
        value = getattr(args, o.key, None)
        if value is None:
            continue  # not an option of this command, or not given: the field's default
        target = values
        for name in o.path[:-1]:
            target = target.setdefault(name, {})
        target[o.path[-1]] = value
    nested = {
        name: info.annotation(**values.pop(name))
        for name, info in cls.__pydantic_fields__.items()
        if isinstance(values.get(name), dict)
    }
    return cls(**values, **nested)


# --- sweep files ------------------------------------------------------------------------------


def check_table(options: list[_Option], table: dict, where: str) -> dict:
    """Check a sweep file's options (keys already known to be options) exactly as the
    command line would take them; TOML's types must match (no string for a number)."""
    by_key = {o.key: o for o in options}
    checked = {}
    for key, value in table.items():
        try:
            checked[key] = TypeAdapter(by_key[key].annotation).validate_python(value, strict=True)
        except ValidationError as err:
            raise SwLensError(f"{where}: '{key}' {first_error(err)}") from None
    return checked


def to_argv(options: list[_Option], values: dict) -> list[str]:
    """Command-line words for checked option values; ``--flag=value`` keeps a value such
    as ``--help`` a value."""
    by_key = {o.key: o for o in options}
    argv = []
    for key, value in values.items():
        o = by_key[key]
        if o.is_flag:
            argv += [o.flag] if value else []
        elif o.style == "append":
            argv += [f"{o.flag}={_word(v)}" for v in value]
        elif o.style == "nargs":
            argv += [o.flag, *map(_word, value)]
        elif isinstance(value, list):
            argv.append(f"{o.flag}={','.join(map(_word, value))}")
        else:
            argv.append(f"{o.flag}={_word(value)}")
    return argv


def _word(value: Any) -> str:
    return value.cli_text() if hasattr(value, "cli_text") else str(value)
