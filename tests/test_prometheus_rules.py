"""deploy/prometheus: the alerting and recording rules, their unit tests and the scrape config.

promtool (part of every Prometheus release) checks the files and runs the rules' unit tests
(deploy/prometheus/tests.yml); `.ci/run` unpacks it from Debian's prometheus package into
.venv/bin, and without it those tests skip, saying why. The checks that the rules and their
test series use only what the exporter serves, and that every alert is documented and
tested both ways, need no promtool.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from breaker import BreakerRegistry, MemoryStore
from workers.exporter import BreakerCollector, PaymentsCollector

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = REPO_ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "rules.yml"
UNIT_TESTS = PROMETHEUS / "tests.yml"
CONFIG = PROMETHEUS / "prometheus.yml"
BIN = Path(sys.executable).parent
# Written by .ci/run when it could not get promtool: the reason, for the skip message.
UNAVAILABLE_NOTE = BIN.parent / "promtool-unavailable"

SEVERITIES = {"critical", "warning"}
# Labels Prometheus gives every scraped series; `up` is its own series of each target.
TARGET_LABELS = {"job", "instance"}
# Labels whose values the exporter fixes; a rule matching another value matches nothing.
ENUMERATED_LABELS = {"state", "outcome", "from_state", "to_state"}
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
                "group_left", "group_right"}


@pytest.fixture(scope="module")
def promtool() -> str:
    """Return the promtool to run, or skip saying why there is none."""
    for candidate in (BIN / "promtool", shutil.which("promtool")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    why = ""
    if UNAVAILABLE_NOTE.is_file():
        why = f" (.ci/run: {UNAVAILABLE_NOTE.read_text().strip()})"
    pytest.skip(
        f"promtool is neither in {BIN} nor on PATH{why}; `bash .ci/run` unpacks it from "
        "Debian's prometheus package, and every Prometheus release ships it"
    )


def run(argv: list[str], cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    """Run a promtool command; return what it did."""
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120,
                          check=False)


def load(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    return loaded


def rules() -> Iterator[dict[str, Any]]:
    """Yield every rule of rules.yml."""
    for group in load(RULES)["groups"]:
        yield from group["rules"]


def alerts() -> dict[str, dict[str, Any]]:
    """Return the alerting rules by name."""
    return {rule["alert"]: rule for rule in rules() if "alert" in rule}


@pytest.fixture(scope="module")
def served() -> dict[str, dict[str, set[str]]]:
    """Return every metric the exporter serves: its labels and the values each label takes."""
    breakers = BreakerRegistry(MemoryStore())
    breakers.get("payments.card")

    class OrderBook:
        def conflicts_total(self) -> int:
            return 0

    registry = CollectorRegistry(auto_describe=False)
    registry.register(BreakerCollector(breakers))
    registry.register(PaymentsCollector(OrderBook()))
    metrics: dict[str, dict[str, set[str]]] = {"up": {label: set() for label in TARGET_LABELS}}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            labels = metrics.setdefault(sample.name, {})
            for label, value in sample.labels.items():
                labels.setdefault(label, set()).add(value)
    return metrics


def check_selector(where: str, name: str, matchers: dict[str, list[str]],
                   served: dict[str, dict[str, set[str]]]) -> None:
    """Fail unless name{matchers} can select series the exporter (or Prometheus) serves."""
    assert name in served, f"{where}: {name} is not served by the exporter"
    known = served[name]
    for label, values in matchers.items():
        assert label in known or label in TARGET_LABELS, f"{where}: {name} has no label {label}"
        if label in ENUMERATED_LABELS:
            unknown = set(values) - known[label]
            assert not unknown, f"{where}: {name}{{{label}}} is never {unknown}"


MATCHER = re.compile(r'(\w+)\s*(?:=~|!~|!=|=)\s*"([^"]*)"')


def selectors(expr: str) -> Iterator[tuple[str, dict[str, list[str]]]]:
    """Yield (metric name, {label: values matched}) for every series selector in expr."""
    without_groupings = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", expr)
    pattern = re.compile(r"(?<![\w:])([A-Za-z_:][\w:]*)(?![\w:])\s*(\{[^}]*\})?(?!\s*\()")
    for match in pattern.finditer(re.sub(r"\[[^]]*\]", " ", without_groupings)):
        name, braces = match.group(1), match.group(2) or ""
        if name in PROMQL_WORDS or re.fullmatch(r"\d\w*", name):
            continue
        yield name, {label: value.split("|") for label, value in MATCHER.findall(braces)}


def test_every_alert_has_a_severity_and_says_what_it_means_and_what_to_do() -> None:
    found = alerts()

    assert set(found) == {"BreakerNotClosed", "BreakerProbesFailing", "BreakerStoreUnavailable",
                          "BreakerExporterDown", "PaymentsSecondCharge"}
    for name, rule in found.items():
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert rule["annotations"]["summary"].strip(), name
        assert len(rule["annotations"]["description"].split()) > 30, name
    pages = {name for name, rule in found.items() if rule["labels"]["severity"] == "critical"}
    assert "PaymentsSecondCharge" in pages
    assert "for" not in found["PaymentsSecondCharge"]
    second_charge = found["PaymentsSecondCharge"]["annotations"]["description"]
    assert "payments:conflicts:orders" in second_charge
    assert "Refund the second charge" in second_charge


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in load(UNIT_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])

    assert firing == set(alerts())
    assert quiet == set(alerts())


def test_the_rules_use_only_what_the_exporter_serves(
    served: dict[str, dict[str, set[str]]]
) -> None:
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    used = set()
    for rule in rules():
        where = rule.get("alert") or rule["record"]
        for name, matchers in selectors(rule["expr"]):
            used.add(name)
            if name not in recorded:
                check_selector(where, name, matchers, served)

    # Every family the alerts need; the parser above would pass an expression it misread.
    assert {"breaker_state", "breaker_transitions_total", "breaker_store_up", "up",
            "payments_conflicts_total", "breaker_calls_total", "breaker_rejected_calls_total",
            "breaker_state_seconds_total"} <= used


def test_the_unit_tests_feed_series_the_exporter_serves(
    served: dict[str, dict[str, set[str]]]
) -> None:
    series = re.compile(r"([A-Za-z_:][\w:]*)\{([^}]*)\}")
    fed = 0
    for case in load(UNIT_TESTS)["tests"]:
        for item in case["input_series"]:
            match = series.fullmatch(item["series"])
            assert match, item["series"]
            matchers = {label: [value] for label, value in MATCHER.findall(match.group(2))}
            assert set(matchers) >= TARGET_LABELS, f"{case['name']}: {item['series']}"
            check_selector(case["name"], match.group(1), matchers, served)
            fed += 1

    assert fed >= 30


def test_the_selector_check_rejects_a_metric_or_a_state_the_exporter_never_serves(
    served: dict[str, dict[str, set[str]]]
) -> None:
    [(name, matchers)] = selectors('breaker_state{state="half-open"} == 1')
    with pytest.raises(AssertionError, match="never"):
        check_selector("test", name, matchers, served)
    [(name, matchers)] = selectors("max without (state) (breaker_open_seconds) > 0")
    with pytest.raises(AssertionError, match="not served"):
        check_selector("test", name, matchers, served)


def test_promtool_accepts_the_rules(promtool: str) -> None:
    result = run([promtool, "check", "rules", str(RULES)])

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(list(rules()))} rules found" in result.stdout


def test_promtool_accepts_the_scrape_config_and_the_rules_it_loads(promtool: str) -> None:
    result = run([promtool, "check", "config", str(CONFIG)])

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout
    assert "rules.yml" in result.stdout
    jobs = [job["job_name"] for job in load(CONFIG)["scrape_configs"]]
    assert jobs == ["breaker-exporter"]
    assert 'up{job="breaker-exporter"}' in alerts()["BreakerExporterDown"]["expr"]


def test_the_rules_pass_their_unit_tests(promtool: str) -> None:
    result = run([promtool, "test", "rules", str(UNIT_TESTS)])

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_rejects_a_rule_whose_expression_does_not_parse(
    promtool: str, tmp_path: Path
) -> None:
    broken = tmp_path / "rules.yml"
    broken.write_text(RULES.read_text().replace(
        "increase(payments_conflicts_total[1h])", "increase(payments_conflicts_total)"
    ))

    result = run([promtool, "check", "rules", str(broken)])

    assert result.returncode == 1
    assert "PaymentsSecondCharge" in result.stderr
    assert "expected type range vector" in result.stderr


def test_the_unit_tests_fail_an_alert_that_restarts_whenever_a_probe_runs(
    promtool: str, tmp_path: Path
) -> None:
    # The tempting rule: state="open" alone, which a half-open scrape sets back to zero.
    rules_text = RULES.read_text()
    naive = rules_text.replace(
        'breaker_state{state=~"open|half_open"}', 'breaker_state{state="open"}'
    )
    assert naive != rules_text
    (tmp_path / "rules.yml").write_text(naive)
    shutil.copy(UNIT_TESTS, tmp_path / "tests.yml")

    result = run([promtool, "test", "rules", "tests.yml"], cwd=tmp_path)

    assert result.returncode == 1
    failed = re.findall(r"name: (.*),\n\s*alertname: (\w+)", result.stderr)
    assert set(failed) == {
        ("failed probes flipping open and half-open do not restart the 5 minutes, "
         "a closing does", "BreakerNotClosed"),
        ("a circuit left half-open with no call to probe it still pages", "BreakerNotClosed"),
    }
