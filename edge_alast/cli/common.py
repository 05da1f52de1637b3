"""What every command shares: the exit codes, one way to fail, signal handling and systemd notification.

Exit codes (README, "Exit codes"): 0 done, 1 unexpected failure, 2 usage/configuration error, 3 data error,
4 ``update`` kept the current model (its gate refused the candidate), 5 training diverged (a NaN or infinite loss
or weights; nothing published), 6 disk full (the newest complete checkpoint kept), 75 interrupted and resumable
(SIGTERM/SIGINT, or a broken pipe on stdout: the current step finishes, a checkpoint is written, running the
same command resumes). SIGUSR1 ends ``train`` after the current step as a finished run (evaluated, saved, exit 0).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

import click

from ..errors import (EXIT_DATA, EXIT_DISK_FULL, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_KEPT,  # noqa: F401
                      EXIT_NONFINITE, EXIT_OK, EXIT_USAGE)  # (re-exported)
from ..integrity import DEVICE_KEY_ENV


def device_key_option(command):
    """``--device-key FILE`` (env ``EDGE_ALAST_DEVICE_KEY_FILE``) for commands that read or write a model store."""
    return click.option("--device-key", "device_key", type=str, envvar=DEVICE_KEY_ENV, show_envvar=True,
                        help="Device key file: manifests are signed with it (HMAC-SHA256) and a version not "
                             "signed with it is refused (exit 2). Default: off.")(command)


def fail(error: Exception, code: int, as_json: bool = False) -> None:
    """Exit with ``code``: one line on stderr, and an ``error`` event on stdout when printing JSON lines (a reader
    that has gone away does not change the exit code)."""
    try:
        if as_json:
            click.echo(json.dumps({"event": "error", "exit_code": code, "message": str(error)}))
        click.echo(f"error: {error}", err=True)
    except OSError:
        pass
    sys.exit(code)


def sd_notify(message: str) -> bool:
    """Send a status line to systemd when run as a ``Type=notify`` service (``NOTIFY_SOCKET`` set).

    The protocol is one datagram to a Unix socket (a leading ``@`` means the abstract namespace). The send never
    blocks: when the manager's queue is full the message is dropped (a status line or a watchdog ping is not worth
    stalling training for; the next one follows).
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError:
        return False


class Watchdog:
    """systemd's service watchdog (``WatchdogSec=`` in the unit sets ``WATCHDOG_USEC``): :meth:`ping` sends
    ``WATCHDOG=1``, at most once per half interval (systemd's advice), so it can be called every step, every
    evaluation batch, every event. Without ``WATCHDOG_USEC``, or when ``WATCHDOG_PID`` names another process, it
    does nothing. Nothing pings from a background thread: a hung step must stop the pings, which is the point."""

    def __init__(self):
        usec, pid = os.environ.get("WATCHDOG_USEC", ""), os.environ.get("WATCHDOG_PID")
        mine = pid is None or pid == str(os.getpid())
        self.interval = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and mine else None
        self._last = None

    def ping(self) -> bool:
        """Send ``WATCHDOG=1`` if half the interval has passed since the last one; True when sent."""
        if self.interval is None:
            return False
        now = time.monotonic()
        if self._last is not None and now - self._last < self.interval / 2:
            return False
        self._last = now
        return sd_notify("WATCHDOG=1")


class EventPrinter:
    """What the commands' event printers share: each event is a JSON line on stdout (``as_json``) or what
    :meth:`show` makes of it for a terminal, a systemd status line (:meth:`notify`) and a watchdog ping.

    When the reader of stdout goes away (the parent holding the pipe died: a benchmark or a daemon stopped before
    its child), the next write fails with a broken pipe. The printer then sends stdout to /dev/null, says so once on
    stderr, and :attr:`stdout_lost` turns true: the commands poll it beside SIGTERM, so the run stops after its
    current step with a checkpoint (exit 75; the same command resumes). Training on with nobody reading would
    leave an orphan holding the run folder, and a traceback from the next write would lose the steps since the
    last checkpoint.
    """

    def __init__(self, as_json: bool):
        self.as_json = as_json
        self.watchdog = Watchdog()
        self.stdout_lost = False

    def __call__(self, event: dict) -> None:
        self.watchdog.ping()  # every event (one per step at least): a hung step stops the pings
        self.notify(event)
        if self.stdout_lost:
            return
        try:
            if self.as_json:
                click.echo(json.dumps(event, default=str))
            else:
                self.show(event)
        except BrokenPipeError:
            self._lose_output()

    def notify(self, event: dict) -> None:
        """The systemd status line for ``event``, if any (:func:`sd_notify`)."""

    def show(self, event: dict) -> None:
        """``event`` for a person at a terminal."""

    def _lose_output(self) -> None:
        self.stdout_lost = True
        _to_devnull(sys.stdout)
        try:
            click.echo("warning: the reader of this command's output went away (broken pipe): stopping after this "
                       "step with a checkpoint (exit 75; the same command resumes)", err=True)
        except OSError:  # stderr went to the same dead reader
            _to_devnull(sys.stderr)


def _to_devnull(stream) -> None:
    """Point ``stream``'s file descriptor at /dev/null; what is still buffered for it goes there too."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # no file behind it (a test's capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


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


class FinishOnSignal(StopOnSignal):
    """SIGUSR1 sets a flag the trainer polls after each step: it then ends the run there as if it were the last step
    (evaluates, saves the model and the summary; exit 0). A benchmark uses it to stop a run at its plateau and keep
    the trained model."""

    def __enter__(self):
        self._previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._handle)
        return self


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
