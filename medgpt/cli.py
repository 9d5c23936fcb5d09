"""Every launcher's command line, built from dataclasses: each field is one ``--flag`` whose help,
default and choices are written once, on the field (:func:`arg`).

Values reach the program as text and are converted here, not by argparse, so that every problem
of a command line (unknown flags, wrong types, unknown choices, missing flags) is reported at once
(argparse stops at the first). This module imports no torch, DeepSpeed or transformers: the
launchers answer ``--help`` and report bad flags before loading them.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

from medgpt.console import VERBOSE_HELP
from medgpt.errors import CliParser, UserError

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


def arg(default: Any = dataclasses.MISSING, *, help: str, choices: Sequence[str] = (),
        positional: bool = False) -> Any:
    """A dataclass field that is also a command-line argument. No default: the flag is required.
    A ``tuple[str, ...]`` field is a repeatable flag (default ``()``)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": tuple(choices),
                                                        "positional": positional})


def field_type(cls: type, name: str) -> type:
    """The field's type: ``float | None`` gives float, ``tuple[str, ...]`` gives tuple."""
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def coerce(value: Any, kind: type, where: str) -> Any:
    """Turn a YAML or command-line value into the field's type, or say why not."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in TRUE_WORDS:
            return True
        if text in FALSE_WORDS:
            return False
        raise UserError(f"{where}: expected true or false, got '{value}'")
    if kind is tuple:  # a repeatable flag: argparse already collected its values
        return tuple(value)
    if kind is float and isinstance(value, str):
        value = value.strip()
    try:
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: expected {kind.__name__}, got '{value}'") from None


def new_parser(description: str | None) -> CliParser:
    """A launcher's parser; its module docstring (usage examples included) is the description."""
    parser = CliParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The deepspeed launcher appends --local_rank to every rank's command line
    # (deepspeed/launcher/launch.py:234-235); the environment carries the same value.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def _help_line(f: dataclasses.Field, kind: type) -> str:
    """The field's help, then what happens when the flag is left out ('%' escaped: argparse
    %-formats help texts)."""
    if f.default is dataclasses.MISSING:
        line = f"{f.metadata['help']} (required)"
    elif kind is bool:
        line = f"{f.metadata['help']} (default: {'on' if f.default else 'off'}; on/off, true/false, yes/no, 1/0)"
    else:
        shown = "none" if f.default in (None, ()) else "''" if f.default == "" else f.default
        line = f"{f.metadata['help']} (default: {shown})"
    return line.replace("%", "%%")


def _metavar(f: dataclasses.Field, kind: type) -> str:
    if f.metadata["positional"]:
        return f.name
    if f.metadata["choices"]:
        return "{" + ",".join(f.metadata["choices"]) + "}"
    return "{on,off}" if kind is bool else "STR" if kind is tuple else kind.__name__.upper()


def add_fields(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, shown: bool = True) -> None:
    """One argument per field of ``cls``, each with default None (so that "not given" is told
    apart from the default: a YAML file's value wins over the default, a flag over both).
    ``shown=False``: accepted but left out of --help."""
    for f in dataclasses.fields(cls):
        kind = field_type(cls, f.name)
        options: dict[str, Any] = dict(default=None, metavar=_metavar(f, kind),
                                       help=_help_line(f, kind) if shown else argparse.SUPPRESS)
        if f.metadata["positional"]:
            action = parser.add_argument(f.name, nargs="?", **options)
        elif kind is bool:  # a bare --flag means true, as argparse's store_true
            action = parser.add_argument(f"--{f.name}", nargs="?", const="true", **options)
        elif kind is tuple:
            action = parser.add_argument(f"--{f.name}", action="append", **options)
        else:
            action = parser.add_argument(f"--{f.name}", **options)
        # Optional to argparse, which would stop at the first one missing (missing_problems reports
        # them all); --help still shows it as required (CliParser.format_help).
        action.shown_required = f.default is dataclasses.MISSING  # type: ignore[attr-defined]


def given_values(args: argparse.Namespace, cls: type, problems: list[str]) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line, converted to their types. A value that does
    not convert, or is not one of the field's choices, becomes a problem and is left out (so the
    field keeps its default, and a mistake does not hide the problems found after it)."""
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name)
        if value is None:
            continue
        where = f.name if f.metadata["positional"] else f"--{f.name}"
        try:
            value = coerce(value, field_type(cls, f.name), where)
        except UserError as err:
            problems += err.problems
            continue
        unknown = choice_problems(cls, {f.name: value})
        problems += unknown
        if not unknown:
            values[f.name] = value
    return values


def missing_problems(cls: type, values: dict[str, Any]) -> list[str]:
    """One problem per required field not given."""
    return [f"{f.name if f.metadata['positional'] else '--' + f.name} is required: {f.metadata['help']}"
            for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name not in values]


def choice_problems(cls: type, values: dict[str, Any]) -> list[str]:
    """One problem per value (of a field of ``cls``) that is not one of the field's choices."""
    problems = []
    for f in dataclasses.fields(cls):
        choices = f.metadata.get("choices")
        if choices and f.name in values and values[f.name] not in choices:
            problems.append(f"{f.name} '{values[f.name]}' is unknown; use one of {', '.join(choices)}")
    return problems


def request_parser(cls: type, description: str | None) -> CliParser:
    parser = new_parser(description)
    add_fields(parser, cls)
    return parser


@dataclasses.dataclass(frozen=True, kw_only=True)
class Request:
    """A launcher's command line as a dataclass of :func:`arg` fields."""
    verbose: bool = arg(False, help=VERBOSE_HELP)

    def problems(self) -> list[str]:
        """Every problem of the values beyond their types and choices, one sentence each."""
        return []


R = TypeVar("R", bound=Request)


def parse_request(cls: type[R], parser: CliParser, argv: list[str]) -> R:
    """The ``cls`` instance a command line asks for, read with ``parser`` (:func:`request_parser`
    of ``cls``). Every problem of the line is reported at once: a value of the wrong type or
    choice is its own problem, and the other values are checked with that field's default."""
    args, unknown = parser.parse_known_args(argv)
    problems = parser.unknown_problems(unknown)
    values = given_values(args, cls, problems)
    missing = missing_problems(cls, values)
    if missing:  # no instance without its required fields
        raise UserError(*problems, *missing)
    request = cls(**values)
    problems += request.problems()
    if problems:
        raise UserError(*problems)
    return request
