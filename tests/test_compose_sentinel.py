"""docker-compose.sentinel.yml: Redis under three sentinels, and the app pointed at them.

test_compose.py validates the merged stack like docker-compose.yml itself (schema, commands,
settings, ports); here: the merge rules it relies on, the topology it adds, the URLs and
master name the app gets and how Celery and kombu read them, and the sentinels' config and
health check run on real redis-server processes.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from celery import Celery
from celery.backends.redis import SentinelBackend
from kombu import Connection

from breaker.connection import parse_url
from tests import compose_files
from tests.compose_files import COMPOSE_FILE, REPO_ROOT, SENTINEL_FILE
from tests.redis_server import RedisServer, free_port
from tests.topologies import TopologyUnavailable, find_redis_cli
from tests.waiting import wait_until
from workers.redis_binary import RedisServerNotFound, find_redis_server

SENTINEL_CONF = REPO_ROOT / "deploy" / "sentinel" / "sentinel.conf"
CELERY_CONFIG = REPO_ROOT / "deploy" / "sentinel" / "celeryconfig.py"
SENTINEL_SERVICES = ("sentinel-1", "sentinel-2", "sentinel-3")
# The services that talk to Redis through Celery or the breakers.
REDIS_CLIENTS = ("worker", "beat", "flower", "exporter")
MONITOR = re.compile(r"^sentinel monitor (\S+) (\S+) (\d+) (\d+)$", re.MULTILINE)


@pytest.fixture(scope="module")
def merged() -> dict[str, Any]:
    return compose_files.stack(COMPOSE_FILE, SENTINEL_FILE)


@pytest.fixture(scope="module")
def celeryconfig() -> ModuleType:
    """Import deploy/sentinel/celeryconfig.py as the containers do (a module on PYTHONPATH)."""
    spec = importlib.util.spec_from_file_location("celeryconfig", CELERY_CONFIG)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def monitored() -> tuple[str, str, int, int]:
    """Return the master name, host, port and quorum sentinel.conf monitors."""
    [(name, host, port, quorum)] = MONITOR.findall(SENTINEL_CONF.read_text())
    return name, host, int(port), int(quorum)


def sentinel_port() -> int:
    [port] = re.findall(r"^port (\d+)$", SENTINEL_CONF.read_text(), re.MULTILINE)
    return int(port)


def test_the_merge_follows_the_compose_rules_the_variant_relies_on() -> None:
    base = {"services": {"redis": {
        "image": "redis:7", "command": ["redis-server", "--appendonly", "yes"],
        "environment": {"A": "1", "B": "2"}, "ports": ["127.0.0.1:1:1"],
        "volumes": ["data:/data", "./a.conf:/etc/a.conf:ro"],
        "depends_on": {"x": {"condition": "service_started"}},
        "healthcheck": {"test": ["CMD", "ping"], "interval": "5s"},
    }}, "volumes": {"data": None}}
    override = {"services": {"redis": {
        "command": ["redis-server"], "environment": {"B": "3", "C": "4"},
        "ports": ["127.0.0.1:1:1", "127.0.0.1:2:2"],
        "volumes": ["./b.conf:/etc/a.conf:ro", "more:/more"],
        "depends_on": {"y": {"condition": "service_healthy"}},
        "healthcheck": {"test": ["CMD", "pong"]},
    }, "other": {"image": "x"}}, "volumes": {"more": None}}

    merged = compose_files.merge(base, override)

    assert merged == {"services": {"redis": {
        "image": "redis:7", "command": ["redis-server"],
        "environment": {"A": "1", "B": "3", "C": "4"},
        "ports": ["127.0.0.1:1:1", "127.0.0.1:2:2"],
        "volumes": ["data:/data", "./b.conf:/etc/a.conf:ro", "more:/more"],
        "depends_on": {"x": {"condition": "service_started"},
                       "y": {"condition": "service_healthy"}},
        "healthcheck": {"test": ["CMD", "pong"], "interval": "5s"},
    }, "other": {"image": "x"}}, "volumes": {"data": None, "more": None}}
    with pytest.raises(NotImplementedError, match="mapping form"):
        compose_files.merge(base, {"services": {"redis": {"environment": ["B=3"]}}})


def test_it_adds_a_replica_and_three_sentinels_each_with_its_own_state(
    merged: dict[str, Any]
) -> None:
    services = merged["services"]
    name, host, port, quorum = monitored()

    assert host == "redis"
    assert port == 6379
    assert quorum == len(SENTINEL_SERVICES) // 2 + 1
    assert services["redis"]["command"][-2:] == ["--replica-announce-ip", "redis"]
    replica = services["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1:][:2] == ["redis", "6379"]
    assert replica[-2:] == ["--replica-announce-ip", "redis-replica"]
    data_volumes = set()
    for sentinel in SENTINEL_SERVICES:
        service = services[sentinel]
        assert service["image"] == services["redis"]["image"]
        assert service["environment"] == {"SENTINEL_NAME": sentinel}
        assert "announce-ip \"$$SENTINEL_NAME\"" in service["command"][2]
        assert f"./deploy/sentinel/sentinel.conf:{copied_from(service)}:ro" in service["volumes"]
        [data] = [v for v in service["volumes"] if v.endswith(":/data")]
        data_volumes.add(data.split(":")[0])
        assert f"ckquorum {name}" in service["healthcheck"]["test"][1]
        assert "ports" not in service
    assert len(data_volumes) == 3
    assert data_volumes <= set(merged["volumes"])
    assert "ports" not in services["redis-replica"]


def copied_from(sentinel: dict[str, Any]) -> str:
    """Return where a sentinel's command copies its first config from."""
    [source] = re.findall(r"cp (\S+) /data/sentinel.conf", sentinel["command"][2])
    return str(source)


def test_the_app_asks_the_sentinels_for_the_master_the_config_module_names(
    merged: dict[str, Any], celeryconfig: ModuleType
) -> None:
    name, *_ = monitored()
    port = sentinel_port()
    for service_name in REDIS_CLIENTS:
        service = merged["services"][service_name]
        environment = service["environment"]
        for variable in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
            target = parse_url(environment[variable])
            assert target.kind == "sentinel", (service_name, variable)
            assert set(target.addresses) == {(s, port) for s in SENTINEL_SERVICES}
        assert "BREAKER_REDIS_URL" not in environment, "the breakers follow the broker"
        module = f"{environment['PYTHONPATH']}/{environment['CELERY_CONFIG_MODULE']}.py"
        mount = f"./deploy/sentinel/celeryconfig.py:{module}:ro"
        assert mount in service["volumes"], service_name
        assert set(SENTINEL_SERVICES) <= set(service["depends_on"])
        for sentinel in SENTINEL_SERVICES:
            assert service["depends_on"][sentinel] == {"condition": "service_healthy"}
    assert celeryconfig.broker_transport_options == {"master_name": name}
    assert celeryconfig.result_backend_transport_options == {"master_name": name}
    # The URLs stay in the environment: the module has nothing for it to override.
    assert {k for k in vars(celeryconfig) if not k.startswith("__")} == {
        "broker_transport_options", "result_backend_transport_options"}
    sandbox = merged["services"]["sandbox"]["environment"]
    assert not [key for key in sandbox if key.startswith("CELERY")]


def test_celery_kombu_and_the_breakers_read_db_0_for_the_broker_and_db_1_for_results(
    merged: dict[str, Any], celeryconfig: ModuleType
) -> None:
    environment = merged["services"]["worker"]["environment"]
    broker, backend = environment["CELERY_BROKER_URL"], environment["CELERY_RESULT_BACKEND"]
    app = Celery(set_as_current=False)
    app.config_from_object(celeryconfig)

    connection = Connection(broker, transport_options=app.conf.broker_transport_options)
    results = SentinelBackend(app=app, url=backend)

    assert connection.virtual_host in ("/", "0")
    assert parse_url(broker).db == 0
    assert results.connparams["db"] == 1
    assert parse_url(backend).db == 1
    # Why every part of the backend URL names the db: Celery reads it from the first only.
    last_part_only = "sentinel://sentinel-1:26379;sentinel://sentinel-2:26379/1"
    assert SentinelBackend(app=app, url=last_part_only).connparams["db"] == 0


def test_the_app_takes_the_master_name_from_the_config_module_and_the_urls_from_the_environment(
    merged: dict[str, Any]
) -> None:
    environment = {
        key: str(value) for key, value in merged["services"]["worker"]["environment"].items()
    }
    environment.update(
        PAYMENT_PROVIDER_API_KEY="sk_test_compose",
        # The container's mount point, here the folder the module is mounted from.
        PYTHONPATH=str(CELERY_CONFIG.parent),
    )
    # Building the runtime connects to nothing: a Sentinel client asks on its first command.
    show = (
        "import json; from workers.celery import app; from workers.runtime import runtime\n"
        "conf = {k: getattr(app.conf, k) for k in ('broker_url', 'result_backend', "
        "'broker_transport_options', 'result_backend_transport_options', 'breaker_redis_url')}\n"
        "conf['pool'] = type(runtime(app).redis.connection_pool).__name__\n"
        "print(json.dumps(conf))"
    )

    result = subprocess.run([sys.executable, "-c", show], cwd=REPO_ROOT, env=environment,
                            capture_output=True, text=True, timeout=60, check=False)

    assert result.returncode == 0, result.stderr
    conf = json.loads(result.stdout)
    name, *_ = monitored()
    assert conf["broker_url"] == environment["CELERY_BROKER_URL"]
    assert conf["result_backend"] == environment["CELERY_RESULT_BACKEND"]
    assert conf["broker_transport_options"]["master_name"] == name
    assert conf["result_backend_transport_options"]["master_name"] == name
    assert conf["breaker_redis_url"] == environment["CELERY_BROKER_URL"]
    # breaker.connection's client of a Sentinel master (docs/design.md, section 9).
    assert conf["pool"] == "MasterFollowingPool"


class Sentinels:
    """Sentinels started by the compose file's own command, on free ports of 127.0.0.1."""

    def __init__(self, merged: dict[str, Any], root: Path) -> None:
        try:
            self.binary = find_redis_server()
            self.cli = find_redis_cli(self.binary)
        except (RedisServerNotFound, TopologyUnavailable) as exc:
            pytest.skip(f"no redis-server to run sentinels: {exc}")
        version = subprocess.run([self.binary, "--version"], capture_output=True, text=True,
                                 check=True).stdout
        found = re.search(r"v=(\d+)\.(\d+)", version)
        if found is None or (int(found[1]), int(found[2])) < (6, 2):
            pytest.skip(f"{self.binary} is older than 6.2, which sentinel.conf needs: {version}")
        self.services = merged["services"]
        self.root = root
        self.master_port = 0
        self.ports: dict[str, int] = {}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, service: str) -> None:
        """Run the service's command, with its paths and port moved into a folder of the test."""
        folder = self.root / service
        folder.mkdir(exist_ok=True)
        port = self.ports.setdefault(service, free_port())
        name, host, master_port, _quorum = monitored()
        config = self.root / f"{service}.conf"
        config.write_text(
            SENTINEL_CONF.read_text()
            .replace(f"port {sentinel_port()}\n", f"port {port}\n")
            .replace(f"monitor {name} {host} {master_port} ",
                     f"monitor {name} 127.0.0.1 {self.master_port} ")
        )
        command = self.services[service]["command"]
        assert command[:2] == ["sh", "-c"]
        script = (
            command[2].replace("$$", "$")
            .replace(copied_from(self.services[service]), str(config))
            .replace("/data/", f"{folder}/")
            .replace("exec redis-server ", f"exec {self.binary} ")
        ) + " --bind 127.0.0.1"
        log = (folder / "log").open("ab")
        self.processes[service] = subprocess.Popen(
            ["sh", "-c", script], cwd=folder, stdout=log, stderr=subprocess.STDOUT,
            env={"SENTINEL_NAME": "127.0.0.1", "PATH": "/usr/bin:/bin"},
        )
        log.close()

    def stop(self, service: str) -> None:
        process = self.processes.pop(service)
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def healthy(self, service: str) -> bool:
        """Run the service's health check against it; return whether it passes."""
        [kind, check] = self.services[service]["healthcheck"]["test"]
        assert kind == "CMD-SHELL"
        check = check.replace(f"-p {sentinel_port()}", f"-p {self.ports[service]}")
        check = check.replace("redis-cli ", f"{self.cli} ", 1)
        result = subprocess.run(["sh", "-c", check], capture_output=True, timeout=10,
                                check=False)
        return result.returncode == 0

    def ask(self, service: str, *words: str) -> str:
        return subprocess.run([self.cli, "-p", str(self.ports[service]), *words],
                              capture_output=True, text=True, timeout=10, check=False).stdout

    def known_sentinels(self, service: str) -> int:
        """Return how many other sentinels the service knows."""
        name, *_ = monitored()
        return self.ask(service, "sentinel", "sentinels", name).count("runid")

    def logs(self) -> str:
        return "\n".join(f"--- {p.parent.name}\n{p.read_text(errors='replace')[-1500:]}"
                         for p in sorted(self.root.glob("*/log")))

    def stop_all(self) -> None:
        for service in list(self.processes):
            self.stop(service)


@pytest.fixture
def sentinels(merged: dict[str, Any], tmp_path: Path) -> Iterator[Sentinels]:
    """Return the compose file's sentinels, ready to start, watching a master of their own."""
    started = Sentinels(merged, tmp_path)
    with RedisServer() as master:
        started.master_port = master.port
        try:
            yield started
        finally:
            started.stop_all()


def test_the_sentinels_run_from_the_shipped_config_and_are_healthy_once_they_reach_quorum(
    sentinels: Sentinels,
) -> None:
    name, *_ = monitored()
    first, *others = SENTINEL_SERVICES
    try:
        sentinels.start(first)
        wait_until(lambda: name in sentinels.ask(first, "sentinel", "masters"), 10,
                   f"{first} to monitor the master")
        began = time.monotonic()

        # One sentinel alone cannot authorise a failover: not healthy, and the check says so.
        assert not sentinels.healthy(first)
        for service in others:
            sentinels.start(service)
        for service in SENTINEL_SERVICES:
            wait_until(lambda s=service: sentinels.healthy(s), 20, f"{service}'s health check")
        print(f"quorum reached {time.monotonic() - began:.1f}s after the first sentinel")

        # A restarted sentinel runs from its own rewritten copy: it still knows the other two.
        wait_until(lambda: sentinels.known_sentinels(first) == len(others), 10,
                   f"{first} to know the other sentinels")
        copy = sentinels.root / first / "sentinel.conf"
        assert "sentinel myid" in copy.read_text()
        sentinels.stop(first)
        sentinels.start(first)
        wait_until(lambda: sentinels.ask(first, "ping").strip() == "PONG", 10, f"{first} back")
        assert sentinels.known_sentinels(first) == len(others)
    except AssertionError as exc:
        exc.add_note(sentinels.logs())
        raise
