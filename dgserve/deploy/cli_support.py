"""Shared bits of the CLI subcommands."""

from __future__ import annotations


class UsageError(Exception):
    """A user-caused error the CLI reports in one line (exit status 2)."""
