"""A real `credits web` process for tests, and the tokens it is started with."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from domain import CreditPolicy
from infra.settings import Settings
from tests.support import free_port, wait_until_serving

ADMIN_TOKEN = "admin-" + secrets.token_hex(16)
FRONTEND_TOKEN = "front-" + secrets.token_hex(16)
CREDITS_SCRIPT = str(Path(sys.executable).with_name("credits"))
#: Every environment variable the settings read: stripped so the host's shell cannot leak in.
SETTINGS_ENV = frozenset(name.upper() for name in Settings.model_fields)
#: The server runs with default settings, so this is its policy too.
POLICY = CreditPolicy()

FRONT = {"Authorization": f"Bearer {FRONTEND_TOKEN}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


# --------------------------------------------------------------------------- the server


def clean_env(**extra: str) -> dict[str, str]:
    """The host environment without any credits setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in SETTINGS_ENV}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


@dataclass
class WebServer:
    process: subprocess.Popen
    base_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


def start_web_server(env: dict[str, str], log_path: Path, timeout: float = 30.0) -> WebServer:
    """`credits web` on a free port, bound to loopback; returns once /healthz answers."""
    port = free_port()
    process = subprocess.Popen(
        [CREDITS_SCRIPT, "web", "--host", "127.0.0.1", "--port", str(port)],
        cwd=log_path.parent,  # no stray .env or SQLite file from the checkout
        env=env,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = WebServer(process, f"http://127.0.0.1:{port}", log_path)

    try:
        wait_until_serving(process, server.base_url, server.log, timeout=timeout)
    except BaseException:
        server.stop()
        raise
    return server
