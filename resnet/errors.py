"""Expected errors become one line on stderr and exit code 2; nothing else is printed."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad input from the user: the message says what was wrong and what to do."""


class TrainingFailed(Exception):
    """Training stopped with an error after the allowed retries (exit 1, checkpoints kept)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is a single line (and still exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def run_main(prog: str, fn: Callable[[], int | None]) -> int:
    """Run a job's main function; map expected failures to one line and an exit code."""
    try:
        return fn() or 0
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingFailed as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command again to resume from the latest "
              "checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED
