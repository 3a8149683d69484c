"""Imported once, by the forkserver that ctclab's worker pools fork from (errors.worker_context),
never by ctclab itself.

A worker forked while its parent is being stopped (Ctrl-C as the pool starts up) may find the
pool's queue semaphore already released: unpickling its Process object then raises
FileNotFoundError in multiprocessing's SemLock, before any ctclab code runs, and the forkserver
prints that traceback under the parent's one line (`ctclab: …: stopped by Ctrl-C`). Such a worker
had nothing to do and nothing to lose, so it ends silently; any other start-up failure is printed
as Python would.
"""
import sys


def _quiet_when_the_pool_is_gone(kind, value, tb):
    last = tb
    while last is not None and last.tb_next is not None:
        last = last.tb_next
    if kind is FileNotFoundError and last is not None and last.tb_frame.f_code.co_name == "__setstate__" \
            and last.tb_frame.f_code.co_filename.endswith("synchronize.py"):
        return
    sys.__excepthook__(kind, value, tb)


sys.excepthook = _quiet_when_the_pool_is_gone
