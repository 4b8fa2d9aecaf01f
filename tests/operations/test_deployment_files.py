"""docker-compose.yml, Dockerfile and Procfile: every command they run exists and parses.

There is no Docker engine here, so compose is checked statically: services, Redis AOF, the
console script and the full argument list of each command (parsed by the real `credits`
argument parser), environment names against the settings. The Procfile is parsed with
honcho, and its `web` line is actually started through `honcho start`.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest
import yaml
from honcho.environ import parse_procfile

import workers.cli
from infra.settings import Settings
from tests.support import ROOT, wait_until_serving

APP_SERVICES = ("migrate", "web", "worker", "scheduler")
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
SETTINGS_ENV = frozenset(name.upper() for name in Settings.model_fields)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def procfile() -> dict[str, str]:
    return dict(parse_procfile((ROOT / "Procfile").read_text()).processes)


@pytest.fixture
def parsed(monkeypatch):
    """Parse a `credits ...` argv with the real parser; record the chosen command, run nothing."""
    calls: list = []
    for name in workers.cli.COMMANDS:
        monkeypatch.setitem(workers.cli.COMMANDS, name, lambda args, name=name: calls.append((name, args)))

    def parse(argv: list[str]):
        assert argv[0] in SCRIPTS, f"{argv[0]!r} is not a console script of pyproject.toml"
        assert SCRIPTS[argv[0]] == "workers.cli:main"
        assert workers.cli.main(argv[1:]) == 0
        [(name, args)] = calls
        calls.clear()
        return name, args

    return parse


def command_of(service: dict) -> list[str]:
    command = service["command"]
    return command if isinstance(command, list) else shlex.split(command)


def credits_help() -> str:
    result = subprocess.run(
        [str(Path(sys.executable).with_name("credits")), "--help"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


# --------------------------------------------------------------------------- docker-compose.yml


def test_compose_declares_the_services(compose):
    assert set(compose["services"]) == {"postgres", "redis", *APP_SERVICES}
    for name in APP_SERVICES:
        assert compose["services"][name]["build"] == ".", name
    assert (ROOT / "Dockerfile").is_file()


def test_redis_keeps_queued_events_across_restarts(compose):
    redis = compose["services"]["redis"]
    command = " ".join(command_of(redis))
    assert "--appendonly yes" in command
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert "postgres-data" in compose["volumes"] and "redis-data" in compose["volumes"]


@pytest.mark.parametrize("service", APP_SERVICES)
def test_every_app_command_exists(compose, parsed, service):
    command = command_of(compose["services"][service])
    name, _ = parsed(command)
    assert name == command[1]
    assert re.search(rf"^\s+credits {command[1]}\b", credits_help(), re.M)


def test_web_binds_its_published_port(compose, parsed):
    web = compose["services"]["web"]
    _, args = parsed(command_of(web))
    published = [str(port).split(":")[-1] for port in web["ports"]]
    assert str(args.port) in published
    assert args.host == "0.0.0.0"  # reachable from outside the container


def test_worker_publishes_its_metrics_port(compose):
    worker = compose["services"]["worker"]
    port = worker["environment"].get("METRICS_PORT", Settings.model_fields["metrics_port"].default)
    assert int(port) > 0, "the worker's metrics are on"
    assert str(port) in [str(published).split(":")[-1] for published in worker.get("ports", [])]


def test_app_services_wait_for_their_dependencies(compose):
    services = compose["services"]
    for name in ("web", "worker", "scheduler"):
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["redis"]["condition"] == "service_healthy"
        assert depends["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "healthcheck" in services["postgres"] and "healthcheck" in services["redis"]


def test_compose_environment_names_are_real_settings(compose):
    services = compose["services"]
    for name in APP_SERVICES:
        environment = services[name]["environment"]
        assert set(environment) <= SETTINGS_ENV, f"{name}: unknown settings {set(environment) - SETTINGS_ENV}"
        assert environment["DATABASE_URL"].startswith("postgresql+asyncpg://")
    for name in ("web", "worker", "scheduler"):
        environment = services[name]["environment"]
        assert environment["REDIS_URL"].startswith("redis://redis:")
        assert {"ADMIN_API_TOKEN", "FRONTEND_API_TOKEN"} <= set(environment)


def test_dockerfile_copies_what_exists_and_runs_a_real_command(parsed):
    dockerfile = (ROOT / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            for source in sources:
                assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in (p.rstrip("*") for p in packages):
        assert re.search(rf"^COPY {package} ", dockerfile, re.M), f"Dockerfile does not copy package {package}"
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile, re.M)
    name, _ = parsed(yaml.safe_load(cmd[1]))  # a JSON array is YAML too
    assert name == "web"
    assert re.search(r"^ENV PORT=8000$", dockerfile, re.M) and re.search(r"^EXPOSE 8000$", dockerfile, re.M)


# --------------------------------------------------------------------------- Procfile


def test_procfile_declares_the_processes(procfile):
    # Only long-running processes: `honcho start` stops every process when one exits, so a
    # one-off `release: credits migrate` took the others down (migrating is a README step).
    assert set(procfile) == {"web", "worker", "scheduler"}
    assert "$PORT" in procfile["web"]


@pytest.mark.parametrize("process", ["web", "worker", "scheduler"])
def test_every_procfile_command_exists(procfile, parsed, process):
    argv = shlex.split(procfile[process].replace("$PORT", "5123"))
    name, args = parsed(argv)
    assert name == argv[1]
    assert re.search(rf"^\s+credits {argv[1]}\b", credits_help(), re.M)
    if process == "web":
        assert args.port == 5123


def test_worker_commands_run_the_measured_defaults(compose, procfile, parsed):
    """Procfile and compose start the workers as `credits worker` does by default, the set-up
    bench.end_to_end measures; a process holds at least one full group-commit batch."""
    for argv in (command_of(compose["services"]["worker"]), shlex.split(procfile["worker"])):
        name, args = parsed(argv)
        assert name == "worker"
        assert (args.processes, args.threads) == (workers.cli.WORKER_PROCESSES, workers.cli.WORKER_THREADS), argv
    assert workers.cli.WORKER_THREADS >= Settings.model_fields["event_batch_size"].default
    assert Settings.model_fields["event_batch_in_flight"].default <= Settings.model_fields["db_pool_size"].default


def test_procfile_web_serves_through_honcho(procfile, service_env, tmp_path):
    """`honcho start web` with $PORT set: the Procfile's own line serves /healthz."""
    from tests.support.web import free_port

    port = free_port()
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("")
    env = {
        **service_env,
        "PORT": str(port),
        "ADMIN_API_TOKEN": "admin-token-0123456789abcdef",
        "FRONTEND_API_TOKEN": "front-token-0123456789abcdef",
        # `credits` on PATH, as on a platform that installed the project.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log_path = tmp_path / "honcho.log"
    honcho = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("honcho")),
            "-f",
            str(ROOT / "Procfile"),
            "-d",
            str(ROOT),
            "-e",
            str(empty_env_file),
            "start",
            "web",
        ],
        cwd=tmp_path,
        env=env,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    try:
        wait_until_serving(honcho, f"http://127.0.0.1:{port}", log_path.read_text)
        response = httpx.get(
            f"http://127.0.0.1:{port}/api/admin/at-risk-count",
            headers={"Authorization": "Bearer admin-token-0123456789abcdef"},
        )
        assert response.status_code == 200 and isinstance(response.json()["count"], int)
    finally:
        honcho.send_signal(signal.SIGTERM)
        try:
            honcho.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(honcho.pid, signal.SIGKILL)
            honcho.wait(10)
    log = log_path.read_text()
    assert f"Uvicorn running on http://0.0.0.0:{port}" in log  # $PORT reached the command line
    assert "web.1  | " in log
    assert "web.1 stopped" in log  # honcho passed SIGTERM on and the server shut down
