"""The end of the demo: the exactly-once audit from the provider's ledger, the summary, the PNG."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.demo.sale import SaleRecord, outage_calls
from workers.demo.watch import segments
from workers.sandbox import no_requests

STATE_COLORS = {"closed": "#2e9d4a", "open": "#d64545", "half_open": "#f0b429"}
STATE_LABELS = {"closed": "closed", "open": "open", "half_open": "half-open"}
# The order a circuit normally goes through them, for the summary.
TRANSITION_ORDER = ("closed->open", "open->half_open", "half_open->open", "half_open->closed")
BIN_SECONDS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
DEFERRED_COLOR = "#e07b00"
STATUS_COLORS = {"200": "#2e9d4a", "402": "#7b61c9", "503": "#d64545"}


@dataclass(frozen=True)
class Audit:
    """Each order of the sale against the provider's ledger and the task's result."""

    enqueued: int
    charged_once: list[str] = field(default_factory=list)
    charged_more: list[str] = field(default_factory=list)
    not_charged: list[str] = field(default_factory=list)
    strangers: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    unsettled: list[str] = field(default_factory=list)
    results_matching: int = 0

    @property
    def ok(self) -> bool:
        """Return True when every order was charged exactly once and every task says so."""
        return (
            len(self.charged_once) == self.enqueued
            and not (self.charged_more or self.not_charged or self.strangers)
            and not (self.exceptions or self.unsettled)
            and self.results_matching == self.enqueued
        )


def audit(record: SaleRecord) -> Audit:
    """Check every order against the ledger: charged exactly once, and the task agrees."""
    ledger = record.ledger
    by_order: dict[str, int] = dict(ledger["charges_by_order"]) if ledger else {}
    charge_ids: dict[str, set[str]] = {}
    for charge in ledger["charges"] if ledger else []:
        charge_ids.setdefault(charge["order_id"], set()).add(charge["id"])
    ours = {order.order_id for order in record.orders}
    once: list[str] = []
    more: list[str] = []
    none: list[str] = []
    exceptions: list[str] = []
    unsettled: list[str] = []
    matching = 0
    for order, meta in zip(record.orders, record.results, strict=True):
        count = by_order.get(order.order_id, 0)
        (once if count == 1 else more if count > 1 else none).append(order.order_id)
        status = meta["status"] if meta else "PENDING"
        if status == "SUCCESS":
            result = meta["result"] if meta else None
            charge_id = result.get("charge_id") if isinstance(result, dict) else None
            if charge_id in charge_ids.get(order.order_id, set()):
                matching += 1
        elif status in ("FAILURE", "REVOKED"):
            exceptions.append(f"{order.order_id}: {_exception(meta)}")
        else:
            unsettled.append(f"{order.order_id}: still {status} when the demo stopped waiting")
    return Audit(
        enqueued=len(record.orders),
        charged_once=once,
        charged_more=more,
        not_charged=none,
        strangers=sorted(set(by_order) - ours),
        exceptions=exceptions,
        unsettled=unsettled,
        results_matching=matching,
    )


def _exception(meta: dict[str, Any] | None) -> str:
    result = meta.get("result") if meta else None
    if not isinstance(result, dict):
        return str(result)
    message = result.get("exc_message")
    if isinstance(message, list | tuple):
        message = " ".join(str(part) for part in message)
    return f"{result.get('exc_type', 'Exception')}: {message}"


def summary_lines(record: SaleRecord, result: Audit, picture: Path | None) -> list[str]:
    """Return the summary the demo prints at its end."""
    options = record.options
    lines = [
        "",
        f"Summary: {options.charges} orders, provider down {options.outage:g}s, "
        f"sale took {record.ended_at - record.started_at:.1f}s",
        "",
        "  Every order against the provider's ledger",
        f"    orders enqueued                    {result.enqueued:>5}",
        f"    orders charged exactly once        {len(result.charged_once):>5}",
        f"    orders charged twice or more       {len(result.charged_more):>5}",
        f"    orders not charged                 {len(result.not_charged):>5}",
        f"    task results naming that charge    {result.results_matching:>5}",
        f"    exceptions                         {len(result.exceptions) or 'none':>5}",
    ]
    lines += [f"      {line}" for line in result.exceptions]
    lines += [f"      {line}" for line in result.unsettled]
    lines += [f"      charged {n}x: {o}" for o in result.charged_more
              for n in [record.ledger["charges_by_order"][o] if record.ledger else 0]]
    lines += [f"      not charged: {o}" for o in result.not_charged[:20]]
    lines += [f"      charged but not in the sale: {o}" for o in result.strangers]
    lines += ["", *_breaker_lines(record), "", *_outage_lines(record)]
    if picture is not None:
        lines += ["", f"  Timeline: {picture}"]
    lines.append("")
    if result.ok:
        once = len(result.charged_once)
        lines.append(f"Every order was charged exactly once: {once} of {result.enqueued}.")
    else:
        why = "the sale ran out of time; " if record.timed_out else ""
        lines.append(
            f"NOT every order was charged exactly once: {why}{len(result.charged_once)} of "
            f"{result.enqueued} charged once, {len(result.charged_more)} more than once, "
            f"{len(result.not_charged)} not at all."
        )
    return lines


def _breaker_lines(record: SaleRecord) -> list[str]:
    snapshot = record.snapshot
    if snapshot is None:
        return ["  Breaker payments.card: never used"]
    counts: dict[str, int] = snapshot["transitions"]
    ordered = [e for e in TRANSITION_ORDER if e in counts]
    ordered += sorted(set(counts) - set(TRANSITION_ORDER))
    transitions = ", ".join(f"{edge} {counts[edge]}" for edge in ordered)
    seconds = snapshot["seconds_in_state"]
    in_state = ", ".join(
        f"{STATE_LABELS[state]} {_duration(seconds.get(state, 0.0))}" for state in STATE_LABELS
    )
    return [
        f"  Breaker payments.card (shared by every worker process through Redis), "
        f"now {snapshot['state']}",
        f"    transitions      {transitions or 'none'}",
        f"    time in state    {in_state}",
        f"    calls            {snapshot['calls']} made ({snapshot['failures']} failed), "
        f"{snapshot['rejected']} refused while open or half-open",
        f"    beat publisher   {record.published} state messages on the breaker:state channel",
    ]


def _duration(seconds: float) -> str:
    # A half-open period of a few milliseconds must not read as never.
    return f"{seconds:.1f}s" if seconds >= 1 or seconds == 0 else f"{seconds:.2f}s"


def _outage_lines(record: SaleRecord) -> list[str]:
    ledger = record.ledger
    during = outage_calls(ledger, record.down_at, record.up_at)
    end = record.up_at if record.up_at is not None else float("inf")
    statuses = Counter(
        str(e["status"]) for e in (ledger["events"] if ledger else [])
        if record.down_at is not None and record.down_at <= e["t"] < end
    )
    results = [m["result"] for m in record.results
               if m and m["status"] == "SUCCESS" and isinstance(m.get("result"), dict)]
    deferred = [r for r in results if r.get("deferrals", 0) > 0]
    deferrals = sum(int(r.get("deferrals", 0)) for r in results)
    requests = ledger["requests"] if ledger else no_requests()
    return [
        f"  The outage ({record.options.outage:g}s of HTTP 503)",
        f"    calls that reached the provider    {during:>5}{_statuses(statuses)}",
        f"    charges deferred by the breaker    {len(deferred):>5}  "
        f"({deferrals} deferrals: calls the provider never saw)",
        f"    provider calls in the whole sale   {requests['total']:>5}"
        f"{_statuses(requests['by_status'])} for {record.options.charges} orders",
    ]


def _statuses(counts: Mapping[str, int]) -> str:
    if not counts:
        return ""
    return "  (" + ", ".join(f"HTTP {code}: {n}" for code, n in sorted(counts.items())) + ")"


def plot_timeline(record: SaleRecord, path: Path) -> Path:
    """Draw the breaker's state and the charge throughput over time into a PNG at path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    t0, end = record.started_at, record.ended_at
    span = max(end - t0, 1.0)
    # Bins narrow enough to show a recovery, wide enough that a rate means something.
    width = next((w for w in BIN_SECONDS if span / w <= 60), BIN_SECONDS[-1])
    bins = [i * width for i in range(int(span / width) + 2)]
    fig, (ax_state, ax_charged, ax_deferred, ax_calls) = plt.subplots(
        4, 1, figsize=(11, 9), sharex=True,
        gridspec_kw={"height_ratios": [0.8, 1.8, 1.2, 1.8], "hspace": 0.15},
    )
    legend = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "frameon": False}

    for start, stop, state in segments(record.changes, end):
        ax_state.broken_barh([(start - t0, stop - start)], (0, 1), color=STATE_COLORS[state])
    ax_state.set_ylim(0, 1)
    ax_state.set_yticks([])
    ax_state.set_ylabel("breaker\nstate")
    ax_state.legend(
        handles=[Patch(color=STATE_COLORS[s], label=STATE_LABELS[s]) for s in STATE_LABELS],
        title="payments.card", **legend,
    )

    ledger = record.ledger
    charged = [c["created_at"] - t0 for c in ledger["charges"]] if ledger else []
    ax_charged.hist(charged, bins=bins, weights=[1 / width] * len(charged),
                    color=STATE_COLORS["closed"], label="charges completed")
    ax_charged.set_ylabel("charges / s")
    ax_charged.legend(**legend)

    times = [t - t0 for t, _, _ in record.backlog]
    deferred = [n for _, n, _ in record.backlog]
    ax_deferred.fill_between(times, deferred, step="post", color=DEFERRED_COLOR, alpha=0.35,
                             linewidth=0)
    ax_deferred.step(times, deferred, where="post", color=DEFERRED_COLOR, linewidth=1.5,
                     label="deferred: parked until\nthe breaker lets them\nthrough, or backing off")
    ax_deferred.step(times, [n for _, _, n in record.backlog], where="post", color="#666666",
                     linewidth=1.2, linestyle="--", label="queued or running")
    ax_deferred.set_ylabel("charges\nwaiting")
    ax_deferred.set_ylim(bottom=0)
    ax_deferred.legend(**legend)

    events = ledger["events"] if ledger else []
    codes = sorted({str(e["status"]) for e in events})
    series = [[e["t"] - t0 for e in events if str(e["status"]) == code] for code in codes]
    if series:
        ax_calls.hist(series, bins=bins, stacked=True,
                      weights=[[1 / width] * len(s) for s in series],
                      color=[STATUS_COLORS.get(code, "#888888") for code in codes],
                      label=[f"HTTP {code}" for code in codes])
        ax_calls.legend(title="provider requests", **legend)
    ax_calls.set_ylabel("requests / s")
    ax_calls.set_xlabel("seconds since the sale opened")
    ax_calls.set_xlim(0, span)

    for ax in (ax_charged, ax_deferred, ax_calls):
        ax.grid(axis="y", alpha=0.3)
    if record.down_at is not None:
        down, up = record.down_at - t0, (record.up_at or end) - t0
        for ax in (ax_charged, ax_deferred, ax_calls):
            ax.axvspan(down, up, color="#000000", alpha=0.07, zorder=0, linewidth=0)
        above = ax_state.get_xaxis_transform()
        ax_state.annotate("", xy=(up, 1.12), xytext=(down, 1.12), xycoords=above,
                          arrowprops={"arrowstyle": "<->", "color": "#444444"})
        ax_state.text((down + up) / 2, 1.2, f"provider down (HTTP 503, {up - down:.1f}s)",
                      ha="center", va="bottom", fontsize=9, transform=above)
    o = record.options
    fig.suptitle(
        f"Flash sale: {o.charges} charges, provider down {o.outage:g}s, "
        f"breaker timeout {o.breaker_timeout:g}s",
        fontsize=13,
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
