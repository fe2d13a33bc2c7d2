"""The README's commands and snippets, taken from README.md and run, so that they cannot drift.

The only change made to them: the local Redis and the sandbox's port become the test's own
(a user's 127.0.0.1:6379 is never touched).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.redis_server import free_port
from tests.worker_process import SETTING_PREFIXES, WorkerProcess

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
LOCAL_REDIS = "redis://127.0.0.1:6379/0"
BLOCK = re.compile(r"^```(?P<lang>\w+)\n(?P<body>.*?)^```", re.M | re.S)


def blocks(lang: str) -> list[str]:
    return [m["body"] for m in BLOCK.finditer(README) if m["lang"] == lang]


def block_with(lang: str, text: str) -> str:
    [found] = [b for b in blocks(lang) if text in b]
    return found


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(SETTING_PREFIXES)}
    return {**env, **extra}


def run_python(code: str, env: dict[str, str], timeout: float = 90) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_library_snippet_runs_as_written(redis_url: str) -> None:
    snippet = block_with("python", "from breaker import")
    assert LOCAL_REDIS in snippet

    out = run_python(snippet.replace(LOCAL_REDIS, redis_url), clean_env())

    assert "charged ord_1" in out
    assert "payments.card refuses calls for 30.0s" in out
    assert "closed" in out


def test_the_web_tier_snippet_gets_its_result_from_a_worker_started_as_the_readme_says(
    redis_url: str, tmp_path: Path
) -> None:
    commands = block_with("sh", "workers.sandbox")
    [sandbox_line] = [line for line in commands.splitlines() if "workers.sandbox" in line]
    [worker_line] = [line for line in commands.splitlines() if " worker " in line]
    port = free_port()
    sandbox_argv = shlex.split(sandbox_line.split("&")[0].replace("8099", str(port)))
    env = clean_env(CELERY_BROKER_URL=redis_url, PAYMENT_PROVIDER_URL=f"http://127.0.0.1:{port}")
    sandbox = subprocess.Popen(sandbox_argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    try:
        assert sandbox.stdout is not None
        assert b"listening on" in sandbox.stdout.readline()
        worker_argv = shlex.split(worker_line.split("#")[0])
        assert worker_argv[:4] == [".venv/bin/celery", "-A", "workers", "worker"]
        schedule = str(tmp_path / "beat-schedule")
        args = [a if a != "/tmp/celerybeat-schedule" else schedule for a in worker_argv[4:]]
        with WorkerProcess(env, tmp_path / "worker.log", args) as worker:
            snippet = block_with("python", "send_task(\"payments.charge\"")
            out = run_python(snippet.replace(LOCAL_REDIS, redis_url), env)
            banner = worker.log()
    finally:
        sandbox.terminate()
        sandbox.wait(timeout=10)

    assert "'status': 'succeeded'" in out
    assert ".> breakers:" in banner
    # The README's worker line writes beat's schedule where it says, not into the checkout.
    assert not list(ROOT.glob("celerybeat-schedule*"))
    assert list(tmp_path.glob("beat-schedule*"))


def test_the_config_module_example_configures_the_workers(tmp_path: Path) -> None:
    module = block_with("python", "CELERY_CONFIG_MODULE=shopconfig")
    (tmp_path / "shopconfig.py").write_text(module)

    out = run_python(
        "from workers.celery import app; c = app.conf; "
        "print(c.broker_url, c.result_backend, c.breaker_timeout, c.worker_eta_task_limit, "
        "c.breaker_overrides['payments.paypal'], c.payment_provider_timeout)",
        clean_env(CELERY_CONFIG_MODULE="shopconfig", PYTHONPATH=str(tmp_path)),
    )

    assert out.split(None, 4)[:4] == [
        "redis://redis.internal:6379/0", "redis://redis.internal:6379/1", "30.0", "1000"
    ]
    assert "'open_backoff': 2" in out
    assert out.strip().endswith("8.0")


def readme_commands() -> list[str]:
    lines = []
    for body in blocks("sh"):
        for line in body.splitlines():
            command = line.split("#")[0].strip().rstrip("&").strip()
            if command.startswith(".venv/bin/celery -A workers"):
                lines.append(command)
    return lines


@pytest.mark.parametrize("command", readme_commands())
def test_every_celery_command_of_the_readme_exists(command: str) -> None:
    argv = shlex.split(command)
    # The words before the first option: the (sub)command itself.
    words = [argv[0], *argv[1:3]]
    for word in argv[3:]:
        if word.startswith("-"):
            break
        words.append(word)
    # An argument (a breaker name) is not a subcommand: --help goes before it.
    if words[-1].startswith("payments."):
        words.pop()
    done = subprocess.run([*words, "--help"], cwd=ROOT, env=clean_env(), capture_output=True,
                          text=True, timeout=60, check=False)

    assert done.returncode == 0, done.stderr[-2000:]


def test_the_compose_command_sets_every_variable_the_compose_file_requires() -> None:
    required = set(re.findall(r"\$\{(\w+):\?", (ROOT / "docker-compose.yml").read_text()))
    [command] = [
        line for body in blocks("sh") for line in body.splitlines()
        if "docker compose" in line and " up " in line
    ]
    given = set(re.findall(r"(\w+)=\S+", command))

    assert required
    assert required <= given, required - given


def test_generated_files_are_ignored_and_the_package_metadata_is_current() -> None:
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "celerybeat-schedule*" in ignored
    pyproject = (ROOT / "pyproject.toml").read_text()
    # A license table is deprecated (setuptools warns it stops working on 2027-02-18).
    assert re.search(r'^license = "MIT"$', pyproject, re.M)
