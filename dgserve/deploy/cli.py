"""The ``dgserve`` command line.

Subcommands live in ``dgserve/deploy/cmd_*.py`` modules, each with ``add_parser(subparsers)`` that sets a
``handler(fields: dict) -> int`` default; handlers validate their arguments with a strict pydantic model.
Bad input prints one clear line and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence
from importlib import metadata

from pydantic import ValidationError

import dgserve.deploy
from dgserve.deploy.cli_support import UsageError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _version() -> str:
    try:
        return metadata.version("dgserve")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _add_log_level(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, metavar="LEVEL",
                        default=argparse.SUPPRESS if default is None else default,
                        help=f"logging level: {', '.join(LOG_LEVELS)} (default WARNING)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dgserve", description="Serve DiffusionGemma on Ray: an OpenAI-compatible "
                                "API, local generation, Serve configs for clusters, batch jobs and dashboards.")
    p.add_argument("--version", action="version", version=f"dgserve {_version()}", help="print the version")
    _add_log_level(p, "WARNING")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in sorted(m.name for m in pkgutil.iter_modules(dgserve.deploy.__path__) if m.name.startswith("cmd_")):
        importlib.import_module(f"dgserve.deploy.{mod}").add_parser(sub)
    for command in sub.choices.values():  # also after the subcommand: `dgserve run --log-level info`
        _add_log_level(command, None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    logging.basicConfig(level=ns.log_level, format="%(levelname)s %(name)s: %(message)s")
    fields = {k: v for k, v in vars(ns).items() if k not in ("command", "log_level", "handler")}
    logging.getLogger(__name__).debug("dgserve %s, %s %s", _version(), ns.command, fields)
    try:
        return int(ns.handler(fields) or 0)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = "-".join(str(x) for x in err["loc"]).replace("_", "-")
        print(f"dgserve {ns.command}: invalid --{name}: {err['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return 2
    except (UsageError, ValueError, OSError) as exc:
        print(f"dgserve {ns.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
