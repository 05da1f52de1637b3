"""What every command shares: the exit codes, one way to fail, signal handling and systemd notification.

Exit codes (README, "Exit codes"): 0 done, 1 unexpected failure, 2 usage/configuration error, 3 data error,
75 interrupted and resumable (SIGTERM/SIGINT: the current step finishes, a checkpoint is written, running the same
command resumes).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys

import click

from ..errors import EXIT_DATA, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE  # noqa: F401  (re-exported)


def fail(error: Exception, code: int, as_json: bool = False) -> None:
    """Exit with ``code``: one line on stderr, and an ``error`` event on stdout when printing JSON lines."""
    if as_json:
        click.echo(json.dumps({"event": "error", "exit_code": code, "message": str(error)}))
    click.echo(f"error: {error}", err=True)
    sys.exit(code)


def sd_notify(message: str) -> bool:
    """Send a status line to systemd when run as a ``Type=notify`` service (``NOTIFY_SOCKET`` set).

    The protocol is one datagram to a Unix socket (a leading ``@`` means the abstract namespace).
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError:
        return False


class StopOnSignal:
    """SIGTERM/SIGINT set a flag the trainer polls after each step (the step in flight finishes first)."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __call__(self) -> bool:
        return self.signal is not None

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class InterruptOnSignal:
    """SIGTERM/SIGHUP raise KeyboardInterrupt, so a context manager that started processes stops every one."""

    def __enter__(self):
        self._previous = {sig: signal.signal(sig, self._raise) for sig in (signal.SIGTERM, signal.SIGHUP)}
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
