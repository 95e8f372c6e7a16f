"""What the `ltx2-graphs` command prints besides its results: progress lines and one-line errors.

Long work (building the 19B model, compiling, capturing) must show that something is happening, and a failure
must read as one line a user can act on, not a traceback. Both live here so the runner, the benchmark and the
profile command print them the same way. Progress goes to stderr so `--json -` output on stdout stays clean.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import dataclass
from typing import TextIO


class CommandError(Exception):
    """A failure the user can fix: printed as one line with a hint, exit status `code` (no traceback).

    Raised by the runner and the benchmark for conditions they recognise (no GPU for a GPU-only executor,
    a checkpoint that does not match, ...). `code` follows the convention 2 = bad arguments/inputs,
    3 = resource problems (GPU missing, out of memory, capture failed).
    """

    def __init__(self, message: str, *, hint: str = "", code: int = 2):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code

    def line(self) -> str:
        """The single line printed for this error."""
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


@dataclass
class Progress:
    """Prints `[  12.3s] message` lines to stderr; silent with `quiet`.

    Times are seconds since the command started, so a user can see where a cold start spends its time
    (model build, compile, capture) without a profiler.
    """

    quiet: bool = False
    stream: TextIO | None = None
    started: float = 0.0

    def __post_init__(self) -> None:
        self.started = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.quiet:
            return
        stream = self.stream if self.stream is not None else sys.stderr
        print(f"[{time.perf_counter() - self.started:7.1f}s] {message}", file=stream, flush=True)


def one_line(text: str) -> str:
    """Collapse an exception message to one line (CUDA and torch errors are often multi-line)."""
    first = next((part.strip() for part in str(text).splitlines() if part.strip()), "")
    return first or "(no message)"


def failure_line(exc: BaseException, *, debug: bool = False) -> str:
    """`Type: message` on one line, for a failure a command records and goes on from (a failed `bench` row); with
    `--debug` the traceback goes to stderr too, as it does for a failure that ends the command."""
    if debug:
        traceback.print_exception(exc)
    return one_line(f"{type(exc).__name__}: {exc}")


def shorten(text: str, limit: int = 240) -> str:
    """One line of at most about `limit` characters: long loader reports (hundreds of key names) are cut, with a
    pointer to the full text."""
    line = " ".join(str(text).split())
    if len(line) <= limit:
        return line
    return f"{line[:limit].rstrip()}... ({len(line) - limit} more characters; --debug shows everything)"


def emit_json(data: dict, target: str) -> None:
    """`--json` output: "-" prints to stdout (instead of the table), a path is written atomically."""
    from graphs.run_output import write_text_atomic

    text = json.dumps(data, indent=2, default=str)
    if target == "-":
        print(text)
        return
    try:
        write_text_atomic(target, text + "\n")
    except OSError as e:
        raise CommandError(f"--json: cannot write {target}: {e.strerror or e}") from e
