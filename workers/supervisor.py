"""`credits worker`: Dramatiq's worker group, started again when it stops by itself.

Dramatiq's main process stops the whole group when one of its worker processes dies
(``kill -9``, out of memory): the survivors finish what they are doing, hand back what they
had fetched, and the main process exits. Left alone, that takes every worker down (and
honcho stops every other process with it). This supervisor starts the group again at once;
a group that keeps failing quickly is restarted with a growing pause, and after a few such
failures in a row the supervisor gives up with the group's exit status (compose's restart
policy takes over). A stop signal (TERM, INT) is passed on and the supervisor exits with
the group. See docs/OPERATIONS.md, "Supervision".
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import structlog

log = structlog.get_logger("credits.supervisor")

#: A group that ran at least this long before it stopped is restarted at once.
HEALTHY_RUN_SECONDS = 30.0
MAX_PAUSE_SECONDS = 30.0
#: Quick failures in a row (each before HEALTHY_RUN_SECONDS) after which the supervisor gives up.
MAX_QUICK_FAILURES = 5


class Supervisor:
    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.stopping = threading.Event()
        self.group: subprocess.Popen | None = None

    def pass_on(self, signum: int, _frame=None) -> None:
        # SIGHUP is Dramatiq's reload: the group re-executes itself, it does not stop.
        if signum != signal.SIGHUP:
            self.stopping.set()
        if self.group is not None and self.group.poll() is None:
            self.group.send_signal(signum)

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self.pass_on)
        quick_failures = 0
        while True:
            started = time.monotonic()
            self.group = subprocess.Popen(self.argv)
            status = self.group.wait()
            ran = time.monotonic() - started
            if self.stopping.is_set():
                return status
            quick_failures = 0 if ran >= HEALTHY_RUN_SECONDS else quick_failures + 1
            if quick_failures >= MAX_QUICK_FAILURES:
                log.error("worker_group_gave_up", status=status, quick_failures=quick_failures)
                return status or 1
            pause = min(MAX_PAUSE_SECONDS, 2.0 ** (quick_failures - 1)) if quick_failures else 0.0
            log.error("worker_group_stopped", status=status, ran_seconds=round(ran, 1), restart_in_seconds=pause)
            if self.stopping.wait(pause):
                return status
