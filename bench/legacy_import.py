"""`credits import-legacy` on a large old-system export, timed end to end.

    .venv/bin/python -m bench.legacy_import --members 50000 --rows-per-member 20

Generates an unsorted export (members split across the file, `Expired` rows, overdrafts,
DST offsets) with tests/support/legacy_history.py, whose oracle also writes the balances file, then
runs the real `credits import-legacy` command (a process of its own, progress bar and all)
against a scratch PostgreSQL database (created, migrated, dropped). Reported: rows, wall
time, rows per second, the command's CPU seconds and peak memory, the machine's load, and the
command's summary (whether every balance matched). `--export-dir DIR` keeps the export (about
5 minutes to generate at this size) for the next run; the balances are moved to the moment
each import starts (lots keep expiring after the export was generated).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from bench.scratch import ScratchDatabase, scratch_database
from tests.support.legacy_history import Export, balances_at, generate

CREDITS_SCRIPT = str(Path(sys.executable).with_name("credits"))


def timed_import(scratch: ScratchDatabase, directory: Path, export: Export, label: str, processes: int | None) -> None:
    env = {**os.environ, "DATABASE_URL": scratch.url}
    # The old system's balances at this moment: lots expire between generating and importing.
    balances = balances_at(export.transactions.parent, datetime.now(UTC))
    command = [
        CREDITS_SCRIPT,
        "import-legacy",
        str(export.transactions),
        "--balances",
        str(balances),
        "--report",
        str(directory / "report.csv"),
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started, loads = time.monotonic(), [os.getloadavg()[0]]
    with BackendCpu(scratch) as postgres:
        process = subprocess.Popen(
            command + (["--processes", str(processes)] if processes else []),
            env=env,
            cwd=directory,
            stdout=subprocess.PIPE,
            text=True,
        )
        postgres.command = process.pid
        stdout, _ = process.communicate()
        result = subprocess.CompletedProcess(process.args, process.returncode, stdout)
    elapsed = time.monotonic() - started
    loads.append(os.getloadavg()[0])
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the command itself: on a shared machine the wall time says more about the neighbours.
    cpu = usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime
    print(result.stdout.strip().splitlines()[-1])
    print(
        f"{label}: {export.rows} rows in {elapsed:.1f} s ({export.rows / elapsed:,.0f} rows/s), exit {result.returncode}; "
        f"CPU s: the command {cpu:.0f} (its worker processes included), PostgreSQL's backends {postgres.seconds:.0f}; "
        f"peak RSS {usage.ru_maxrss / 1024:.0f} MB in one process, {postgres.peak_rss_mb:.0f} MB in the command and its workers together; "
        f"load average {loads[0]:.1f} before, {loads[1]:.1f} after"
    )


class BackendCpu:
    """CPU seconds of the PostgreSQL backends serving the scratch database (sampled from /proc
    every half second: a backend that lives less than that is missed; WAL writer and
    checkpointer, shared by every database, are not counted), and the peak of the resident
    memory of the command (``command``, its pid) and its worker processes together."""

    def __init__(self, scratch: ScratchDatabase) -> None:
        self.scratch, self.ticks, self.done = scratch, {}, threading.Event()
        self.command: int | None = None
        self.peak_rss_mb = 0.0
        self.thread = threading.Thread(target=self._sample, daemon=True)

    @property
    def seconds(self) -> float:
        return sum(self.ticks.values()) / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> BackendCpu:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()

    def _sample(self) -> None:
        asyncio.run(self._sampling())

    async def _sampling(self) -> None:
        connection = await asyncpg.connect(self.scratch.dsn)
        try:
            while not self.done.wait(0.5):
                pids = await connection.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", self.scratch.name
                )
                for (pid,) in pids:
                    try:
                        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    except OSError:
                        continue  # ended meanwhile
                    self.ticks[pid] = int(fields[11]) + int(fields[12])  # utime, stime
                if self.command is not None:
                    self.peak_rss_mb = max(self.peak_rss_mb, _tree_rss_mb(self.command))
        finally:
            await connection.close()


def _tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its children, in MB (0 once it has ended)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except OSError:
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20 + sum(_tree_rss_mb(int(child)) for child in children)


def cached_export(directory: Path, members: int, rows_per_member: int, seed: int) -> Export:
    """The export in ``directory``, generated there unless an earlier run left one of this size and seed."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp, wanted = directory / "export.txt", f"members={members} rows-per-member={rows_per_member} seed={seed}"
    transactions = directory / "transactions.csv"
    if stamp.exists() and stamp.read_text() == wanted:
        with open(transactions, "rb") as rows:
            count = sum(1 for _ in rows) - 1
        print(f"reusing the export in {directory}: {count} rows over {members} members")
        return Export(transactions, directory / "balances.csv", {}, count)
    stamp.unlink(missing_ok=True)
    started = time.monotonic()
    export = generate(directory, members, rows_per_member, datetime.now(UTC), seed, keep_expected=False)
    stamp.write_text(wanted)
    size_mb = export.transactions.stat().st_size / 2**20
    print(
        f"generated {export.rows} rows over {members} members ({size_mb:.0f} MB) in {time.monotonic() - started:.0f} s"
    )
    return export


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-legacy-") as scratch_dir:
        directory = Path(scratch_dir)
        export = cached_export((args.export_dir or directory).resolve(), args.members, args.rows_per_member, args.seed)
        async with scratch_database() as scratch:
            await asyncio.to_thread(timed_import, scratch, directory, export, "import", args.processes)
            if args.rerun:
                await asyncio.to_thread(
                    timed_import, scratch, directory, export, "re-run (everything already imported)", args.processes
                )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=50_000)
    parser.add_argument("--rows-per-member", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rerun", action="store_true", help="time a second run too (it finds everything imported)")
    parser.add_argument("--processes", type=int, help="the command's --processes (default: its own default)")
    parser.add_argument(
        "--export-dir",
        type=Path,
        help="keep the generated export here and reuse it next time (same size and seed); default: a temporary directory",
    )
    asyncio.run(main(parser.parse_args()))
