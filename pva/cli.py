"""The ``pva`` command, generated from the typed, documented functions behind it.

Each command is one function (:data:`COMMANDS`). Its flags are the function's parameters
(``image_size`` -> ``--image-size``), typed by their annotations (``Literal`` -> choices,
``bool`` -> a switch, ``Sequence`` -> a comma list), documented by the function's Google
docstring (the summary and body are the command's help, each ``Args`` entry a flag's help), and
range-checked by the table the function itself checks (:mod:`pva.checks`). So an option is
written once: its parameter, its docstring line, its range. ``pva train`` is LightningCLI
(:mod:`pva.training`); ``python -m benchmarks`` is built here the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import os
import re
import shlex
import sys
import types
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import docstring_parser

from pva.checks import Range


@dataclass(frozen=True)
class Command:
    """One command: the function it runs and what the command line adds to it.

    Args:
        name: The command's words after the program name (``"shards build"``).
        target: The function, as ``"module:function"`` (imported when the command is built).
        ranges: The function's ranges table, as ``"module:NAME"``: the allowed numbers of each
            numeric parameter, which the function checks too.
        flags: Flags whose name is not the parameter's (``{"source_format": "--format"}``).
        hidden: Parameters that are not flags, each with a function of the command line
            (``argv``) giving its value.
        report: Prints what a run made: called with the function's result and its arguments.
        extra_help: Text appended to a flag's help, computed when the parser is built (for
            registries that grow: the evaluation methods).
    """

    name: str
    target: str
    ranges: str | None = None
    flags: Mapping[str, str] = field(default_factory=dict)
    hidden: Mapping[str, Callable[[list[str]], object]] = field(default_factory=dict)
    report: Callable[[Any, dict[str, Any]], None] | None = None
    extra_help: Mapping[str, Callable[[], str]] = field(default_factory=dict)

    def function(self) -> Callable[..., Any]:
        """The function this command runs."""
        return _resolve(self.target)

    def range_table(self) -> Mapping[str, Range]:
        """The ranges table (empty when the function takes no numbers)."""
        return _resolve(self.ranges) if self.ranges else {}

    def options(self) -> list[Option]:
        """The command line's options: the function's parameters, a dataclass's fields each."""
        fn = self.function()
        where = f"{self.name} ({self.target})"
        hints = typing.get_type_hints(fn)
        docs = _arg_docs(fn)
        found: list[Option] = []
        for param in inspect.signature(fn).parameters.values():
            if param.name in self.hidden:
                continue
            hint = _unwrap_optional(hints[param.name])
            if dataclasses.is_dataclass(hint):  # one flag per field, grouped
                field_hints, field_docs = typing.get_type_hints(hint), _arg_docs(hint)
                for f in dataclasses.fields(hint):
                    if f.name in self.hidden:
                        continue
                    if f.default is not dataclasses.MISSING:
                        default = f.default
                    elif f.default_factory is not dataclasses.MISSING:
                        default = f.default_factory()
                    else:
                        default = _REQUIRED
                    doc = field_docs.get(f.name)
                    if doc is None:
                        raise TypeError(f"{where}: field '{f.name}' of {hint.__name__} has no doc")
                    found.append(Option(f.name, field_hints[f.name], default, doc, param.name))
                continue
            if param.name not in docs:
                raise TypeError(f"{where}: parameter '{param.name}' is not in the docstring's Args")
            default = _REQUIRED if param.default is inspect.Parameter.empty else param.default
            positional = param.kind is inspect.Parameter.POSITIONAL_ONLY
            doc = docs[param.name]
            found.append(Option(param.name, hints[param.name], default, doc, None, positional))
        names = [o.name for o in found]
        if len(set(names)) != len(names):
            raise TypeError(f"{where}: two options share a name: {sorted(names)}")
        return found

    def flag(self, name: str) -> str:
        """The flag of option ``name`` (``image_size`` -> ``--image-size``)."""
        return self.flags.get(name, "--" + name.replace("_", "-"))

    def call(self, values: Mapping[str, Any], argv: Sequence[str] = ()) -> Any:
        """Run the function with ``values``, one per option (the flags' values by name).

        Options left out take their defaults; dataclass fields are gathered into their
        dataclass; hidden parameters get their value from ``argv``.
        """
        fn = self.function()
        options = self.options()
        known = {o.name for o in options}
        unknown = set(values) - known
        if unknown:
            raise TypeError(f"{self.name}: unknown options {sorted(unknown)}")
        positional, kwargs = [], {}
        groups: dict[str, dict[str, Any]] = {}
        for o in options:
            if o.name not in values:
                continue
            if o.group is not None:
                groups.setdefault(o.group, {})[o.name] = values[o.name]
            elif o.positional:
                positional.append(values[o.name])
            else:
                kwargs[o.name] = values[o.name]
        hints = typing.get_type_hints(fn)
        classes = {
            name: _unwrap_optional(hint)
            for name, hint in hints.items()
            if dataclasses.is_dataclass(_unwrap_optional(hint))
        }
        owner = {f.name: name for name, cls in classes.items() for f in dataclasses.fields(cls)}
        for name, value in self.hidden.items():  # a hidden field goes into its dataclass
            target = groups.setdefault(owner[name], {}) if name in owner else kwargs
            target[name] = value(list(argv))
        for group, fields in groups.items():
            kwargs[group] = classes[group](**fields)
        return fn(*positional, **kwargs)

    def command_line(self, values: Mapping[str, Any], prog: str = "pva") -> str:
        """The command line that runs the function with ``values`` (:meth:`call`'s)."""
        words = [prog, *self.name.split()]
        for o in self.options():
            if o.name not in values or values[o.name] is None:
                continue
            value = values[o.name]
            if o.positional:
                words.append(shlex.quote(str(value)))
            elif _unwrap_optional(o.hint) is bool:
                if value != o.default:
                    words.append(self.flag(o.name) if value else "--no-" + self.flag(o.name)[2:])
            else:
                words += [self.flag(o.name), shlex.quote(_shown(value))]
        return " ".join(words)


_REQUIRED = object()
"""The default of an option without one."""


@dataclass
class Option:
    """One option of a command: a parameter of its function, or a field of a dataclass one.

    Args:
        name: The parameter's or field's name (its flag: ``--`` + the name with dashes).
        hint: Its type annotation.
        default: Its default (``_REQUIRED``: none).
        doc: Its docstring entry.
        group: The dataclass parameter it is a field of (``None``: a parameter itself).
        positional: A positional-only parameter (a positional argument, not a flag).
    """

    name: str
    hint: Any
    default: Any
    doc: str
    group: str | None
    positional: bool = False


def _arg_docs(obj: Any) -> dict[str, str]:
    """The ``Args`` entries of ``obj``'s Google docstring, by name."""
    doc = docstring_parser.parse(obj.__doc__ or "", docstring_parser.DocstringStyle.GOOGLE)
    return {p.arg_name: p.description or "" for p in doc.params}


def _resolve(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _report_evaluate(results: dict, kwargs: dict[str, Any]) -> None:
    print(
        f"generated {results['generated_this_run']} images; results in {kwargs['out']}/results.md"
    )


def _report_shards(index: dict, kwargs: dict[str, Any]) -> None:
    for split, info in index["splits"].items():
        print(
            f"{split:>5}: {info['persons']} persons, {info['images']} images, "
            f"{len(info['shards'])} shards"
        )
    print(
        f"skipped images: {len(index['skipped_images'])}, dropped persons: "
        f"{len(index['dropped_persons'])} (reasons in {kwargs['out']}/index.json)"
    )


def _report_tiny_assets(assets: Any, kwargs: dict[str, Any]) -> None:
    print(f"backbone: {assets.backbone}\nface model: {assets.face_model}")


def _methods_help() -> str:
    from pva.methods import METHODS

    return "; ".join(f"{m.name} ({m.help})" for m in METHODS.values())


COMMANDS: tuple[Command, ...] = (
    Command("quickstart", "pva.quickstart:quickstart", "pva.quickstart:QUICKSTART_RANGES"),
    Command(
        "demo",
        "pva.demo.run:demo",
        "pva.demo.run:DEMO_RANGES",
        hidden={"command": lambda argv: "pva " + " ".join(argv)},
    ),
    Command("personalize", "pva.apps:personalize_cli", "pva.apps:PERSONALIZE_RANGES"),
    Command("inpaint", "pva.apps:inpaint_cli", "pva.apps:INPAINT_RANGES"),
    Command("app", "pva.app:app_cli", "pva.app:APP_RANGES"),
    Command(
        "evaluate",
        "pva.evaluate:evaluate",
        "pva.evaluate:RANGES",
        hidden={"feature_fn": lambda argv: None},
        report=_report_evaluate,
        extra_help={"methods": _methods_help},
    ),
    Command("rehearse", "pva.rehearse:rehearse"),
    Command(
        "tiny-assets",
        "pva.tiny:write_tiny_assets",
        "pva.tiny:TINY_RANGES",
        flags={"folder": "--out"},
        report=_report_tiny_assets,
    ),
    Command(
        "shards build",
        "pva.data.writer:build_shards",
        "pva.data.writer:BUILD_RANGES",
        flags={"source_format": "--format"},
        report=_report_shards,
    ),
)
"""Every ``pva`` command but ``train``."""
GROUPS = {"shards": "build WebDataset shards from photos (pva shards build --help)"}
"""The help of a command group (the first word of several-word commands)."""


_RST = (
    (re.compile(r":\w+:`~?([^`]+)`"), r"\1"),  # :func:`pva.x` -> pva.x
    (re.compile(r"``([^`]+)``"), r"\1"),
    (re.compile(r"\s+"), " "),
)


def _plain(text: str | None, flags: Mapping[str, str] | None = None) -> str:
    """Docstring text as one plain help paragraph; ````name```` of a parameter -> its flag."""
    text = text or ""
    if flags:
        text = re.sub(r"``(\w+)``", lambda m: flags.get(m.group(1), m.group(0)), text)
    for pattern, repl in _RST:
        text = pattern.sub(repl, text)
    return text.strip()


def _unwrap_optional(hint: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
        if str in args and all(a is str or _is_path(a) for a in args):  # a path, given as text
            return str
    return hint


def _is_path(hint: Any) -> bool:
    return hint is Path or hint is os.PathLike or typing.get_origin(hint) is os.PathLike


def _is_sequence(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    return isinstance(origin, type) and issubclass(origin, Sequence) and origin is not str


def _comma_list(item: Any, allowed: Range | None, choices: Sequence[str] | None) -> Callable:
    """An argparse type: ``"a,b"`` -> ``("a", "b")``; numbers checked against ``allowed``."""

    def parse(text: str) -> tuple:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if allowed is not None:
            try:
                return tuple(allowed.arg(t) for t in items)
            except argparse.ArgumentTypeError:
                msg = f"expected comma-separated numbers, each {allowed.describe()}, got '{text}'"
                raise argparse.ArgumentTypeError(msg) from None
        if choices is not None:
            bad = [t for t in items if t not in choices]
            if bad:
                msg = f"unknown {', '.join(bad)}; choose from {', '.join(choices)}"
                raise argparse.ArgumentTypeError(msg)
        return tuple(items)

    parse.allowed = allowed  # type: ignore[attr-defined]  # what tests/test_checks.py walks
    return parse


def _shown(default: Any) -> str:
    if isinstance(default, tuple | list):
        return ",".join(str(d) for d in default)
    return str(default)


def _add_option(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    where: str,
    option: Option,
    doc: str,
    allowed: Range | None,
    flag: str,
) -> None:
    """Add one option of a command as a flag (or positional) of ``parser``."""
    required = option.default is _REQUIRED
    default = None if required else option.default
    kwargs: dict[str, Any] = {"help": doc.replace("%", "%%")}
    hint = _unwrap_optional(option.hint)
    if hint is bool:
        kwargs["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
    elif typing.get_origin(hint) is Literal:
        kwargs["choices"] = typing.get_args(hint)
    elif _is_sequence(hint):
        item = _unwrap_optional((typing.get_args(hint) or (str,))[0])
        choices = typing.get_args(item) if typing.get_origin(item) is Literal else None
        if item in (int, float) and allowed is None:
            raise TypeError(f"{where}: the numbers of '{option.name}' have no range")
        kwargs["type"] = _comma_list(item, allowed, choices)
        kwargs["metavar"] = "A,B,..."
    elif hint in (int, float):
        if allowed is None:
            raise TypeError(f"{where}: number option '{option.name}' has no range")
        kwargs["type"] = allowed.arg
    elif hint not in (str, Any) and not _is_path(hint):
        raise TypeError(f"{where}: option '{option.name}' has a type the CLI cannot read: {hint}")
    if default not in (None, ()) and hint is not bool and "default" not in doc:
        shown = _shown(default).replace("%", "%%")
        kwargs["help"] = kwargs["help"].removesuffix(".") + f" (default: {shown})."
    if option.positional:
        parser.add_argument(option.name, **kwargs)
        return
    parser.add_argument(flag, required=required, default=default, dest=option.name, **kwargs)


def add_command(subparsers: argparse._SubParsersAction, command: Command, word: str) -> None:
    """Add ``command`` (its last word ``word``) to ``subparsers``, built from its function."""
    fn = command.function()
    where = f"{command.name} ({command.target})"
    doc = docstring_parser.parse(fn.__doc__ or "", docstring_parser.DocstringStyle.GOOGLE)
    options = command.options()
    flags = {o.name: command.flag(o.name) for o in options if not o.positional}
    summary = _plain(doc.short_description).rstrip(".")
    texts = (doc.short_description, doc.long_description)
    body = " ".join(_plain(t, flags) for t in texts if t)
    parser = subparsers.add_parser(word, help=summary, description=body)
    hints = typing.get_type_hints(fn)
    groups: dict[str, argparse._ArgumentGroup] = {}
    ranges = command.range_table()
    for option in options:
        target: argparse.ArgumentParser | argparse._ArgumentGroup = parser
        if option.group is not None:
            if option.group not in groups:
                cls = _unwrap_optional(hints[option.group])
                title = _plain(docstring_parser.parse(cls.__doc__ or "").short_description)
                groups[option.group] = parser.add_argument_group(option.group, title)
            target = groups[option.group]
        help_text = _plain(option.doc, flags)
        if option.name in command.extra_help:
            help_text = help_text.rstrip(".") + ": " + command.extra_help[option.name]()
        allowed = ranges.get(option.name)
        _add_option(target, where, option, help_text, allowed, flags.get(option.name, ""))
    parser.set_defaults(_command=command)


def build_parser(
    commands: Sequence[Command] = COMMANDS,
    prog: str = "pva",
    description: str = "Parallel Visual Attention: identity-preserving face inpainting.",
    only: str | None = None,
) -> argparse.ArgumentParser:
    """The argument parser of the ``pva`` command (or of another list of commands).

    Args:
        commands: The commands.
        prog: The program's name.
        description: The program's help.
        only: Build only the commands whose first word is this (their functions' modules are
            imported; the others are not).
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if prog == "pva":
        sub.add_parser(
            "train",
            add_help=False,
            help="train PVA with LightningCLI: pva train fit --config configs/stage1.yaml (the "
            "same as python train.py; pva train fit --help documents every option)",
        )
    groups: dict[str, argparse._SubParsersAction] = {}
    for command in commands:
        words = command.name.split()
        if only is not None and words[0] != only:
            sub.add_parser(words[0])  # a name only, so that an unknown command is still named
            continue
        target = sub
        for depth, word in enumerate(words[:-1]):
            key = " ".join(words[: depth + 1])
            if key not in groups:
                group = target.add_parser(word, help=GROUPS.get(key, f"{word} commands"))
                groups[key] = group.add_subparsers(dest=f"_{key}", required=True, metavar="ACTION")
            target = groups[key]
        add_command(target, command, words[-1])
    return parser


def run(
    argv: Sequence[str] | None,
    commands: Sequence[Command] = COMMANDS,
    prog: str = "pva",
    description: str = "Parallel Visual Attention: identity-preserving face inpainting.",
) -> int:
    """Parse ``argv``, run the command, and turn errors the user can fix into one line.

    Errors print as ``<prog> <command>: error: ...`` (exit status 2); warnings as
    ``<prog> <command>: warning: ...``, without a source location.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    known = {c.name.split()[0] for c in commands}
    only = first if first in known else None
    parser = build_parser(commands, prog, description, only=only if only else None)
    if only is None and not any(a in ("-h", "--help") for a in argv):
        parser.parse_args(argv)  # an unknown or missing command: argparse names it and exits
    args = vars(parser.parse_args(argv))
    command: Command = args.pop("_command")
    values = {k: v for k, v in args.items() if k != "command" and not k.startswith("_")}
    name = f"{prog} {command.name}"

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        print(f"{name}: warning: {message}", file=sys.stderr)

    previous = warnings.showwarning
    warnings.showwarning = show
    try:
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
        result = command.call(values, argv)
        if command.report is not None:
            command.report(result, values)
    except (
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        IsADirectoryError,
        ValueError,
        RuntimeError,
    ) as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = previous
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pva`` console script (``pva train ...`` goes to LightningCLI)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # LightningCLI parses the rest (fit, --config, --model.*, ...)
        from pva.training import main as train_main

        return train_main(argv[1:], prog="pva train")
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
