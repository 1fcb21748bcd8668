"""How every `pi-policy` command ends when something is wrong: one prefix, one exit-status rule.

- 2, a usage error: the command line cannot run as written, and nothing was read or run: an unknown flag, a flag
  value the command refuses, flags that exclude each other, a path it names that does not exist (or, for an
  output, exists already), a device that is not there, an optional package that is not installed.
- 1, a finding or a failed run: the command checked what it was given, or ran, and that failed: a parameter
  file (with the command line's overrides of it) the node would refuse, a bag that does not fit or scores too few
  ticks, a checkpoint that lacks something or does not load, verify above its limit, no engine built.

Every error is one line `pi-policy COMMAND: error: ...` on stderr, like argparse's own (several problems joined
with '; '), except a bag that does not fit its configuration: that list, with the bag's topics, keeps a line each.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pi_policy.bag.preflight import BagMismatch

USAGE, FINDING = 2, 1


class UsageError(ValueError):
    """The command line cannot run as written (exit 2)."""


def exit_status(exc: BaseException) -> int:
    return USAGE if isinstance(exc, (UsageError, ModuleNotFoundError)) else FINDING


def message(exc: BaseException | str) -> str:
    """The error's text on one line (a list's items joined with '; '); a bag mismatch as its list of lines."""
    text = str(exc).strip()
    if isinstance(exc, BagMismatch):
        return text
    head, *rest = text.splitlines() or [""]
    if rest and head.rstrip().endswith(":") and all(line.startswith(" ") for line in rest if line):
        return head.strip() + " " + "; ".join(" ".join(line.split()) for line in rest if line.strip())
    return " ".join(text.split())


def report(command: str, exc: BaseException | str, status: int | None = None) -> int:
    """Print the error with the one prefix; returns the exit status (`status`, or the rule's for `exc`)."""
    print(f"pi-policy {command}: error: {message(exc)}", file=sys.stderr)
    if status is not None:
        return status
    return exit_status(exc) if isinstance(exc, BaseException) else FINDING


def existing(path: str | Path, what: str) -> Path:
    """A path named on the command line, which must exist."""
    if not Path(path).exists():
        raise UsageError(f"{what} {path} does not exist")
    return Path(path)


def new_output(path: str | Path, what: str) -> Path:
    """An output named on the command line, which must not exist yet."""
    if Path(path).exists():
        raise UsageError(f"{what} {path} exists already; choose a new path")
    return Path(path)
