"""The flag checks the experiments/ scripts share: argparse types that refuse bad values with a
message naming the fix, and a parser that prints its error as one line (no usage block), so
`sample.py --steps 0` says what to change before any weights load.
"""
from __future__ import annotations

import argparse
import os
import sys


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: argument --steps: must be ... (got '0')`."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def at_least(lo: int):
    """An int >= lo."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo} (got {text!r})")
        return value
    parse.__name__ = f"integer >= {lo}"
    return parse


def real(lo: float = float("-inf"), hi: float = float("inf")):
    """A finite float in [lo, hi]."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not lo <= value <= hi:
            bounds = f"in [{lo}, {hi}]" if hi != float("inf") else f">= {lo}"
            raise argparse.ArgumentTypeError(f"must be a number {bounds} (got {text!r})")
        return value
    parse.__name__ = "number"
    return parse


def step_list(text: str) -> list[int]:
    """'1,2,4,8' -> [1, 2, 4, 8], each >= 1."""
    try:
        steps = [int(s) for s in text.split(",")]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"must be step counts >= 1 separated by commas, e.g. "
                                         f"1,2,4,8 (got {text!r})")
    return steps


def existing_dir(text: str) -> str:
    """A folder that exists (a bucket URL, gs://..., is taken as given: checked when read)."""
    if "://" in text:
        return text
    if not os.path.isdir(os.path.expanduser(text)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder; give an existing one")
    return os.path.expanduser(text)


def existing_file(text: str) -> str:
    if not os.path.isfile(os.path.expanduser(text)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a file; give an existing one")
    return os.path.expanduser(text)


def output_dir(text: str) -> str:
    """A folder to write into: it may not exist yet, but it may not be a file, and the nearest
    existing folder above it must be writable (a bucket URL is taken as given)."""
    if "://" in text:
        return text
    path = os.path.abspath(os.path.expanduser(text))
    if os.path.exists(path) and not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text!r} is a file; give a folder to write into")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r} cannot be written ({parent} is read-only); "
                                         f"give a writable folder")
    return path
