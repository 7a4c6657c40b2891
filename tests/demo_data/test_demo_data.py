"""The demo source data: contract columns, determinism, valid ISINs, ticks and the CLI."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from include.demo_data import DEFAULT_EPOCH, DemoDataError, generate, tick

REPO = Path(__file__).resolve().parents[2]
SECURITIES = 300
EVENTS = 3000

STOCK_MASTER_COLUMNS = {
    "security_id": "bigint",
    "isin": "character",
    "ticker": "text",
    "name_en": "text",
    "name_ko": "text",
    "exchange_mic": "character",
    "currency": "character",
    "security_type": "text",
    "status": "text",
    "listing_date": "date",
    "created_at": "timestamp with time zone",
    "updated_at": "timestamp with time zone",
}
EDI_690_COLUMNS = {
    "event_id": "bigint",
    "event_code": "text",
    "security_id": "bigint",
    "action_flag": "character",
    "announcement_date": "date",
    "ex_date": "date",
    "record_date": "date",
    "pay_date": "date",
    "ratio_old": "numeric",
    "ratio_new": "numeric",
    "gross_amount": "numeric",
    "currency": "character",
    "created_at": "timestamp with time zone",
    "changed_at": "timestamp with time zone",
}
EXCHANGES_COLUMNS = {
    "mic": "character",
    "exchange_name": "text",
    "country_code": "character",
    "city": "text",
    "time_zone": "text",
    "currency": "character",
    "opens_at": "time without time zone",
    "closes_at": "time without time zone",
}


def isin_is_valid(isin: str) -> bool:
    """ISO 6166: letters count as 10..35; the Luhn sum over all twelve digits ends in 0."""
    if not re.fullmatch(r"[A-Z]{2}[A-Z0-9]{9}[0-9]", isin):
        return False
    digits = "".join(str(int(char, 36)) for char in isin)
    total = 0
    for position, digit in enumerate(reversed(digits)):
        value = int(digit) * (2 if position % 2 else 1)
        total += value // 10 + value % 10
    return total % 10 == 0


def rows(dsn: str, schema: str, table: str, key: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            sql.SQL("select * from {} order by {}").format(sql.Identifier(schema, table), sql.Identifier(key))
        ).fetchall()


def test_isin_check_reference_values() -> None:
    assert isin_is_valid("US0378331005")  # Apple
    assert isin_is_valid("KR7005930003")  # Samsung Electronics
    assert not isin_is_valid("KR7005930004")


def test_generate_makes_the_contract_tables(database: str) -> None:
    counts = generate(database, securities=SECURITIES, events=EVENTS, schema="source")
    assert counts == {"stock_master": SECURITIES, "edi_690": EVENTS, "exchanges": 12}
    with psycopg.connect(database) as conn:
        for table, expected in (("stock_master", STOCK_MASTER_COLUMNS), ("edi_690", EDI_690_COLUMNS),
                                ("exchanges", EXCHANGES_COLUMNS)):
            columns = dict(
                conn.execute(
                    "select column_name, data_type from information_schema.columns"
                    " where table_schema = 'source' and table_name = %s",
                    (table,),
                ).fetchall()
            )
            assert columns == expected, table
        primary_keys = conn.execute(
            "select tc.table_name, kcu.column_name from information_schema.table_constraints as tc"
            " inner join information_schema.key_column_usage as kcu using (constraint_schema, constraint_name)"
            " where tc.table_schema = 'source' and tc.constraint_type = 'PRIMARY KEY' order by 1"
        ).fetchall()
        assert primary_keys == [("edi_690", "event_id"), ("exchanges", "mic"), ("stock_master", "security_id")]
        orphans = conn.execute(
            "select count(*) from source.edi_690 as e"
            " left join source.stock_master as s using (security_id) where s.security_id is null"
        ).fetchone()
        assert orphans == (0,)
        unlisted = conn.execute("select count(*) from source.stock_master as s"
                                " left join source.exchanges as x on x.mic = s.exchange_mic where x.mic is null")
        assert unlisted.fetchone() == (0,)


def test_generated_values_are_realistic(database: str) -> None:
    generate(database, securities=SECURITIES, events=EVENTS, schema="source")
    securities = rows(database, "source", "stock_master", "security_id")
    events = rows(database, "source", "edi_690", "event_id")
    assert all(isin_is_valid(row[1]) for row in securities)
    assert len({row[1] for row in securities}) == SECURITIES
    assert all(re.search("[\uac00-\ud7a3]", row[4]) for row in securities), "Korean names"
    assert all(re.fullmatch(r"[A-Za-z &\-]+", row[3]) for row in securities), "English names"
    assert {row[5] for row in securities} == {"XKRX", "XKOS", "XNYS", "XNAS", "XTKS", "XHKG"}
    assert {row[8] for row in securities} == {"active", "inactive"}
    assert all(row[10] <= row[11] < DEFAULT_EPOCH for row in securities)
    codes = {row[1] for row in events}
    assert codes == {"DIV", "SD", "CONSD", "BON", "RTS", "MRGR", "DMRGR", "CAPRD"}
    assert {row[3] for row in events} == {"I", "U", "D", "C"}
    for event in events:
        _, code, _, _, announced, ex, record, pay, ratio_old, ratio_new, amount, currency, created, changed = event
        assert announced < ex < record
        assert created <= changed
        assert (amount is not None) == (code == "DIV") == (currency is not None)
        assert (ratio_old is None) == (code == "DIV")
        if pay is not None:
            assert pay > record


def test_generate_is_deterministic_from_the_seed(database: str) -> None:
    generate(database, securities=SECURITIES, events=EVENTS, seed=7, schema="first")
    generate(database, securities=SECURITIES, events=EVENTS, seed=7, schema="second")
    generate(database, securities=SECURITIES, events=EVENTS, seed=8, schema="other")
    for table, key in (("stock_master", "security_id"), ("edi_690", "event_id")):
        assert rows(database, "first", table, key) == rows(database, "second", table, key)
        assert rows(database, "first", table, key) != rows(database, "other", table, key)
    assert rows(database, "first", "exchanges", "mic") == rows(database, "other", "exchanges", "mic")


def test_tick_applies_one_batch_of_changes(database: str) -> None:
    generate(database, securities=SECURITIES, events=EVENTS, schema="source")
    before_securities = {row[0]: row for row in rows(database, "source", "stock_master", "security_id")}
    before_events = {row[0]: row for row in rows(database, "source", "edi_690", "event_id")}
    before_venues = {row[0]: row for row in rows(database, "source", "exchanges", "mic")}
    latest = max(max(row[11] for row in before_securities.values()), max(row[13] for row in before_events.values()))

    changes = tick(database, seed=3, schema="source")

    after_securities = {row[0]: row for row in rows(database, "source", "stock_master", "security_id")}
    after_events = {row[0]: row for row in rows(database, "source", "edi_690", "event_id")}
    after_venues = {row[0]: row for row in rows(database, "source", "exchanges", "mic")}
    changed_securities = {key for key, row in after_securities.items() if row != before_securities[key]}
    new_events = set(after_events) - set(before_events)
    changed_events = {key for key in before_events if after_events[key] != before_events[key]}
    tick_at = {after_securities[key][11] for key in changed_securities} | {
        after_events[key][13] for key in changed_events | new_events
    }
    assert len(tick_at) == 1 and tick_at.pop() > latest, "one change timestamp, after every earlier one"

    renamed = {k for k in changed_securities if after_securities[k][3] != before_securities[k][3]}
    retickered = {k for k in changed_securities if after_securities[k][2] != before_securities[k][2]}
    delisted = {k for k in changed_securities if after_securities[k][8] == "inactive"}
    assert all(after_securities[k][4] != before_securities[k][4] for k in renamed), "Korean name too"
    assert changes == {
        "new_events": len(new_events),
        "amended_events": sum(after_events[k][3] == "U" for k in changed_events),
        "deleted_events": sum(after_events[k][3] == "D" for k in changed_events),
        "cancelled_events": sum(after_events[k][3] == "C" for k in changed_events),
        "renamed_securities": len(renamed),
        "ticker_changes": len(retickered),
        "delisted_securities": len(delisted),
        "new_exchanges": len(after_venues.keys() - before_venues.keys()),
        "changed_exchanges": sum(after_venues[k] != before_venues[k]
                                 for k in after_venues.keys() & before_venues.keys()),
        "removed_exchanges": len(before_venues.keys() - after_venues.keys()),
    }
    assert (changes["new_exchanges"], changes["changed_exchanges"], changes["removed_exchanges"]) == (2, 2, 1)
    assert all(count >= 2 for kind, count in changes.items() if kind != "removed_exchanges"), changes
    removed = (before_venues.keys() - after_venues.keys()).pop()
    assert removed not in {row[5] for row in after_securities.values()}, "no security lists on a removed venue"
    moved = [k for k in after_venues.keys() & before_venues.keys() if after_venues[k] != before_venues[k]]
    assert all(after_venues[k][:7] == before_venues[k][:7] and after_venues[k][7] != before_venues[k][7]
               for k in moved), "only the closing time moves"
    assert len(changed_securities) == len(renamed) + len(retickered) + len(delisted)
    assert all(before_events[k][3] in ("I", "U") for k in changed_events), "only live events change"
    assert all(after_events[k][3] == "I" and after_events[k][5] > after_events[k][12].date() for k in new_events)
    assert changed_securities & {after_events[k][2] for k in new_events}, "new events on changed securities"


def test_tick_is_deterministic_and_honours_now(database: str) -> None:
    for schema in ("first", "second"):
        generate(database, securities=SECURITIES, events=EVENTS, schema=schema)
        tick(database, seed=5, schema=schema)
    assert rows(database, "first", "edi_690", "event_id") == rows(database, "second", "edi_690", "event_id")
    assert rows(database, "first", "exchanges", "mic") == rows(database, "second", "exchanges", "mic")
    assert rows(database, "first", "stock_master", "security_id") == rows(
        database, "second", "stock_master", "security_id"
    )
    wall_clock = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
    tick(database, seed=6, schema="first", now=wall_clock)
    with psycopg.connect(database) as conn:
        assert conn.execute("select max(updated_at) from first.stock_master").fetchone() == (wall_clock,)


def test_tick_without_tables_fails_clearly(database: str) -> None:
    with pytest.raises(DemoDataError, match="run generate first"):
        tick(database, seed=1, schema="nowhere")


def test_cli_prints_one_line_summaries(database: str) -> None:
    def cli(*arguments: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "include.demo_data", *arguments, "--dsn", database, "--schema", "cli"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout

    made = cli("generate", "--securities", "50", "--events", "200", "--seed", "9")
    assert made == "generate cli: stock_master=50, edi_690=200, exchanges=12\n"
    ticked = cli("tick", "--seed", "2")
    assert re.fullmatch(r"tick cli: new_events=\d+, amended_events=\d+, .*delisted_securities=\d+, "
                        r"new_exchanges=2, changed_exchanges=2, removed_exchanges=1\n", ticked)
