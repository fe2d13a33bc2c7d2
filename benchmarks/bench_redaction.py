"""The redacting log filter on the lines a worker writes for every charge.

Every record that reaches a worker's handlers passes workers.redaction.RedactingFilter. This
times the filter on the lines of a charge that succeeds and of one the gate parks, against
the cost of formatting the same records with Celery's worker log format (what the handler
pays for a line anyway). No target: the figure says what a line's redaction adds.
"""

from __future__ import annotations

import logging

from benchmarks.harness import Report, Row, best_per_call, loop
from workers.redaction import RedactingFilter

# Celery's default worker_log_format.
FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"

# (message, args) of the lines one charge writes, from a real worker's log.
LINES: list[tuple[str, tuple[object, ...]]] = [
    ("Task %(name)s[%(id)s] received",
     ({"name": "payments.charge", "id": "3e842426-47e4-4c12-b911-fd388058e5ba"},)),
    ("Charge %s deferred (%s) in %.3fs (attempts %d, deferrals %d), parked until %s lets it "
     "through", ("ord_20261206000123", "circuit payments.card open", 5.213, 0, 1,
                 "payments.card")),
    ('HTTP Request: %s %s "%s %d %s"',
     ("POST", "http://127.0.0.1:41797/v1/charges", "HTTP/1.1", 200, "OK")),
    ("Charge %s succeeded (%s) after %d attempt(s), %d deferral(s)",
     ("ord_20261206000123", "ch_abb30c5e0bfb4374a47bc048", 1, 0)),
    ("Task %(name)s[%(id)s] succeeded in %(runtime)ss: %(return_value)s",
     ({"name": "payments.charge", "id": "3e842426-47e4-4c12-b911-fd388058e5ba",
       "runtime": 0.0078, "return_value": "{'order_id': 'ord_20261206000123', 'status': "
       "'succeeded', 'charge_id': 'ch_abb30c5e0bfb4374a47bc048', 'attempts': 1, "
       "'deferrals': 0}"},)),
]


def _records() -> list[logging.LogRecord]:
    return [
        logging.LogRecord("workers.charges", logging.INFO, __file__, 1, msg, args, None)
        for msg, args in LINES
    ]


def main() -> None:
    """Time the filter and the formatting per line, and print the table."""
    redactor = RedactingFilter(secrets=["sk_live_apikey9000"])
    formatter = logging.Formatter(FORMAT)

    def redact_lines() -> None:
        for record in _records():
            redactor.filter(record)

    def format_lines() -> None:
        for record in _records():
            formatter.format(record)

    def build_lines() -> None:
        _records()

    per_call = best_per_call({"redact": loop(redact_lines), "format": loop(format_lines),
                              "build": loop(build_lines)})
    per_line = {name: seconds / len(LINES) * 1e9 for name, seconds in per_call.items()}
    redact = per_line["redact"] - per_line["build"]
    format_ = per_line["format"] - per_line["build"]
    report = Report()
    report.table(
        f"The redacting log filter, per line of a charge ({len(LINES)} lines: received, "
        "deferred, the HTTP call, succeeded twice)",
        [Row("redaction of a line: vs formatting it", redact, format_, "formatting")],
        [f"a LogRecord's construction ({per_line['build']:,.0f} ns) is taken out of both"],
    )
    report.verdicts()


if __name__ == "__main__":
    main()
