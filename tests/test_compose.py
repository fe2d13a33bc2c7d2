"""docker-compose.yml, its Sentinel variant and the Dockerfile, checked without a Docker engine.

Each stack (docker-compose.yml alone, and merged with docker-compose.sentinel.yml as
`docker compose -f ... -f ...` merges them) is validated against the compose specification;
every command it (and the image) runs is shown to exist in the project, the environment it
passes to be settings the project reads, and the files the Dockerfile copies to be enough to
build the package. What only the Sentinel variant has is in test_compose_sentinel.py.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flower.command
import pytest
import yaml
from celery.bin.celery import celery as celery_cli

from tests import compose_files
from tests.compose_files import COMPOSE_FILE, REPO_ROOT, SENTINEL_FILE
from workers.config import SETTING_NAMES, read_settings

DOCKERFILE = REPO_ROOT / "Dockerfile"
PROMETHEUS_CONFIG = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
BIN = Path(sys.executable).parent

# CONTRACT.md section 7's services, and Prometheus.
SERVICES = {"redis", "worker", "beat", "flower", "sandbox", "exporter", "prometheus"}
APP_SERVICES = {"worker", "beat", "flower", "sandbox", "exporter"}
PUBLISHED = {"flower": "127.0.0.1:5555:5555", "exporter": "127.0.0.1:9808:9808"}
# Variables the services read besides the settings of CONTRACT.md section 6.
OTHER_VARIABLES = {"CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "CELERY_CONFIG_MODULE",
                   "PYTHONPATH", "FLOWER_BASIC_AUTH", "SANDBOX_API_KEY"}
INTERPOLATION = re.compile(r"\$\{(\w+)(?::?[?-][^}]*)?\}")


@dataclass(frozen=True)
class Stack:
    """Compose files given together, and what the stack they make must be."""

    files: tuple[Path, ...]
    services: frozenset[str]
    broker_url: str
    result_backend: str


STACKS = {
    "compose": Stack((COMPOSE_FILE,), frozenset(SERVICES), "redis://redis:6379/0",
                     "redis://redis:6379/1"),
    "sentinel": Stack(
        (COMPOSE_FILE, SENTINEL_FILE),
        frozenset(SERVICES | {"redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"}),
        "sentinel://sentinel-1:26379;sentinel://sentinel-2:26379;sentinel://sentinel-3:26379/0",
        "sentinel://sentinel-1:26379/1;sentinel://sentinel-2:26379/1;"
        "sentinel://sentinel-3:26379/1",
    ),
}


@pytest.fixture(scope="module", params=list(STACKS))
def stack(request: pytest.FixtureRequest) -> Stack:
    return STACKS[request.param]


@pytest.fixture(scope="module")
def compose(stack: Stack) -> dict[str, Any]:
    """Return the stack's merged model."""
    return compose_files.stack(*stack.files)


def project_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Return the services that run the project's image, by name."""
    return {name: s for name, s in compose["services"].items() if "build" in s}


@pytest.fixture(scope="module")
def app_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return project_services(compose)


def commands(compose: dict[str, Any]) -> Iterator[tuple[str, list[str]]]:
    """Yield (where, argv) for every command the project's image runs."""
    for name, service in project_services(compose).items():
        yield f"{name} command", service["command"]
        test = service["healthcheck"]["test"]
        if test[0] == "CMD":
            yield f"{name} healthcheck", test[1:]
        else:
            # CMD-SHELL: compose turns $$ into $, and the shell expands variables.
            yield f"{name} healthcheck", shlex.split(test[1].replace("$$", "$"))
    yield "Dockerfile CMD", dockerfile_cmd()


def dockerfile_cmd() -> list[str]:
    """Return the Dockerfile's CMD in exec form."""
    [line] = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("CMD ")]
    argv: list[str] = yaml.safe_load(line.removeprefix("CMD "))
    return argv


@pytest.mark.parametrize(
    "files", [(COMPOSE_FILE,), (SENTINEL_FILE,), (COMPOSE_FILE, SENTINEL_FILE)],
    ids=["compose", "sentinel-file", "compose+sentinel"],
)
def test_the_compose_files_and_their_merge_are_valid_against_the_compose_specification(
    files: tuple[Path, ...], tmp_path: Path
) -> None:
    checked = files[0]
    if len(files) > 1:
        checked = tmp_path / "merged.yml"
        checked.write_text(yaml.safe_dump(compose_files.stack(*files)))

    result = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(checked)],
        capture_output=True, text=True, timeout=60, check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok -- validation done" in result.stdout


def test_the_validator_rejects_what_the_specification_forbids(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  worker:\n    image: x\n    port: [5555]\n")

    result = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(broken)],
        capture_output=True, text=True, timeout=60, check=False,
    )

    assert result.returncode == 1
    assert "'port' was unexpected" in result.stdout


def test_it_runs_its_services_each_with_a_health_check(
    stack: Stack, compose: dict[str, Any]
) -> None:
    assert set(compose["services"]) == stack.services
    for name, service in compose["services"].items():
        assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name


def test_only_flower_the_exporter_and_prometheus_publish_a_port_and_only_on_127_0_0_1(
    compose: dict[str, Any]
) -> None:
    published = {
        name: service["ports"] for name, service in compose["services"].items()
        if service.get("ports")
    }

    assert published == {name: [port] for name, port in PUBLISHED.items()}
    assert not [name for name, s in compose["services"].items() if s.get("network_mode")]


def test_every_service_of_the_project_runs_the_one_image_built_from_the_dockerfile(
    app_services: dict[str, dict[str, Any]], compose: dict[str, Any]
) -> None:
    assert set(app_services) == APP_SERVICES
    assert {(s["build"], s["image"]) for s in app_services.values()} == {
        (".", "payment-breaker:local")
    }
    others = {name: s["image"] for name, s in compose["services"].items() if "build" not in s}
    assert others.pop("prometheus").startswith("prom/prometheus:v2.")
    redis_images = set(others.values())
    assert len(redis_images) == 1
    assert redis_images.pop().startswith("redis:")


def test_services_take_their_settings_from_the_environment_and_secrets_from_the_host(
    stack: Stack, app_services: dict[str, dict[str, Any]]
) -> None:
    settings_names = {name.upper() for name in SETTING_NAMES}
    for name, service in app_services.items():
        unknown = set(service["environment"]) - settings_names - OTHER_VARIABLES
        assert not unknown, f"{name} sets variables nothing reads: {unknown}"
    for name in APP_SERVICES - {"sandbox"}:
        environment = app_services[name]["environment"]
        assert environment["CELERY_BROKER_URL"] == stack.broker_url, name
        assert environment["CELERY_RESULT_BACKEND"] == stack.result_backend, name
    worker = app_services["worker"]["environment"]
    assert worker["PAYMENT_PROVIDER_URL"] == "http://sandbox:8099"
    # Secrets come from the host's environment, and compose refuses to start without them.
    assert INTERPOLATION.fullmatch(worker["PAYMENT_PROVIDER_API_KEY"])
    assert worker["PAYMENT_PROVIDER_API_KEY"].startswith("${PAYMENT_PROVIDER_API_KEY:?")
    flower_auth = app_services["flower"]["environment"]["FLOWER_BASIC_AUTH"]
    assert flower_auth.startswith("${FLOWER_BASIC_AUTH:?")
    sandbox = app_services["sandbox"]["environment"]
    assert sandbox["SANDBOX_API_KEY"] == worker["PAYMENT_PROVIDER_API_KEY"]


def service_environ(service: dict[str, Any]) -> dict[str, str]:
    """Return a service's environment as the container sees it, with a stand-in for secrets."""
    return {key: INTERPOLATION.sub("sk_test_compose", str(value))
            for key, value in service["environment"].items()}


def test_the_settings_the_services_pass_are_valid(app_services: dict[str, dict[str, Any]]) -> None:
    for name in ("worker", "beat", "flower", "exporter"):
        environ = service_environ(app_services[name])
        # The Sentinel variant's config module names the master (deploy/sentinel).
        conf = {"broker_url": environ["CELERY_BROKER_URL"],
                "broker_transport_options": {"master_name": "payments"}}
        settings = read_settings(conf, environ)
        assert settings.payment_provider_api_key == "sk_test_compose", name
        assert "BREAKER_REDIS_URL" not in environ, f"{name}: the breakers follow the broker"


def test_the_breakers_follow_the_broker_to_the_compose_redis() -> None:
    worker = compose_files.load(COMPOSE_FILE)["services"]["worker"]
    environ = service_environ(worker)

    settings = read_settings({"broker_url": environ["CELERY_BROKER_URL"]}, environ)

    assert settings.breaker_redis_url == "redis://redis:6379/0"


def bind_mounts(service: dict[str, Any]) -> dict[str, tuple[Path, bool]]:
    """Return a service's bind mounts: container path -> (repository path, read-only)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        if source.startswith("./"):
            mounts[target] = (REPO_ROOT / source, mode == ["ro"])
    return mounts


def in_repository(service: dict[str, Any], container_path: str) -> Path:
    """Return the repository file a service sees at container_path through a bind mount."""
    for target, (source, read_only) in bind_mounts(service).items():
        if container_path == target or container_path.startswith(target + "/"):
            assert read_only, f"{target} is mounted writable"
            return source / container_path.removeprefix(target).lstrip("/")
    raise AssertionError(f"nothing is mounted at {container_path}")


def test_prometheus_loads_the_rules_and_scrapes_the_exporter(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    flags = dict(word.removeprefix("--").split("=", 1) for word in prometheus["command"])

    config_file = in_repository(prometheus, flags["config.file"])
    assert config_file == PROMETHEUS_CONFIG
    config = yaml.safe_load(config_file.read_text())
    for rule_file in config["rule_files"]:
        assert (config_file.parent / rule_file).is_file(), rule_file
    [job] = config["scrape_configs"]
    [targets] = [static["targets"] for static in job["static_configs"]]
    exporter_argv = compose["services"]["exporter"]["command"]
    exporter_port = exporter_argv[exporter_argv.index("--port") + 1]
    assert targets == [f"exporter:{exporter_port}"]
    assert "exporter" in prometheus["depends_on"]
    data_volume = flags["storage.tsdb.path"]
    assert [v for v in prometheus["volumes"] if v.endswith(f":{data_volume}")] == [
        f"prometheus-data:{data_volume}"
    ]
    assert "prometheus-data" in compose["volumes"]


def help_text(argv: list[str]) -> str:
    """Return what `ARGV --help` prints, failing if it is not a command of the project."""
    result = subprocess.run(
        [*argv, "--help"], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
        env={**os.environ, "CELERY_BROKER_URL": "redis://127.0.0.1:1/0"}, check=False,
    )
    assert result.returncode == 0, f"{argv}: {result.stderr}"
    return result.stdout


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split a command into the words that name it and the long options it is given."""
    named_by_a_module = argv[:3] == ["celery", "-A", "workers"] or argv[:2] == ["python", "-m"]
    end = 3 if named_by_a_module else 1
    while end < len(argv) and not argv[end].startswith("-"):
        end += 1
    name = argv[:end]
    if name[3:4] == ["inspect"]:
        # `inspect ping`: ping is an argument of inspect, not a command of its own.
        name = name[:4]
    return name, [word.split("=")[0] for word in argv[end:] if word.startswith("--")]


def options_by_command(compose: dict[str, Any]) -> dict[tuple[str, ...], set[str]]:
    """Return the long options each command the image runs is given, by command name."""
    found: dict[tuple[str, ...], set[str]] = {}
    for where, argv in commands(compose):
        if argv[:2] == ["python", "-c"]:
            compile(argv[2], where, "exec")
            continue
        assert argv[0] in ("celery", "python"), f"{where} runs {argv[0]}"
        name, options = split_command(argv)
        found.setdefault(tuple(name), set()).update(options)
    return found


def test_our_commands_it_runs_exist_and_take_the_options_they_are_given(
    compose: dict[str, Any]
) -> None:
    ours = {
        ("celery", "-A", "workers", "breaker", "serve"): [str(BIN / "celery"), "-A", "workers",
                                                          "breaker", "serve"],
        ("python", "-m", "workers.sandbox"): [sys.executable, "-m", "workers.sandbox"],
    }
    used = options_by_command(compose)

    with ThreadPoolExecutor() as pool:
        helps = dict(zip(ours, pool.map(help_text, ours.values()), strict=True))

    assert set(ours) <= set(used)
    for name, help_ in helps.items():
        missing = [option for option in used[name] if option not in help_]
        assert not missing, f"{' '.join(name)} has no option {missing}"
    assert "[default: 127.0.0.1]" in helps[("celery", "-A", "workers", "breaker", "serve")]


def test_the_celery_and_flower_commands_it_runs_take_the_options_they_are_given(
    compose: dict[str, Any]
) -> None:
    used = options_by_command(compose)
    theirs = {name: options for name, options in used.items()
              if name[:3] == ("celery", "-A", "workers") and name[3] != "breaker"}

    assert {name[3] for name in theirs} == {"worker", "beat", "flower", "inspect"}
    for name, options in theirs.items():
        if name[3] == "flower":
            # Flower's options are Tornado's, parsed after click hands them over.
            missing = [o for o in options if not flower.command.is_flower_option(o)]
        else:
            command = celery_cli
            for word in name[3:]:
                command = command.commands[word]
            known = {opt for param in command.params for opt in (*param.opts,
                                                                   *param.secondary_opts)}
            missing = [o for o in options if o not in known]
        assert not missing, f"{' '.join(name)} has no option {missing}"


def copied_paths() -> list[str]:
    """Return the sources of every COPY in the Dockerfile."""
    paths: list[str] = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY "):
            *sources, _destination = line.split()[1:]
            paths += sources
    return paths


def docker_ignores(path: str) -> bool:
    """Tell whether .dockerignore keeps path out of the build context (last match wins)."""
    ignored = False
    for raw in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern):
            ignored = not negated
    return ignored


def test_the_dockerfile_builds_a_non_root_python_3_11_image() -> None:
    lines = DOCKERFILE.read_text().splitlines()

    assert "FROM python:3.11-slim" in lines
    [user] = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert user not in ("root", "0")
    assert any(line.startswith("RUN useradd") and user in line for line in lines)


def test_the_files_the_dockerfile_copies_are_enough_to_build_the_package(
    tmp_path: Path
) -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    sources = copied_paths()
    assert {"pyproject.toml", project["readme"], "breaker", "workers"} <= set(sources)
    assert not [path for path in sources if docker_ignores(path)]
    context = tmp_path / "context"
    context.mkdir()
    for path in sources:
        source = REPO_ROOT / path
        if source.is_dir():
            shutil.copytree(source, context / path,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(source, context / path)

    # The sdist is what pip builds from; the venv's setuptools makes it with no network.
    build = (
        "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", build, str(tmp_path / "dist")],
        cwd=context, capture_output=True, text=True, timeout=120, check=False,
    )

    assert result.returncode == 0, result.stderr
    assert "cannot be found" not in result.stderr
    with tarfile.open(tmp_path / "dist" / result.stdout.split()[-1]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
        entry_points = next(m for m in sdist.getmembers() if m.name.endswith("entry_points.txt"))
        extracted = sdist.extractfile(entry_points)
        assert extracted is not None
        assert "breaker = workers.cli:breaker" in extracted.read().decode()
    assert {"workers/cli.py", "workers/exporter.py", "workers/sandbox.py",
            "breaker/lua/admit.lua"} <= names
