"""The flash-sale demo end to end: a small sale through an outage, and a stop signal mid-sale."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from workers.demo.options import parse_options

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

DEMO = [sys.executable, "-m", "workers.demo"]
SMALL_SALE = ["--charges", "20", "--outage", "2", "--breaker-timeout", "0.7"]
DEADLINE_SECONDS = 90
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Demo:
    """The demo as a subprocess whose output is read line by line as it comes."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [*DEMO, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float) -> bool:
        """Wait until a line matches pattern; False if the demo ends or time runs out first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(re.search(pattern, line) for line in list(self.lines)):
                return True
            if self.process.poll() is not None:
                return False
            time.sleep(0.05)
        return False

    def finish(self, timeout: float) -> int:
        """Wait for the demo to exit; stop it as a user would if it overruns, and fail."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            # Ctrl-C first, so that it still stops what it started.
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            pytest.fail(f"the demo ran over {timeout}s:\n{self.output}")
        self._reader.join(5)
        return code


def is_running(pid: int) -> bool:
    """Tell whether pid is a live process; a zombie nobody reaped yet counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat[stat.rfind(")") + 2] not in "ZX"


def answers(port: int) -> bool:
    """Tell whether something accepts connections on 127.0.0.1:port."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def assert_nothing_left(output: Path) -> dict[str, Any]:
    """Check that every process, port and temp dir the demo recorded is gone."""
    started = json.loads((output / "processes.json").read_text())
    assert started["stage"] == "stopped"
    worker = started["worker"]
    assert worker["pool_pids"], "the demo should record the worker's pool processes"
    assert set(worker["pool_pids"]) <= set(worker["group_pids"])
    pids = {started["redis"]["pid"], worker["pid"], *worker["group_pids"], *worker["pool_pids"]}
    assert not [pid for pid in pids if is_running(pid)]
    assert not answers(started["redis"]["port"])
    assert not answers(started["sandbox"]["port"])
    assert not Path(started["temp_dir"]).exists()
    return started


def test_small_sale_charges_every_order_exactly_once_and_stops_everything(
    tmp_path: Path,
) -> None:
    demo = Demo(*SMALL_SALE, "--output", str(tmp_path))
    code = demo.finish(DEADLINE_SECONDS)
    out = demo.output

    assert code == 0, out
    assert "Timeouts are shortened" in out
    assert "Every order was charged exactly once: 20 of 20." in out
    assert re.search(r"orders enqueued\s+20\n", out)
    assert re.search(r"orders charged exactly once\s+20\n", out)
    assert re.search(r"orders charged twice or more\s+0\n", out)
    assert re.search(r"orders not charged\s+0\n", out)
    assert re.search(r"exceptions\s+none\n", out)
    assert re.search(r"transitions\s+closed->open \d+", out), "the outage should open the breaker"
    assert "\x1b[" not in out, "not a terminal: plain lines, no escape codes"
    picture = (tmp_path / "timeline.png").read_bytes()
    assert picture.startswith(PNG_MAGIC)
    assert len(picture) > 20_000
    assert (tmp_path / "worker.log").stat().st_size > 0
    assert_nothing_left(tmp_path)


@pytest.mark.parametrize(
    ("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_a_stop_signal_mid_sale_stops_everything_and_exits_non_zero(
    tmp_path: Path, signum: signal.Signals, status: int
) -> None:
    # An outage far longer than the test waits: the signal lands while charges are deferred.
    demo = Demo("--charges", "40", "--outage", "60", "--breaker-timeout", "1",
                "--output", str(tmp_path))
    try:
        assert demo.wait_for_line(r"\boutage\b.*breaker open", 60), demo.output
        demo.process.send_signal(signum)
        code = demo.finish(30)
    finally:
        if demo.process.poll() is None:
            demo.process.kill()
            demo.process.wait()

    assert code == status, demo.output
    assert f"Interrupted by {signum.name}" in demo.output
    assert "charged exactly once" not in demo.output
    assert_nothing_left(tmp_path)


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--charges", "0"], "--charges: must be from 1 to 5000, not 0"),
        (["--outage", "soon"], "--outage: must be a number of seconds, not 'soon'"),
        (["--breaker-timeout", "-1"], "--breaker-timeout: must be from 0.1 to 30 seconds"),
        (["--failure-threshold", "1.5"], "--failure-threshold: must be a whole number"),
        (["--concurrency", "0"], "--concurrency: must be from 1 to 32"),
    ],
)
def test_a_bad_option_is_a_usage_error_naming_it(
    args: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_options(args)
    assert exit_info.value.code == 2
    assert complaint in capsys.readouterr().err


def test_an_output_path_that_is_a_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    taken = tmp_path / "taken"
    taken.write_text("")
    with pytest.raises(SystemExit):
        parse_options(["--output", str(taken)])
    assert "is not a directory" in capsys.readouterr().err
