"""`credits import-legacy` on a large old-system export, timed end to end.

    .venv/bin/python -m bench.legacy_import --members 50000 --rows-per-member 20

Generates an unsorted export (members split across the file, `Expired` rows, overdrafts,
DST offsets) with tests/support/legacy_history.py, whose oracle also writes the balances file, then
runs the real `credits import-legacy` command (a process of its own, progress bar and all)
against a scratch PostgreSQL database (created, migrated, dropped). Reported: rows, wall
time, rows per second, the command's CPU seconds and peak memory, the machine's load, and the
command's summary (whether every balance matched).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.scratch import scratch_database
from tests.support.legacy_history import generate

CREDITS_SCRIPT = str(Path(sys.executable).with_name("credits"))


def timed_import(url: str, directory: Path, export, label: str) -> None:
    env = {**os.environ, "DATABASE_URL": url}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    result = subprocess.run(
        [CREDITS_SCRIPT, "import-legacy", str(export.transactions), "--balances", str(export.balances), "--report", str(directory / "report.csv")],
        env=env,
        cwd=directory,
        stdout=subprocess.PIPE,
        text=True,
    )
    elapsed = time.monotonic() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the command itself: on a shared machine the wall time says more about the neighbours.
    cpu = usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime
    print(result.stdout.strip().splitlines()[-1])
    print(
        f"{label}: {export.rows} rows in {elapsed:.1f} s ({export.rows / elapsed:,.0f} rows/s), exit {result.returncode}; "
        f"the command used {cpu:.0f} CPU s; peak RSS so far {usage.ru_maxrss / 1024:.0f} MB; load average {os.getloadavg()[0]:.1f}"
    )


async def main(members: int, rows_per_member: int, seed: int, rerun: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-legacy-") as scratch_dir:
        directory = Path(scratch_dir)
        started = time.monotonic()
        export = generate(directory, members, rows_per_member, datetime.now(timezone.utc), seed, keep_expected=False)
        size_mb = export.transactions.stat().st_size / 2**20
        print(f"generated {export.rows} rows over {members} members ({size_mb:.0f} MB) in {time.monotonic() - started:.0f} s")
        async with scratch_database() as scratch:
            await asyncio.to_thread(timed_import, scratch.url, directory, export, "import")
            if rerun:
                await asyncio.to_thread(timed_import, scratch.url, directory, export, "re-run (everything already imported)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=50_000)
    parser.add_argument("--rows-per-member", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rerun", action="store_true", help="time a second run too (it finds everything imported)")
    args = parser.parse_args()
    asyncio.run(main(args.members, args.rows_per_member, args.seed, args.rerun))
