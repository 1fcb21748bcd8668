"""The `pi-policy` command: one entry point, a thin shell over the library per subcommand."""

from __future__ import annotations

import argparse
import logging
import sys

from pi_policy.tools import bag, bench, demo, engine, inspect_checkpoint, serve, verify


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pi-policy", description="Run pi0 / pi0.5 policies in real time.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (demo, bench, verify, engine, bag, serve, inspect_checkpoint):
        module.add_parser(sub)
    return parser


class Once(logging.Filter):
    """Lets each distinct warning (or error) through once: building a second model (a second backend, verify's
    candidate, an eval-bag worker) must not repeat the first one's warnings."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    filtered = [(handler, Once()) for handler in logging.getLogger().handlers]  # a filter per handler
    for handler, once in filtered:
        handler.addFilter(once)
    try:
        return args.func(args)
    except ModuleNotFoundError as e:  # an optional dependency of this command
        extra = {"onnx": "onnx", "onnxruntime": "onnx", "ray": "ray", "fastapi": "serve-ray",
                 "starlette": "serve-ray"}.get(e.name)
        hint = f' (pip install -e ".[{extra}]")' if extra else f" (pip install {e.name})"
        print(f"pi-policy {args.command}: error: this command needs the {e.name} package{hint}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"pi-policy {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:  # the handlers outlive this command (a test runner's, an embedding program's)
        for handler, once in filtered:
            handler.removeFilter(once)


if __name__ == "__main__":
    sys.exit(main())
