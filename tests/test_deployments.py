"""Real deployments: a Sentinel-managed Redis failing over during a sale, and a Redis Cluster
holding the breakers and the order book. Real redis-servers started by the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.cluster
from celery import Celery
from celery.bin.base import CLIContext
from celery.result import AsyncResult
from click.testing import CliRunner

from tests.embedded import CHARGE, RESULT_WAIT, Worker
from tests.topologies import ClusterTopology, SentinelTopology
from tests.waiting import wait_until
from tests.worker_process import ROOT, WorkerProcess, charge_kwargs
from workers.celery import create_app
from workers.cli import breaker as breaker_cli
from workers.exporter import ExporterServer
from workers.orders import OrderBook
from workers.runtime import forget, runtime
from workers.sandbox import SandboxControl, SandboxServer

pytestmark = pytest.mark.slow

SENTINEL_CONFIG = """\
# A shop's Celery config module: broker and results on a Sentinel-managed Redis.
broker_url = {url!r}
result_backend = {url!r}
broker_transport_options = {{"master_name": {master!r}}}
"""


@pytest.fixture
def sentinel_config(tmp_path: Path, sentinel_topology: SentinelTopology) -> dict[str, str]:
    """Write a Celery config module for the topology; return the environment that selects it."""
    (tmp_path / "shop_sentinel.py").write_text(
        SENTINEL_CONFIG.format(url=sentinel_topology.url, master=sentinel_topology.master_name)
    )
    return {"CELERY_CONFIG_MODULE": "shop_sentinel", "PYTHONPATH": str(tmp_path)}


def sentinel_web_client(topology: SentinelTopology) -> Celery:
    """Return the web tier's client of a Sentinel broker and result backend."""
    client = Celery("web", broker=topology.url, backend=topology.url, set_as_current=False)
    options = {"master_name": topology.master_name}
    client.conf.update(
        task_serializer="json", accept_content=["json"], result_accept_content=["json"],
        broker_transport_options=options, result_backend_transport_options=options,
    )
    return client


def charged(tasks: list[AsyncResult], within: float) -> list[dict[str, Any]]:
    return [t.get(timeout=within, interval=0.1) for t in tasks]


def test_a_sentinel_failover_during_a_sale_leaves_every_order_charged_once(
    tmp_path: Path,
    sentinel_topology: SentinelTopology,
    sentinel_config: dict[str, str],
    sandbox_server: SandboxServer,
    sandbox: SandboxControl,
) -> None:
    env = {
        **sentinel_config,
        "PAYMENT_PROVIDER_URL": sandbox_server.url,
        "BREAKER_TIMEOUT": "1",
        "BREAKER_PUBLISH_INTERVAL": "0.5",
        "PAYMENT_PROVIDER_TIMEOUT": "1",
        "PAYMENT_RETRY_BACKOFF": "0.05",
        "PAYMENT_RETRY_BACKOFF_MAX": "0.2",
        "PAYMENT_CHARGE_DEADLINE": "60",
    }
    web = sentinel_web_client(sentinel_topology)
    # The exporter, as `breaker serve` builds it: the breakers follow the broker's master.
    exporter_app = create_app(
        "exporter", broker_url=sentinel_topology.url,
        broker_transport_options={"master_name": sentinel_topology.master_name},
    )
    exporter = ExporterServer(
        runtime(exporter_app).registry, port=0, orders=runtime(exporter_app).orders
    ).start()
    before = [f"ord_{uuid.uuid4().hex[:8]}_before_{i}" for i in range(6)]
    after = [f"ord_{uuid.uuid4().hex[:8]}_after_{i}" for i in range(6)]
    args = ["--pool", "prefork", "--concurrency", "2", "-B", "-s", str(tmp_path / "beat")]
    try:
        with WorkerProcess(env, tmp_path / "worker.log", args) as worker:
            first = charged(
                [web.send_task("payments.charge", kwargs=charge_kwargs(o)) for o in before], 30
            )
            assert httpx.get(f"{exporter.url}/health", timeout=5).status_code == 200

            took = sentinel_topology.failover()
            published = worker.log().count("breaker.publish_state[")
            second = charged(
                [web.send_task("payments.charge", kwargs=charge_kwargs(o)) for o in after], 40
            )
            # Beat and the publisher carry on against the new master.
            wait_until(
                lambda: worker.log().count("breaker.publish_state[") >= published + 4, 20,
                "the publisher to run again after the failover",
            )
            health = httpx.get(f"{exporter.url}/health", timeout=5)
            status = subprocess.run(
                [sys.executable, "-m", "celery", "-A", "workers", "breaker", "status", "--json"],
                cwd=ROOT, capture_output=True, text=True, timeout=60,
                env={**{k: v for k, v in os.environ.items() if not k.startswith("CELERY_")},
                     **env},
            )
    finally:
        exporter.stop()
        forget(exporter_app)
        web.close()

    assert [r["status"] for r in first + second] == ["succeeded"] * 12
    assert sandbox.ledger()["charges_by_order"] == dict.fromkeys(before + after, 1)
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert status.returncode == 0, status.stderr
    assert [b["name"] for b in json.loads(status.stdout)["breakers"]] == ["payments.card"]
    # The order book moved with the master: the new master has the result of every order.
    # Journal writes wait for a replica, so none was left only on the demoted master.
    book = OrderBook(sentinel_topology.client(sentinel_topology.master_port), 3600, 7)
    assert [o for o in before + after if not book.result(o)] == []
    print(f"\nfailover took {took:.2f}s; 12 of 12 orders charged once")


@pytest.fixture
def cluster_worker(start: Callable[..., Worker], cluster_url: str) -> Worker:
    """Start an embedded worker whose breakers and order book live on the Redis Cluster."""
    return start(breaker_redis_url=cluster_url)


def test_breakers_and_the_order_book_on_a_redis_cluster(
    cluster_worker: Worker,
    redis_cluster: ClusterTopology,
    cluster_url: str,
    sandbox: SandboxControl,
) -> None:
    worker = cluster_worker
    orders = [f"ord_{uuid.uuid4().hex[:8]}_{i}" for i in range(8)]

    results = [worker.charge(order_id=o).get(timeout=RESULT_WAIT) for o in orders]
    worker.breaker.force_open()
    deferred = worker.charge(order_id="ord_deferred_on_cluster")
    parking = runtime(worker.app).parking
    wait_until(lambda: parking.count("payments.card") == 1, RESULT_WAIT, "the charge parked")
    worker.breaker.reset()
    late = deferred.get(timeout=RESULT_WAIT)

    assert [r["status"] for r in [*results, late]] == ["succeeded"] * 9
    assert sandbox.ledger()["charges_by_order"] == dict.fromkeys(
        [*orders, "ord_deferred_on_cluster"], 1
    )
    client = runtime(worker.app).redis
    assert isinstance(client, redis.cluster.RedisCluster)
    nodes = set()
    for order in orders:
        hash_key, lock_key = OrderBook.keys(order)
        slot = client.keyslot(hash_key)
        assert client.keyslot(lock_key) == slot
        assert OrderBook(client, 3600, 7).result(order)["charge_id"] == (
            next(r["charge_id"] for r in results if r["order_id"] == order)
        )
        nodes.add(redis_cluster.node_of_slot(slot))
    assert len(nodes) > 1  # the orders are spread over the cluster's masters

    listed = CliRunner().invoke(
        breaker_cli, ["status", "--json"],
        obj=CLIContext(app=worker.app, no_color=True, workdir=None),
    )
    assert listed.exit_code == 0, listed.output
    [card] = json.loads(listed.output)["breakers"]
    assert (card["name"], card["state"], card["transitions"]["open->closed"]) == (
        "payments.card", "closed", 1
    )
    with ExporterServer(
        runtime(worker.app).registry, port=0, orders=runtime(worker.app).orders
    ) as exporter:
        metrics = httpx.get(f"{exporter.url}/metrics", timeout=5).text
    assert "breaker_store_up 1.0" in metrics
    assert "payments_conflicts_total 0.0" in metrics
    assert CHARGE["payment_token"] not in metrics
