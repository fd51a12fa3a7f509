"""Errors a person can act on.

Anything raised as a `UserError` is printed as its message alone (no traceback)
and ends the command with exit code 2. Raise it for bad input: a configuration
key, a value, a path, a dataset. Bugs stay ordinary exceptions.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, explained: what was given, where, and what is accepted."""

    exit_code = 2


class ConfigError(UserError):
    """A configuration file, key or value is wrong."""


class DataError(UserError):
    """A dataset cannot be used as configured (empty, unreadable, unpaired...)."""
