"""Command line: `python -m include.demo_data generate|tick --dsn DSN [options]`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from datetime import datetime

from include.demo_data import DemoDataError, generate, tick


def _timestamp(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{value!r} needs a time zone, e.g. 2026-01-01T00:00:00+00:00")
    return parsed


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m include.demo_data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    make = commands.add_parser("generate", help="create or replace stock_master, edi_690 and exchanges")
    make.add_argument("--dsn", required=True, help="libpq connection string of the source database")
    make.add_argument("--securities", type=int, default=10_000)
    make.add_argument("--events", type=int, default=100_000)
    make.add_argument("--seed", type=int, default=42)
    make.add_argument("--schema", default="public")
    make.add_argument("--now", type=_timestamp, help="anchor the timestamps here (default: a fixed epoch)")

    change = commands.add_parser("tick", help="apply one batch of source changes")
    change.add_argument("--dsn", required=True, help="libpq connection string of the source database")
    change.add_argument("--seed", type=int, default=1)
    change.add_argument("--schema", default="public")
    change.add_argument("--now", type=_timestamp, help="change timestamp (default: a day after the latest)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        if arguments.command == "generate":
            counts = generate(
                arguments.dsn,
                securities=arguments.securities,
                events=arguments.events,
                seed=arguments.seed,
                schema=arguments.schema,
                now=arguments.now,
            )
        else:
            counts = tick(arguments.dsn, seed=arguments.seed, schema=arguments.schema, now=arguments.now)
    except DemoDataError as error:
        print(f"{arguments.command} failed: {error}", file=sys.stderr)
        return 1
    summary = ", ".join(f"{kind}={count}" for kind, count in counts.items())
    print(f"{arguments.command} {arguments.schema}: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
