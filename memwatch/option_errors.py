"""A mistake on the command line (or in a `--config` YAML) as one `error:` line, not jsonargparse's usage.

jsonargparse prints the whole usage, one line per option (about 70 for `cli.py fit`), and then a message
that for a subclass's option spans ten lines. `OneLineErrors` prints one line instead: an unknown option
with the nearest known spelling, a bad value with the option it was given to. Exit status 2, as before.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import re
import sys
from typing import NoReturn

from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningArgumentParser

from memwatch.errors import one_line

SECTION = re.compile(r'^Parser key "([^"]+)":')
CLASS_PROBLEM = re.compile(r"Problem with given class_path '([^']+)':\s*\n(.*?)(?:\n\s*- |\Z)", re.DOTALL)
CLASS = re.compile(r"<class '([\w.]+)'>")
NOT_ACCEPTED = re.compile(r"(?:Option|option) '([^']+)'(?: is not accepted)?")


class OneLineErrors:
    """Mixed into a jsonargparse parser: a parse error prints `error: ...` on one line and exits with status 2.
    A parser that raises instead (`exit_on_error=False`) still raises jsonargparse's error."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        sys.stderr.write(f"error: {explain(parser, message)}\n")
        self.exit(2)


class OneLineArgumentParser(OneLineErrors, ArgumentParser):
    """jsonargparse's parser, with errors on one line (the audit's options)."""


class OneLineLightningParser(OneLineErrors, LightningArgumentParser):
    """LightningCLI's parser, with errors on one line (`cli.py fit` and the other stages)."""


def explain(parser: ArgumentParser, message: str) -> str:
    """jsonargparse's error `message` from `parser` on one line, an unknown option with its nearest known spelling."""
    if message.startswith("unrecognized arguments:"):
        unknown = next((word for word in message.split()[2:] if word.startswith("-")), None)
        if unknown is not None:
            return unknown_option(unknown.partition("=")[0], option_names(parser), command(parser))
    section = SECTION.match(message)
    problem = CLASS_PROBLEM.search(message)
    if section and problem:
        key, class_path, inner = section[1], problem[1], problem[2].strip()
        name = class_path.rpartition(".")[2]
        rejected = NOT_ACCEPTED.fullmatch(inner)
        if rejected:
            known = [f"--{key}.{option.removeprefix('--')}" for option in option_names(class_parser(class_path))]
            return unknown_option(f"--{key}.{rejected[1]}", known, name, f"--{key}.help {class_path}")
        inner_section = SECTION.match(inner)
        if inner_section:  # a value of one of the class's options: its key under this one
            return explain(parser, f'Parser key "{key}.{inner_section[1]}":{inner[inner_section.end():]}')
        return f"--{key} ({name}): {explain(parser, inner)}"
    if section and "Union subtypes" in message:  # a value of none of an option's types: `--trainer.max_epochs abc`
        types = re.search(r"Subtypes: \[(.*)\]", message)
        given = re.search(r"Given value: (.*)", message)
        if types and given:
            names = " or ".join(name.rpartition(".")[2].replace("NoneType", "null") for name in CLASS.findall(types[1]))
            return f"--{section[1]} {given[1].strip()}: expected {names}"
    rejected = re.fullmatch(r"Subcommand '(\w+)' does not accept option '([^']+)'", message)
    if rejected:
        return unknown_option(f"--{rejected[2]}", option_names(parser), command(parser))
    if section:
        rest = message[section.end():]
        wrong = re.fullmatch(r"\s*Expected a <class '([\w.]+)'>\. Got value: (.*)", rest, re.DOTALL)
        message = f"--{section[1]} {wrong[2].strip()}: expected {wrong[1]}" if wrong else f"--{section[1]}: {rest}"
    return one_line(CLASS.sub(lambda found: found[1].rpartition(".")[2], message))


def unknown_option(option: str, known: list[str], owner: str, listing: str = "--help") -> str:
    """`option` is not one of `known` (`owner`'s options): the line that says so, with the nearest spelling."""
    hint = f"did you mean {nearest}?" if (nearest := nearest_option(option, known)) else f"{listing} lists them"
    return f"{option} is not an option of {owner}: {hint}"


def nearest_option(option: str, known: list[str]) -> str | None:
    """The spelling in `known` nearest to `option`: a close last part in its own section (`model.chanels`:
    `model.channels`), else a close last part in another (`max_steps`: `trainer.max_steps`); `None` if none is."""
    section, _, last = option.removeprefix("--").rpartition(".")
    for same_section, cutoff in ((True, 0.75), (False, 0.85)):
        by_last = {
            name.rpartition(".")[2].removeprefix("--"): name for name in known
            if (name.removeprefix("--").rpartition(".")[0] == section) == same_section
        }  # fmt: skip
        match = difflib.get_close_matches(last, list(by_last), n=1, cutoff=cutoff)
        if match:
            return by_last[match[0]]
    return None


def option_names(parser: ArgumentParser) -> list[str]:
    """The long option names `parser` accepts (argparse keeps them only in `_option_string_actions`)."""
    return [
        name for name in parser._option_string_actions
        if name.startswith("--") and not name.endswith("+") and name != "--help"
    ]  # fmt: skip


def command(parser: ArgumentParser) -> str:
    """How `parser`'s command is typed: `cli.py fit`, `python cli.py audit`."""
    return parser.prog.replace(" [options]", "")


def class_parser(class_path: str) -> ArgumentParser:
    """A parser of the arguments of the class at `class_path` (one the config named, so already imported);
    empty where it cannot be built."""
    parser = ArgumentParser(exit_on_error=False)
    module, _, name = class_path.rpartition(".")
    with contextlib.suppress(Exception):  # only the hint is lost
        parser.add_class_arguments(getattr(importlib.import_module(module), name), fail_untyped=False)
    return parser
