"""Two real scheduler processes against real Redis: each periodic tick is enqueued once."""

import json
import signal
import subprocess
import sys
from collections import Counter

from tests.support import ROOT, wait_until


def test_a_second_scheduler_never_double_fires(redis_client, service_env, tmp_path):
    env = {**service_env, "EXPIRE_CREDITS_EVERY_MINUTES": "1440", "LAPSE_HOLDS_EVERY_MINUTES": "1440"}
    logs = [tmp_path / f"scheduler-{n}.log" for n in range(2)]
    processes = [
        subprocess.Popen([sys.executable, "-m", "workers.cli", "scheduler"], cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        for log in logs
    ]
    try:
        # Both fire every job once at start; each must either enqueue it or see it taken.
        def both_decided() -> bool:
            text = "".join(log.read_text() for log in logs)
            return text.count('"periodic_enqueued"') + text.count('"periodic_skipped"') >= 4

        wait_until(both_decided, timeout=30, message="both schedulers to fire both jobs")
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(15)

    enqueued = Counter(
        json.loads(raw)["actor_name"] for raw in redis_client.hvals("dramatiq:credit_sweeps.msgs")
    )
    claimed = Counter(key.decode().split(":")[2] for key in redis_client.scan_iter("credits:scheduler:*"))
    # One message per claimed tick, never one per scheduler.
    assert enqueued == claimed
    assert set(enqueued) == {"expire_credits", "lapse_holds"}
    text = "".join(log.read_text() for log in logs)
    assert text.count('"periodic_skipped"') == 4 - sum(enqueued.values())
