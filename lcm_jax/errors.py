"""Errors that are the user's to fix, and the one way the command-line scripts report them.

A `UserError` names the field, flag or file at fault and the fix. `cli_main(main)` runs a
script's main and prints such an error as `error: <message>` (no traceback) with exit code 2;
every other exception keeps its traceback, since that is a bug to report.
"""
from __future__ import annotations

import sys


class UserError(ValueError):
    """Bad input: a config field, a flag or a file. The message says what to change."""


def cli_main(main) -> None:
    """Calls main(); a UserError ends the process without a traceback, exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
