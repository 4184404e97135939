"""One study file: a TOML file whose values become the defaults of the ``emolens`` subcommands.

::

    out = "runs/paper"            # finetune writes OUT/run, analyze OUT/results
    model = "sbintuitions/sarashina2.2-1b-instruct-v0.1"
    data = "crowd-enVent_generation_ja.tsv"

    [finetune]                    # any flag of `emolens finetune`, dashes as underscores
    preset = "paper"

    [analyze]                     # any flag of `emolens analyze`
    split = "test"
    alphas = [0, 1, 2, 4, 6, 8]

    [report]

``emolens run FILE`` runs the sections present in order (finetune, analyze, report);
``emolens SUBCOMMAND --config FILE`` takes that subcommand's values from the file and flags
on the command line still win. With a ``[finetune]`` section, ``analyze`` reads the run folder
it wrote (``OUT/run``). Unknown keys are an error naming the key and the valid ones.
This module imports nothing heavy: reading a study file is instant.
"""

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: Stages of a study, in the order ``emolens run`` runs them.
STAGES = ("finetune", "analyze", "report")
#: Tables a study file may have: the stages, and other subcommands' ``--config`` values.
TABLES = (*STAGES, "demo", "merge", "labels")
#: Top-level keys: shared by the stages (each stage takes the ones it has a flag for).
COMMON_KEYS = (
    "out",
    "model",
    "base",
    "data",
    "text_column",
    "label_column",
    "language",
    "device",
    "dtype",
    "device_map",
)


class StudyError(ValueError):
    """A study file that cannot be used; the message names the file, the key and the fix."""


def read_study(path: str | Path) -> dict:
    """The study file as a dict, checked: top-level keys are :data:`COMMON_KEYS` or tables
    (:data:`TABLES`)."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file {path} not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise StudyError(f"{path} is not valid TOML: {exc}") from None
    for key, value in data.items():
        if key in TABLES:
            if not isinstance(value, dict):
                raise StudyError(f"{path}: {key!r} must be a table ([{key}])")
        elif key not in COMMON_KEYS:
            raise StudyError(
                f"{path}: unknown key {key!r}; valid top-level keys: "
                f"{', '.join(COMMON_KEYS)}, and the tables "
                f"{', '.join(f'[{s}]' for s in TABLES)}"
            )
    return data


def stage_values(study: dict, command: str, accepted: set[str] | None = None) -> dict:
    """The values one subcommand takes from a study: the common keys it has an option for
    (``accepted``), the paths that connect the stages (``OUT/run``, ``OUT/results``) and its
    own table (every key of which must be one of its options)."""
    values = {k: study[k] for k in COMMON_KEYS if k in study and k != "out"}
    if "out" in study:
        out = Path(study["out"])
        values.update(
            {
                "finetune": {"out": str(out / "run")},
                "analyze": {"out": str(out / "results")},
                "report": {"dir": str(out / "results")},
                "demo": {"out": str(out)},
            }.get(command, {})
        )
        if command == "analyze" and "finetune" in study:
            values["model"] = str(out / "run")
    if accepted is not None:
        values = {k: v for k, v in values.items() if k in accepted}
    values.update(study.get(command, {}))
    return values


def _option_text(value, action: argparse.Action, where: str):
    """``value`` from TOML as the default of ``action``, checked like a command-line value."""
    name = "--" + action.dest.replace("_", "-") if action.option_strings else action.dest
    switches = (
        argparse._StoreTrueAction,
        argparse._StoreFalseAction,
        argparse.BooleanOptionalAction,
    )
    if isinstance(action, switches):
        if not isinstance(value, bool):
            raise StudyError(f"{where}: {action.dest} must be true or false, not {value!r}")
        return value
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    if isinstance(value, bool) or isinstance(value, dict):
        raise StudyError(f"{where}: {action.dest} = {value!r} is not a value for {name}")
    if action.type is not None:
        # the parsers here give ``type`` as a callable, never a registry name or FileType
        convert = cast(Callable[[str], Any], action.type)
        try:
            value = convert(str(value)) if not isinstance(value, str) else convert(value)
        except (TypeError, ValueError):
            raise StudyError(
                f"{where}: {action.dest} = {value!r} is not valid for {name}"
            ) from None
    elif not isinstance(value, str):
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise StudyError(
            f"{where}: {action.dest} = {value!r}; choose one of "
            f"{', '.join(map(str, action.choices))}"
        )
    return value


def apply_defaults(parser: argparse.ArgumentParser, values: dict, where: str) -> None:
    """Make ``values`` the defaults of ``parser``'s options (and positionals): required ones
    given here are no longer required; an unknown key is a :class:`StudyError`."""
    actions = {
        a.dest: a
        for a in parser._actions
        if a.dest not in ("help", "config", "version", argparse.SUPPRESS)
    }
    for key, value in values.items():
        action = actions.get(key)
        if action is None:
            raise StudyError(
                f"{where}: unknown key {key!r}; valid keys: {', '.join(sorted(actions))}"
            )
        action.default = _option_text(value, action, where)
        action.required = False
        if not action.option_strings:
            action.nargs = "?"
