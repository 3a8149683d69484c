"""One error type for user mistakes, reported as a single line instead of a traceback; and
interrupts (Ctrl-C, SIGTERM) ended the same way, anywhere.

Every entry point (the `ctclab` command, each pipeline/ stage script) is wrapped in
`one_line_errors`: a CtclabError prints `ctclab: error: <message>` and exits 2 (or its own code);
Ctrl-C and SIGTERM become an exception (SIGTERM as `Stopped`, a KeyboardInterrupt), so every
`with` block on the way out runs — worker pools are ended, temporary folders and half-made outputs
removed — and then one line, exit 130 (SIGINT) or 143 (SIGTERM). Worker processes ignore SIGINT
(`worker_context`): a terminal's Ctrl-C reaches the whole process group, and the parent, not
each worker, decides what happens.
"""
from __future__ import annotations

import contextlib
import functools
import multiprocessing
import multiprocessing.forkserver
import signal
import sys
from pathlib import Path


class CtclabError(Exception):
    """A problem the user can fix: the message names the file or key, what was found, what is expected."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class Stopped(KeyboardInterrupt):
    """SIGTERM (or any stop signal) raised where the process was, like Ctrl-C's KeyboardInterrupt."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum, frame) -> None:
    raise Stopped(signum)


class Interrupted(CtclabError):
    """Stopped by a signal, saying what that left: printed without `error:`, exit 128 + the signal."""

    def __init__(self, signum: int, message: str):
        super().__init__(message, exit_code=128 + signum)  # the shell's convention: 130 SIGINT, 143 SIGTERM


def signal_name(signum: int) -> str:
    return "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name


def interrupted(err: KeyboardInterrupt, who: str, left: str) -> Interrupted:
    """`<who>: stopped by <signal>; <left>` for an interrupt that `err` raised."""
    signum = getattr(err, "signum", signal.SIGINT)
    return Interrupted(signum, f"{who}: stopped by {signal_name(signum)}; {left}")


def worker_context():
    """The multiprocessing context for ctclab's worker pools (corpus synthesis, beam decoding):
    forkserver, whose server is started here with SIGINT ignored, so every worker forked from it
    ignores Ctrl-C from its first instruction (an ignored signal stays ignored across exec and fork,
    and Python then installs no handler). A terminal's Ctrl-C reaches the whole process group: the
    parent alone handles it and ends its pool, and no worker prints a traceback (one forked as the
    pool is being ended stays silent too: ctclab.worker_start). Like spawn (and
    unlike fork) the workers never share a parent's CUDA context."""
    ctx = multiprocessing.get_context("forkserver")
    # before the server starts (it is started once): its workers' start-up, ctclab.worker_start
    ctx.set_forkserver_preload(["__main__", "ctclab.worker_start"])
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: no signal handling to adjust
        return ctx
    try:
        multiprocessing.forkserver.ensure_running()  # at most once per process; a few ms
    finally:
        signal.signal(signal.SIGINT, previous)
    return ctx


def one_line_errors(main):
    """Wrap an entry point: a CtclabError prints `ctclab: error: <message>` and exits with status 2
    (or the error's own `exit_code`, e.g. 130 for a training stopped by Ctrl-C); an interrupt prints
    `ctclab: stopped by …` and exits 128 + the signal number."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            signal.signal(signal.SIGTERM, _raise_stopped)
        except ValueError:  # not the main thread: the caller's own handlers stay
            pass
        try:
            return main(*args, **kwargs)
        except CtclabError as err:
            print(f"ctclab: {'' if isinstance(err, Interrupted) else 'error: '}{err}", file=sys.stderr)
            sys.exit(err.exit_code)
        except KeyboardInterrupt as err:
            for s in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C while exiting must not print a traceback
                signal.signal(s, signal.SIG_IGN)
            stop = interrupted(err, Path(sys.argv[0]).stem if sys.argv[0] else "ctclab",
                               "outputs not finished were removed, finished ones kept")
            print(f"ctclab: {stop}", file=sys.stderr)
            sys.exit(stop.exit_code)
        finally:
            # the entry point has ended: a SIGTERM now (torchrun stopping a rank, a second `kill`) ends the
            # process as it always did, not as an exception inside interpreter shutdown (atexit handlers)
            with contextlib.suppress(ValueError):
                if signal.getsignal(signal.SIGTERM) is _raise_stopped:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    return wrapper
