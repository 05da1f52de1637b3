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


class IntegrityError(ConfigError):
    """A file signed with the device key (``--device-key``) whose signature is missing or wrong, or a signed file
    read without the key (exit code 2): the file is refused, never loaded."""


class UnsafePathError(ConfigError):
    """A file the run folder would create is a symbolic link (planted): refused rather than followed (exit code 2)."""


class NonFiniteError(EdgeAlastError):
    """Training diverged: a loss or the weights became NaN or infinite (exit code 5). Nothing is published (no
    model.safetensors, model.onnx or manifest.json from those weights); the last checkpoint written before it is
    kept. A restart would replay the same steps: lower ``--lr`` or change the data first."""

    exit_code = 5


class DiskFullError(EdgeAlastError):
    """No space left for a write (checkpoint, model weights, ONNX export, a store version) (exit code 6): the
    message says how many bytes were needed and free; the newest complete checkpoint is kept."""

    exit_code = 6


# The process exit codes a daemon acts on (README, "Exit codes"); each error class above carries its own.
# EXIT_KEPT: `edge-alast update` trained a candidate and its gate refused it; the deployed model is unchanged.
# EXIT_NONFINITE: training diverged (NonFiniteError); EXIT_DISK_FULL: a write found no space (DiskFullError).
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_DATA, EXIT_KEPT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 75
EXIT_NONFINITE, EXIT_DISK_FULL = NonFiniteError.exit_code, DiskFullError.exit_code
