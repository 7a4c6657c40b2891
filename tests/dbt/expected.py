"""The marts computed independently in Python from the source rows, to compare dbt's output with."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any

BEGINNING = datetime(1900, 1, 1, tzinfo=UTC)

SECURITY_TYPES = {"EQS": "equity", "PRF": "preferred", "ETF": "etf", "REIT": "reit"}
EVENT_TYPES = {
    "DIV": "dividend",
    "SD": "split",
    "CONSD": "consolidation",
    "BON": "bonus_issue",
    "RTS": "rights_issue",
    "MRGR": "merger",
    "DMRGR": "demerger",
    "CAPRD": "capital_reduction",
}
SHARE_EVENTS = {"split", "consolidation", "bonus_issue", "capital_reduction"}

Row = dict[str, Any]


@dataclass(frozen=True)
class Version:
    """One version of a security: its source row and when it was valid, [valid_from, valid_to)."""

    number: int
    row: Row
    valid_from: datetime
    valid_to: datetime | None


def is_live(event: Row) -> bool:
    return event["action_flag"] in ("I", "U")


def versions(history: list[Row], deleted_at: datetime | None = None) -> list[Version]:
    """Versions of one security from its successive source rows, oldest first; the last one ends
    when the security was deleted, if it was."""
    result = []
    for index, row in enumerate(history):
        following = history[index + 1]["updated_at"] if index + 1 < len(history) else deleted_at
        valid_from = BEGINNING if index == 0 else row["updated_at"]
        result.append(Version(index + 1, row, valid_from, following))
    return result


def version_on(history: list[Version], ex_date: date) -> Version:
    ex_at = datetime.combine(ex_date, time(), tzinfo=UTC)
    (match,) = [v for v in history if v.valid_from <= ex_at and (v.valid_to is None or ex_at < v.valid_to)]
    return match


def dim_security(version: Version) -> Row:
    row = version.row
    return {
        "security_id": row["security_id"],
        "isin": row["isin"],
        "ticker": row["ticker"],
        "security_name_en": row["name_en"],
        "security_name_ko": row["name_ko"],
        "exchange_mic": row["exchange_mic"],
        "currency_code": row["currency"],
        "security_type_code": row["security_type"],
        "security_type": SECURITY_TYPES[row["security_type"]],
        "version_number": version.number,
        "is_active": row["status"] == "active",
        "is_current": version.valid_to is None,
        "listing_date": row["listing_date"],
        "valid_from": version.valid_from,
        "valid_to": version.valid_to,
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


def fact_events(events: dict[int, Row], histories: dict[int, list[Version]]) -> dict[int, Row]:
    result = {}
    for event_id, event in events.items():
        if not is_live(event):
            continue
        version = version_on(histories[event["security_id"]], event["ex_date"])
        event_type = EVENT_TYPES[event["event_code"]]
        factor = None
        if event_type in SHARE_EVENTS:
            factor = round(event["ratio_old"] / event["ratio_new"], 12)
        result[event_id] = {
            "event_id": event_id,
            "security_id": event["security_id"],
            "event_code": event["event_code"],
            "event_type": event_type,
            "action_flag": event["action_flag"],
            "isin": version.row["isin"],
            "ticker": version.row["ticker"],
            "security_name_en": version.row["name_en"],
            "security_name_ko": version.row["name_ko"],
            "exchange_mic": version.row["exchange_mic"],
            "currency_code": event["currency"],
            "ratio_old": event["ratio_old"],
            "ratio_new": event["ratio_new"],
            "gross_amount": event["gross_amount"],
            "price_adjustment_factor": factor,
            "is_amended": event["action_flag"] == "U",
            "is_cash_event": event["gross_amount"] is not None,
            "announcement_date": event["announcement_date"],
            "ex_date": event["ex_date"],
            "record_date": event["record_date"],
            "pay_date": event["pay_date"],
            "created_at": event["created_at"],
            "changed_at": event["changed_at"],
            "_version_number": version.number,
        }
    return result


def event_summary(events: dict[int, Row]) -> dict[tuple[int, str], Row]:
    groups: dict[tuple[int, str], list[Row]] = defaultdict(list)
    for event in events.values():
        groups[(event["security_id"], EVENT_TYPES[event["event_code"]])].append(event)
    result = {}
    for (security_id, event_type), group in groups.items():
        ordered = sorted(group, key=lambda event: (event["announcement_date"], event["event_id"]))
        live = [event for event in group if is_live(event)]
        currencies = [event["currency"] for event in group if event["currency"] is not None]
        result[(security_id, event_type)] = {
            "security_id": security_id,
            "first_event_id": ordered[0]["event_id"],
            "latest_event_id": ordered[-1]["event_id"],
            "event_type": event_type,
            "currency_code": max(currencies) if currencies else None,
            "event_count": len(group),
            "live_event_count": len(live),
            "amended_event_count": sum(event["action_flag"] == "U" for event in group),
            "deleted_event_count": sum(event["action_flag"] == "D" for event in group),
            "cancelled_event_count": sum(event["action_flag"] == "C" for event in group),
            "cash_paid_per_share": sum(
                (event["gross_amount"] for event in live if event["gross_amount"] is not None), Decimal(0)
            ),
            "first_announcement_date": ordered[0]["announcement_date"],
            "latest_announcement_date": max(event["announcement_date"] for event in group),
            "latest_ex_date": max((event["ex_date"] for event in live), default=None),
            "latest_changed_at": max(event["changed_at"] for event in group),
        }
    return result


def cash_dividends_yearly(events: dict[int, Row]) -> dict[tuple[int, int], Row]:
    result: dict[tuple[int, int], Row] = {}
    for event in sorted(events.values(), key=lambda event: event["ex_date"]):
        if not is_live(event) or event["event_code"] != "DIV" or event["gross_amount"] is None:
            continue
        key = (event["security_id"], event["ex_date"].year)
        row = result.setdefault(
            key,
            {
                "security_id": key[0],
                "currency_code": event["currency"],
                "dividend_year": key[1],
                "dividend_count": 0,
                "gross_amount_per_share": Decimal(0),
                "first_ex_date": event["ex_date"],
                "last_ex_date": event["ex_date"],
            },
        )
        row["dividend_count"] += 1
        row["gross_amount_per_share"] += event["gross_amount"]
        row["last_ex_date"] = event["ex_date"]
    return result


def split_adjustment_factors(facts: dict[int, Row]) -> dict[tuple[int, date], Row]:
    """Per security and ex date of share events: the day's factor and the cumulative factor."""
    daily: dict[tuple[int, date], Row] = {}
    for fact in facts.values():
        if fact["price_adjustment_factor"] is None:
            continue
        key = (fact["security_id"], fact["ex_date"])
        row = daily.setdefault(key, {"event_count": 0, "adjustment_factor": Decimal(1)})
        row["event_count"] += 1
        row["adjustment_factor"] *= fact["price_adjustment_factor"]
    by_security: dict[int, list[date]] = defaultdict(list)
    for security_id, ex_date in sorted(daily):
        by_security[security_id].append(ex_date)
    result = {}
    for security_id, ex_dates in by_security.items():
        cumulative = Decimal(1)
        for index in range(len(ex_dates) - 1, -1, -1):
            key = (security_id, ex_dates[index])
            cumulative *= daily[key]["adjustment_factor"]
            result[key] = {
                "security_id": security_id,
                "event_count": daily[key]["event_count"],
                "adjustment_factor": daily[key]["adjustment_factor"],
                "cumulative_adjustment_factor": cumulative,
                "applies_from_date": ex_dates[index - 1] if index else None,
                "ex_date": ex_dates[index],
            }
    return result
