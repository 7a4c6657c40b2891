"""The dbt project on real PostgreSQL 18 and 15: the marts equal what Python computes from the
source rows, after the initial load and after a tick of source changes."""

from __future__ import annotations

from datetime import UTC, datetime, time
from decimal import Decimal
from typing import Any

from tests.dbt import expected
from tests.dbt.conftest import EVENTS, SECURITIES, Warehouse, fetch

MODELS = {
    "stg_stock_master": "staging",
    "stg_edi_690": "staging",
    "stg_exchanges": "staging",
    "int_event_summary": "intermediate",
    "dim_securities": "marts",
    "fact_events": "marts",
    "fact_cash_dividends_yearly": "marts",
    "fact_split_adjustment_factors": "marts",
    "stg_sync_runs": "staging",
    "pipeline_health": "marts",
    "snp_stock_master": "snapshots",
    "snp_edi_690": "snapshots",
}


def _histories(
    *states: dict[int, dict[str, Any]], deleted_at: dict[int, datetime] | None = None
) -> dict[int, list[expected.Version]]:
    """Versions per security from successive snapshots of the source (unchanged rows count once)."""
    rows: dict[int, list[dict[str, Any]]] = {}
    for state in states:
        for security_id, row in state.items():
            history = rows.setdefault(security_id, [])
            if not history or history[-1] != row:
                history.append(row)
    deleted_at = deleted_at or {}
    return {
        security_id: expected.versions(history, deleted_at.get(security_id)) for security_id, history in rows.items()
    }


def _deletion_at(warehouse: Warehouse) -> datetime:
    """When the snapshot recorded the deletion of the security deleted from raw (dbt's clock)."""
    (row,) = [
        row
        for row in warehouse.after_tick.tables["snp_stock_master"]
        if row["security_id"] == warehouse.deleted_security_id and row["dbt_is_deleted"] == "True"
    ]
    return row["dbt_valid_from"]


def _without_ids(row: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key != "security_version_id"}


def _check_marts(warehouse: Warehouse, state_name: str) -> None:
    state = getattr(warehouse, state_name)
    if state_name == "after_tick":
        histories = _histories(
            warehouse.initial.stock_master,
            warehouse.after_tick.stock_master,
            deleted_at={warehouse.deleted_security_id: _deletion_at(warehouse)},
        )
    else:
        histories = _histories(warehouse.initial.stock_master)
    tables = state.tables

    dim = [_without_ids(row) for row in tables["dim_securities"]]
    assert dim == [expected.dim_security(v) for _, history in sorted(histories.items()) for v in history]

    versions_by_id = {row["security_version_id"]: row for row in tables["dim_securities"]}
    want_events = expected.fact_events(state.edi_690, histories)
    got_events = {row["event_id"]: row for row in tables["fact_events"]}
    assert got_events.keys() == want_events.keys()
    for event_id, got in got_events.items():
        want = dict(want_events[event_id])
        version_number = want.pop("_version_number")
        assert _without_ids(got) == want, event_id
        assert versions_by_id[got["security_version_id"]]["version_number"] == version_number

    summary = {(row["security_id"], row["event_type"]): row for row in tables["int_event_summary"]}
    assert summary == expected.event_summary(state.edi_690)

    yearly = {(row["security_id"], row["dividend_year"]): row for row in tables["fact_cash_dividends_yearly"]}
    assert yearly == expected.cash_dividends_yearly(state.edi_690)

    # Products computed through exp(sum(ln())) and stored with 12 decimals agree to 1e-11.
    factors = {(row["security_id"], row["ex_date"]): row for row in tables["fact_split_adjustment_factors"]}
    want_factors = expected.split_adjustment_factors(want_events)
    assert factors.keys() == want_factors.keys()
    for key, want in want_factors.items():
        got = factors[key]
        assert (got["event_count"], got["applies_from_date"]) == (want["event_count"], want["applies_from_date"])
        assert abs(got["adjustment_factor"] - want["adjustment_factor"]) < Decimal("1e-11"), key
        assert abs(got["cumulative_adjustment_factor"] - want["cumulative_adjustment_factor"]) < Decimal("1e-11"), key


def test_initial_marts_equal_python(warehouse: Warehouse) -> None:
    tables = warehouse.initial.tables
    assert len(warehouse.initial.stock_master) == SECURITIES
    assert len(warehouse.initial.edi_690) == EVENTS
    _check_marts(warehouse, "initial")

    # A few figures spelled out, independent of the helper above.
    live = [event for event in warehouse.initial.edi_690.values() if event["action_flag"] in ("I", "U")]
    counts: dict[str, int] = {}
    for event in live:
        counts[expected.EVENT_TYPES[event["event_code"]]] = counts.get(expected.EVENT_TYPES[event["event_code"]], 0) + 1
    fact_counts: dict[str, int] = {}
    for row in tables["fact_events"]:
        fact_counts[row["event_type"]] = fact_counts.get(row["event_type"], 0) + 1
    assert fact_counts == counts
    assert all(row["is_current"] and row["version_number"] == 1 for row in tables["dim_securities"])
    for security_id in (1, 2, 150, SECURITIES):
        (row,) = [row for row in tables["dim_securities"] if row["security_id"] == security_id]
        source = warehouse.initial.stock_master[security_id]
        assert (row["isin"], row["ticker"], row["security_name_en"], row["security_name_ko"]) == (
            source["isin"],
            source["ticker"],
            source["name_en"],
            source["name_ko"],
        )
        assert row["valid_from"] == datetime(1900, 1, 1, tzinfo=UTC) and row["valid_to"] is None
    total_cash = sum(row["gross_amount_per_share"] for row in tables["fact_cash_dividends_yearly"])
    assert total_cash == sum(e["gross_amount"] for e in live if e["event_code"] == "DIV")


def test_snapshots_hold_old_and_new_versions_after_a_tick(warehouse: Warehouse) -> None:
    before, after = warehouse.initial, warehouse.after_tick
    tick_at = warehouse.tick_at
    for table, key, changed_column, rows_before, rows_after in (
        ("snp_stock_master", "security_id", "updated_at", before.stock_master, after.stock_master),
        ("snp_edi_690", "event_id", "changed_at", before.edi_690, after.edi_690),
    ):
        snapshot: dict[int, list[dict[str, Any]]] = {}
        for row in after.tables[table]:
            snapshot.setdefault(row[key], []).append(row)
        # hard_deletes: new_record. The row deleted from raw keeps its version, closed when dbt saw
        # it gone, and a deletion row follows.
        deleted_id = warehouse.deleted_security_id if key == "security_id" else warehouse.deleted_event_id
        assert snapshot.keys() == rows_after.keys() | {deleted_id}, table
        kept, deletion = snapshot.pop(deleted_id)
        assert {c: kept[c] for c in rows_before[deleted_id]} == rows_before[deleted_id]
        assert kept["dbt_valid_from"] == rows_before[deleted_id][changed_column]
        assert kept["dbt_valid_to"] == deletion["dbt_valid_from"] > tick_at
        assert (kept["dbt_is_deleted"], deletion["dbt_is_deleted"], deletion["dbt_valid_to"]) == ("False", "True", None)
        changed = 0
        for row_id, versions in snapshot.items():
            source_columns = rows_after[row_id].keys()
            current = rows_after[row_id]
            previous = rows_before.get(row_id)
            if previous is None or previous == current:
                (only,) = versions
                assert {c: only[c] for c in source_columns} == current
                assert only["dbt_valid_from"] == current[changed_column] and only["dbt_valid_to"] is None
                continue
            changed += 1
            old, new = versions
            assert {c: old[c] for c in source_columns} == previous
            assert {c: new[c] for c in source_columns} == current
            assert old["dbt_valid_from"] == previous[changed_column]
            assert old["dbt_valid_to"] == new["dbt_valid_from"] == tick_at
            assert new["dbt_valid_to"] is None
            assert old["dbt_is_deleted"] == new["dbt_is_deleted"] == "False"
        assert changed >= 2, table
    assert warehouse.tick_changes["renamed_securities"] >= 2


def test_dim_securities_shows_both_versions_after_a_tick(warehouse: Warehouse) -> None:
    _check_marts(warehouse, "after_tick")
    dim = warehouse.after_tick.tables["dim_securities"]
    changed = {
        security_id
        for security_id, row in warehouse.after_tick.stock_master.items()
        if row != warehouse.initial.stock_master[security_id]
    }
    changes = warehouse.tick_changes
    assert len(changed) == changes["renamed_securities"] + changes["ticker_changes"] + changes["delisted_securities"]
    for security_id in changed:
        old, new = [row for row in dim if row["security_id"] == security_id]
        assert (old["version_number"], old["is_current"], old["valid_to"]) == (1, False, warehouse.tick_at)
        assert (new["version_number"], new["is_current"], new["valid_from"]) == (2, True, warehouse.tick_at)
        assert new["valid_to"] is None
        assert (old["ticker"], old["security_name_en"], old["is_active"]) != (
            new["ticker"],
            new["security_name_en"],
            new["is_active"],
        )
    assert sum(row["is_current"] for row in dim) == SECURITIES - 1
    (deleted,) = [row for row in dim if row["security_id"] == warehouse.deleted_security_id]
    assert (deleted["is_current"], deleted["valid_to"]) == (False, _deletion_at(warehouse))


def test_fact_events_after_a_tick(warehouse: Warehouse) -> None:
    before, after = warehouse.initial, warehouse.after_tick
    facts = {row["event_id"]: row for row in after.tables["fact_events"]}
    dropped = {
        event_id
        for event_id, row in after.edi_690.items()
        if row["action_flag"] in ("D", "C") and before.edi_690[event_id]["action_flag"] in ("I", "U")
    }
    assert len(dropped) == warehouse.tick_changes["deleted_events"] + warehouse.tick_changes["cancelled_events"]
    assert not dropped & facts.keys()
    assert warehouse.deleted_event_id not in facts, "hard-deleted at the source"
    assert warehouse.deleted_event_id in {row["event_id"] for row in before.tables["fact_events"]}
    orphans = [row for row in facts.values() if row["security_id"] == warehouse.deleted_security_id]
    assert orphans and all(row["security_version_id"] for row in orphans), "events of a deleted security"
    assert dropped <= {row["event_id"] for row in before.tables["fact_events"]}
    new_events = after.edi_690.keys() - before.edi_690.keys()
    assert new_events <= facts.keys()
    amended = {
        event_id
        for event_id, row in after.edi_690.items()
        if event_id in before.edi_690 and row != before.edi_690[event_id] and row["action_flag"] == "U"
    }
    assert all(facts[event_id]["ex_date"] == after.edi_690[event_id]["ex_date"] for event_id in amended)

    # Events on securities that changed pick the version valid on their ex date: old before the
    # tick, new after it, and both cases occur.
    tick_day_start = warehouse.tick_at
    changed = {sid for sid, row in after.stock_master.items() if row != before.stock_master[sid]}
    picked = {"old": 0, "new": 0}
    for row in facts.values():
        if row["security_id"] not in changed:
            continue
        ex_at = datetime.combine(row["ex_date"], time(), tzinfo=UTC)
        side = "new" if ex_at >= tick_day_start else "old"
        source = (after if side == "new" else before).stock_master[row["security_id"]]
        assert (row["ticker"], row["security_name_en"]) == (source["ticker"], source["name_en"]), row["event_id"]
        picked[side] += 1
    assert picked["old"] > 0 and picked["new"] > 0, picked


def test_stg_exchanges_follows_the_venues_through_a_tick(warehouse: Warehouse) -> None:
    """The CDC table's staging model: one row per venue as raw has it, before and after a tick."""
    initial = warehouse.initial.tables["stg_exchanges"]
    after = warehouse.after_tick.tables["stg_exchanges"]
    assert len(initial) == 12
    raw = fetch(warehouse.dsn, "select * from raw.exchanges order by mic")
    assert [row["exchange_mic"] for row in after] == [row["mic"] for row in raw]
    for row, venue in zip(after, raw, strict=True):
        opens, closes = (venue["opens_at"].hour * 60 + venue["opens_at"].minute,
                         venue["closes_at"].hour * 60 + venue["closes_at"].minute)
        assert row["session_minutes"] == (closes - opens) % 1440, venue["mic"]
        assert (row["exchange_name"], row["currency_code"], row["closes_at"]) == (
            venue["exchange_name"], venue["currency"], venue["closes_at"])
    changes = warehouse.tick_changes
    before, now = {row["exchange_mic"]: row for row in initial}, {row["exchange_mic"]: row for row in after}
    assert (len(now.keys() - before.keys()), len(before.keys() - now.keys())) == (
        changes["new_exchanges"], changes["removed_exchanges"]) == (2, 1)
    assert sum(now[mic] != before[mic] for mic in now.keys() & before.keys()) == changes["changed_exchanges"] == 2


def test_relations_land_in_their_schemas(warehouse: Warehouse) -> None:
    for name, schema in MODELS.items():
        rows = warehouse.catalog["nodes"]
        (node,) = [node for node in rows.values() if node["metadata"]["name"] == name]
        assert node["metadata"]["schema"] == schema, name


def test_docs_describe_every_model_and_column(warehouse: Warehouse) -> None:
    documented = {
        node["name"]: node
        for node in warehouse.manifest["nodes"].values()
        if node["resource_type"] in ("model", "snapshot")
    }
    assert documented.keys() == MODELS.keys()
    for node in warehouse.catalog["nodes"].values():
        name = node["metadata"]["name"]
        manifest_node = documented[name]
        assert manifest_node["description"].strip(), name
        if manifest_node["resource_type"] == "snapshot":
            continue  # the raw columns are described on the source
        described = {column for column, spec in manifest_node["columns"].items() if spec["description"].strip()}
        assert set(node["columns"]) == described, name
    for source in warehouse.manifest["sources"].values():
        # A table without a change timestamp (the CDC venues) is fresh as of its last successful sync.
        assert source["description"].strip() and (source["loaded_at_field"] or source["loaded_at_query"])
        assert source["freshness"]["error_after"]["count"]
