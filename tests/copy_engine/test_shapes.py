"""Real source shapes copy value for value, in full, incremental and parallel modes.

Generated columns (stored; on PostgreSQL 18 also virtual) arrive as plain columns holding the
values; partitioned tables, single partitions, inheritance parents and children, identity
columns, non-ASCII and mixed-case names, and targets with dependent views.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from psycopg import sql

from include.copy_engine import SchemaConflictError, TableConfig, sync_table, validate_table


@dataclass(frozen=True)
class SourceShape:
    ddl: Callable[[int], str]  # server major version -> DDL and first rows
    changes: str  # updates (changed_at = 2) and inserts (changed_at = 3) for the incremental round
    source: str
    key: str  # the order of the comparison
    target: str = "raw.shape"


SHAPES = {
    "generated": SourceShape(
        ddl=lambda version: """
            create table public.film (
                film_id int primary key, title text not null, length int,
                length_hours numeric(4,2) generated always as (round(length / 60.0, 2)) stored,
                changed_at int not null default 1 {virtual});
            insert into public.film (film_id, title, length)
                select i, 'Film ' || i, 40 + i from generate_series(1, 50) i;
            """.format(virtual=", length_label text generated always as ('min ' || length) virtual"
                       if version >= 18 else ""),
        changes="""update public.film set length = length + 7, changed_at = 2 where film_id % 5 = 0;
                   insert into public.film (film_id, title, length, changed_at) values (51, 'New', null, 3)""",
        source="public.film", key="film_id"),
    "partitioned": SourceShape(
        ddl=lambda version: """
            create table public.payment (
                payment_id int not null, payment_date date not null, amount numeric(6,2), changed_at int not null,
                primary key (payment_id, payment_date)) partition by range (payment_date);
            create table public.payment_p2024_01 partition of public.payment
                for values from ('2024-01-01') to ('2024-02-01');
            create table public.payment_p2024_02 partition of public.payment
                for values from ('2024-02-01') to ('2024-03-01') partition by hash (payment_id);
            create table public.payment_p2024_02_a partition of public.payment_p2024_02
                for values with (modulus 2, remainder 0);
            create table public.payment_p2024_02_b partition of public.payment_p2024_02
                for values with (modulus 2, remainder 1);
            create table public.payment_other partition of public.payment default;
            insert into public.payment select i, date '2024-01-01' + i, i * 0.25, 1 from generate_series(1, 90) i;
            """,
        changes="""update public.payment set amount = amount + 1, changed_at = 2 where payment_id % 7 = 0;
                   insert into public.payment values (91, '2024-02-15', 9.99, 3), (92, '2030-01-01', 0, 3)""",
        source="public.payment", key="payment_id"),
    "partition": SourceShape(
        ddl=lambda version: SHAPES["partitioned"].ddl(version),
        changes="""update public.payment set amount = -amount, changed_at = 2 where payment_id in (3, 5);
                   insert into public.payment values (93, '2024-01-31', 1.5, 3)""",
        source="public.payment_p2024_01", key="payment_id"),
    "inheritance_child": SourceShape(
        ddl=lambda version: """
            create table public.cities (name text primary key, population int, changed_at int not null default 1);
            create table public.capitals (state text) inherits (public.cities);
            alter table public.capitals add primary key (name);
            insert into public.cities (name, population) select 'city ' || i, i from generate_series(1, 20) i;
            insert into public.capitals (name, population, state)
                select 'capital ' || i, i * 1000, 'state ' || i from generate_series(1, 20) i;
            """,
        changes="""update public.capitals set population = 0, changed_at = 2 where name = 'capital 3';
                   insert into public.capitals values ('capital 99', 1, 3, 'new state')""",
        source="public.capitals", key="name"),
    "inheritance_parent": SourceShape(
        ddl=lambda version: SHAPES["inheritance_child"].ddl(version),
        changes="""update public.cities set population = -1, changed_at = 2 where name in ('city 4', 'capital 5');
                   insert into public.capitals values ('capital 98', 1, 3, 'new state')""",
        source="public.cities", key="name"),
    "identity": SourceShape(
        ddl=lambda version: """
            create table public.tickets (
                ticket_id bigint generated always as identity (start with 1000000) primary key,
                seat int generated by default as identity, note text, changed_at int not null default 1);
            insert into public.tickets (note) select 'note ' || i from generate_series(1, 30) i;
            """,
        changes="""update public.tickets set note = 'changed', changed_at = 2 where ticket_id % 4 = 0;
                   insert into public.tickets (seat, note, changed_at) values (-5, 'new', 3)""",
        source="public.tickets", key="ticket_id"),
    "non_ascii": SourceShape(
        ddl=lambda version: """
            create schema "Verkäufe";
            create type "Verkäufe"."Zustand" as enum ('offen', 'geschloßen', 'Ärger "groß"');
            create domain "Verkäufe"."Preis €" as numeric(10,2) check (value >= 0);
            create table "Verkäufe"."Bestellungen Ü" (
                "Kunde ID" int primary key, "Größe" text, "MixedCase" "Verkäufe"."Zustand",
                "preis €" "Verkäufe"."Preis €", "geändert" int not null default 1);
            insert into "Verkäufe"."Bestellungen Ü" ("Kunde ID", "Größe", "MixedCase", "preis €")
                select i, 'Größe ' || i, (enum_range(null::"Verkäufe"."Zustand"))[1 + i % 3], i
                from generate_series(1, 30) i;
            """,
        changes="""update "Verkäufe"."Bestellungen Ü" set "Größe" = 'ß', "geändert" = 2 where "Kunde ID" < 4;
                   insert into "Verkäufe"."Bestellungen Ü" values (31, 'neu', 'offen', 0, 3)""",
        source="Verkäufe.Bestellungen Ü", key='"Kunde ID"', target="raw.Bestellungen Ü"),
}

MODES = {
    "full": {"mode": "full"},
    "incremental": {"mode": "incremental", "delete_detection": "hard"},
    "parallel": {"mode": "full", "parallel": 2},
}


def relation(name: str) -> sql.Composable:
    return sql.Identifier(*name.split(".", 1))


def dump(pair, dsn: str, name: str, columns: list[str], key: str) -> list[tuple[object, ...]]:
    query = sql.SQL("select {} from {} order by {}").format(
        sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in columns), relation(name),
        sql.SQL(key))
    return pair.rows(dsn, query)


def source_columns(pair, shape: SourceShape) -> list[str]:
    schema, table = shape.source.split(".", 1)
    return [row[0] for row in pair.rows(pair.source, sql.SQL(
        "select attname from pg_attribute where attrelid = {}::regclass and attnum > 0 and not attisdropped "
        "order by attnum").format(sql.Literal(sql.Identifier(schema, table).as_string())))]


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("shape_name", sorted(SHAPES))
def test_a_source_shape_copies_value_for_value(pair, shape_name, mode):
    shape = SHAPES[shape_name]
    pair.run(pair.source, shape.ddl(pair.server.major_version))
    cursor = "geändert" if shape_name == "non_ascii" else "changed_at"
    settings = dict(MODES[mode], **({"cursor_column": cursor} if mode == "incremental" else {}))
    table = TableConfig(name="shape", source=shape.source, target=shape.target, validation_ranges=3, **settings)
    columns = source_columns(pair, shape)

    first = sync_table(pair.source, pair.target, table)
    assert first.validation.match is True
    assert dump(pair, pair.target, shape.target, columns, shape.key) == \
        dump(pair, pair.source, shape.source, columns, shape.key)
    # The target holds plain columns: no generated or identity column that a COPY could not write.
    target_schema, target_table = shape.target.split(".", 1)
    special = pair.rows(pair.target, sql.SQL(
        "select attname, attgenerated::text, attidentity::text from pg_attribute where attrelid = {}::regclass "
        "and attnum > 0 and (attgenerated <> '' or attidentity <> '')").format(
        sql.Literal(sql.Identifier(target_schema, target_table).as_string())))
    assert special == []

    # A view on the target, then a second run after changes: the view shows the new values.
    view = sql.Identifier(target_schema, "shape_view")
    pair.run(pair.target, sql.SQL("create view {} as select * from {}").format(view, relation(shape.target)))
    pair.run(pair.source, shape.changes)
    second = sync_table(pair.source, pair.target, table)

    assert second.validation.match is True
    expected = dump(pair, pair.source, shape.source, columns, shape.key)
    assert dump(pair, pair.target, shape.target, columns, shape.key) == expected
    assert dump(pair, pair.target, f"{target_schema}.shape_view", columns, shape.key) == expected
    if mode == "incremental":
        assert second.rows_inserted >= 1 and second.rows_updated >= 1


def test_a_virtual_or_stored_generated_column_arrives_as_a_plain_column_holding_its_values(pair):
    version = pair.server.major_version
    pair.run(pair.source, SHAPES["generated"].ddl(version))
    sync_table(pair.source, pair.target, TableConfig(name="film", source="public.film"))

    definitions = pair.rows(pair.target, "select attname, format_type(atttypid, atttypmod), attgenerated::text "
                            "from pg_attribute where attrelid = 'raw.film'::regclass and attname like 'length%' "
                            "order by attnum")
    assert definitions == [("length", "integer", ""), ("length_hours", "numeric(4,2)", "")] + (
        [("length_label", "text", "")] if version >= 18 else [])
    assert pair.rows(pair.target, "select length_hours::text from raw.film where film_id = 20") == [("1.00",)]


def test_a_target_with_a_generated_column_is_refused_before_anything_is_written(pair):
    pair.run(pair.source, SHAPES["generated"].ddl(pair.server.major_version))
    pair.run(pair.target, "create schema raw")
    pair.run(pair.target, "create table raw.film (film_id int primary key, title text not null, length int, "
                          "length_hours numeric(4,2) generated always as (round(length / 60.0, 2)) stored, "
                          "changed_at int not null default 1)")
    pair.run(pair.target, "insert into raw.film (film_id, title, length) values (1, 'kept', 1)")
    table = TableConfig(name="film", source="public.film")

    with pytest.raises(SchemaConflictError, match=r"^film: column length_hours of the target raw\.film is a "
                       r"generated column, which no COPY can write; make it a plain column \(alter table … alter "
                       r"column … drop expression\) or drop the target table to reload it$"):
        sync_table(pair.source, pair.target, table)
    assert pair.rows(pair.target, "select film_id, title from raw.film") == [(1, "kept")]


def test_a_target_made_by_hand_with_identity_columns_takes_full_and_incremental_runs(pair):
    pair.run(pair.source, SHAPES["identity"].ddl(pair.server.major_version))
    pair.run(pair.target, "create schema raw")
    pair.run(pair.target, "create table raw.tickets (ticket_id bigint generated always as identity primary key, "
                          "seat int generated by default as identity, note text, changed_at int not null default 1)")
    columns = ["ticket_id", "seat", "note", "changed_at"]
    table = TableConfig(name="tickets", source="public.tickets", mode="incremental", cursor_column="changed_at")
    sync_table(pair.source, pair.target, table)
    pair.run(pair.source, SHAPES["identity"].changes)

    report = sync_table(pair.source, pair.target, table)

    assert (report.rows_inserted, report.rows_updated, report.validation.match) == (1, 8, True)
    assert dump(pair, pair.target, "raw.tickets", columns, "ticket_id") == \
        dump(pair, pair.source, "public.tickets", columns, "ticket_id")


@pytest.mark.parametrize("parallel", [1, 2])
def test_a_wider_target_validates_in_the_source_types_and_still_names_a_changed_key(pair, parallel):
    pair.run(pair.source, "create table public.prices (id int primary key, price numeric(10,2), ratio real, "
                          "qty int)")
    pair.run(pair.source, "insert into public.prices select i, i / 4.0, i / 3.0, i from generate_series(1, 40) i")
    pair.run(pair.target, "create schema raw")
    pair.run(pair.target, "create table raw.prices (id int primary key, price numeric(14,4), ratio double precision, "
                          "qty bigint)")
    table = TableConfig(name="prices", source="public.prices", validation_ranges=2, parallel=parallel)

    report = sync_table(pair.source, pair.target, table)

    assert (report.copy_format, report.validation.match) == ("text", True)
    assert pair.rows(pair.target, "select price::text from raw.prices where id = 2") == [("0.5000",)]
    pair.run(pair.target, "update raw.prices set price = 0.51 where id = 2")
    assert validate_table(pair.source, pair.target, table).differing_keys == [["2"]]
