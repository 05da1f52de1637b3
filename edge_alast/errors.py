"""Typed errors the CLI maps to documented exit codes (see README, "Exit codes")."""
from __future__ import annotations


class EdgeAlastError(Exception):
    """Base class for errors a user can act on; the message names the file, field or option at fault."""

    exit_code = 1


class ConfigError(EdgeAlastError, ValueError):
    """Bad option, configuration, profile or weights file (exit code 2)."""

    exit_code = 2


class DataError(EdgeAlastError):
    """No usable training data (exit code 3)."""

    exit_code = 3


# The process exit codes a daemon acts on (README, "Exit codes"); each error class above carries its own.
# EXIT_KEPT: `edge-alast update` trained a candidate and its gate refused it; the deployed model is unchanged.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_DATA, EXIT_KEPT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 75
