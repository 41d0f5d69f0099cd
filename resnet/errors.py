"""Expected errors become one line on stderr and exit code 2; nothing else is printed."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


MLFLOW_MISSING = ("--mlflow needs MLflow, an optional extra: pip install -e '.[mlflow]' "
                  "(or pip install mlflow)")


class UsageError(Exception):
    """Bad input from the user: the message says what was wrong and what to do."""


class TrainingFailed(Exception):
    """Training stopped with an error after the allowed retries (exit 1, checkpoints kept)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is a single line (and still exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def cause(exc: BaseException) -> BaseException:
    """The error a Ray task raised, without Ray's wrapper: ``ray.get`` re-raises it as a
    RayTaskError that is also an instance of the original class, and whose text is a header
    (``ray::finalize_best() (pid=..., ip=...)``) plus the task's traceback."""
    inner = getattr(exc, "cause", None)
    return inner if isinstance(inner, (UsageError, TrainingFailed)) else exc


RESUME_HINT = "run the same command again to resume from the latest checkpoint"


def run_main(prog: str, fn: Callable[[], int | None], resume_hint: str = RESUME_HINT,
             standalone: bool = False, closing_note: Callable[[], str | None] | None = None
             ) -> int:
    """Run a job's main function; map expected failures to one line and an exit code.
    ``resume_hint``: how to continue after Ctrl-C (SIGINT). ``standalone``: this process is the
    job (``python -m``, not a call from Python), so its Ray is stopped before the line is
    printed: Ray's processes log as they stop, and the line must come last. ``closing_note``:
    a line printed before the last one (the console's: how much of Ray's logging it kept off
    the screen, ``resnet/infra/console.py``)."""
    def note() -> None:
        line = closing_note() if closing_note else None
        if line:
            print(line, file=sys.stderr, flush=True)

    def fail(line: str, code: int) -> int:
        note()
        ray = sys.modules.get("ray")
        if standalone and ray is not None and ray.is_initialized():
            ray.shutdown()
        print(line, file=sys.stderr, flush=True)
        return code

    try:
        code = fn() or 0
        note()
        return code
    except UsageError as exc:
        return fail(f"{prog}: error: {cause(exc)}", EXIT_USAGE)
    except TrainingFailed as exc:
        return fail(f"{prog}: error: {cause(exc)}", 1)
    except KeyboardInterrupt:
        return fail(f"{prog}: interrupted; {resume_hint}", EXIT_INTERRUPTED)
