"""The argument shape the experiment scripts share: a results folder plus a few common options."""

import argparse
from pathlib import Path


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of a script's docstring."""
    return argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])


def add_results(p: argparse.ArgumentParser) -> None:
    """The positional ``results`` folder written by ``emolens analyze``."""
    p.add_argument("results", type=Path, help="results folder written by emolens analyze")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")


def add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="bundled", help="corpus file, or 'bundled'")


def results_parser(doc: str | None) -> argparse.ArgumentParser:
    """:func:`parser` with the ``results`` folder already added."""
    p = parser(doc)
    add_results(p)
    return p
