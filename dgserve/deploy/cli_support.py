"""Shared bits of the CLI subcommands."""

from __future__ import annotations

DEFAULT_MODEL = "tiny"  # the trained checkpoint shipped in the package (dgserve/model/assets/tiny)


class UsageError(Exception):
    """A user-caused error the CLI reports in one line (exit status 2)."""
