"""Every type a column can have, read from the server's own catalog, round-trips exactly.

One wide table per server holds a column of every base, range and multirange type in `pg_type`
(built-in and from every extension the server ships), an array column of each, and enums,
domains and composites, over rows of edge values. A type the catalog lists and this file gives no
values for fails the test, unless PostgreSQL itself has no input for it. Values are compared as
text on both sides, column by column, and by the engine's validation.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
import pytest
from psycopg import sql

from include.copy_engine import SchemaConflictError, SourceError, TableConfig, sync_table, validate_table
from include.copy_engine._schema import describe_source

TEXTS = ["", "tab\there", "new\nline\r\n", "back\\slash \\N \\.", "한국어 عربى 😀 e\u0301", "NULL", " trail "]

# Edge values per type name, as literals for the type's input. Where two values are equal to the
# type's own equality but print differently (1.0 and 1.00), they come first: the drill-down test
# puts the second where the first was, so the engine's comparison must tell them apart.
EDGE_VALUES: dict[str, list[str]] = {
    "bool": ["true", "false"],
    "bytea": ["\\x", "\\x00ff5c0a09", "\\x" + "ab" * 300],
    "char": ["a", "", "Z"],
    "name": ["", "Mixed Case", "ñandú 😀", "n" * 63],
    "int2": ["-32768", "32767", "0"],
    "int4": ["-2147483648", "2147483647", "0"],
    "int8": ["-9223372036854775808", "9223372036854775807", "0"],
    "int2vector": ["", "1 2 3", "-32768 32767"],
    "oidvector": ["", "0 4294967295"],
    "oid": ["0", "4294967295"],
    "xid": ["0", "4294967295"],
    "xid8": ["0", "18446744073709551615"],
    "cid": ["0", "4294967295"],
    "tid": ["(0,0)", "(4294967295,65535)"],
    "regproc": ["-", "now"],
    "regprocedure": ["-", "abs(integer)"],
    "regoper": ["0", "||/"],
    "regoperator": ["0", "+(integer,integer)"],
    "regclass": ["-", "pg_class"],
    "regtype": ["-", "integer", "character varying"],
    "regrole": ["-", "pg_monitor"],
    "regnamespace": ["-", "pg_catalog"],
    "regconfig": ["-", "english"],
    "regdictionary": ["simple"],
    "regcollation": ["-", '"C"'],
    "text": TEXTS,
    "varchar": TEXTS,
    "bpchar": ["a", "a  ", "", "é\t"],
    "refcursor": ["", "cursor\tname 😀"],
    "json": ["{}", "[]", '{"b": 1,  "a": [1, 2],  "a": 3}', '"tab\\t \\u00e9 😀 \\\\"', "null", "1.0"],
    "jsonb": ["1.0", "1.00", "{}", "[]", '{"a": "x\\ty", "b": [1, 2.50]}', "null", '"😀"'],
    "jsonpath": ["$", "$.a[*] ? (@ > 1)", 'strict $."ké y"'],
    "xml": ['<?xml version="1.0"?><doc/>', '<a x="1">x &amp; y</a>', "<!-- c --><b/>", "text only",
            '<?xml version="1.0" standalone="yes"?><r>é\ttab</r>'],
    "pg_snapshot": ["10:20:10,14,15", "1:1:"],
    "txid_snapshot": ["10:20:10,14,15", "1:1:"],
    "point": ["(0,0)", "(1.5,-2)", "(NaN,Infinity)", "(1e+308,-1e-308)"],
    "lseg": ["[(0,0),(1,1)]", "[(-0,NaN),(1,1)]"],
    "path": ["[(0,0),(1,1),(2,0)]", "((0,0),(1,1))"],
    "box": ["(1,1),(0,0)", "(0,0),(0,0)"],
    "polygon": ["((0,0),(1,1),(1,0))", "((0,0))"],
    "line": ["{1,-1,0}", "{0,1,-0.5}"],
    "circle": ["<(0,0),2.5>", "<(1,1),0>"],
    "float4": ["0", "-0", "NaN", "Infinity", "-Infinity", "3.4028235e+38", "1e-45", "1.1"],
    "float8": ["0", "-0", "NaN", "Infinity", "-Infinity", "1.7976931348623157e+308", "5e-324", "0.1"],
    "money": ["1.5", "0", "-92233720368547758.08", "92233720368547758.07"],
    "macaddr": ["08:00:2b:01:02:03", "ff:ff:ff:ff:ff:ff", "00:00:00:00:00:00"],
    "macaddr8": ["08:00:2b:01:02:03:04:05", "00:00:00:00:00:00:00:00"],
    "inet": ["192.168.0.1/24", "192.168.0.1", "::1", "0.0.0.0/0", "2001:db8::1/128"],
    "cidr": ["10.0.0.0/8", "2001:db8::/32", "0.0.0.0/0"],
    "aclitem": ["=r/{user}", "{user}=arwdDxt/{user}"],
    "date": ["infinity", "-infinity", "4713-01-01 BC", "5874897-12-31", "2000-02-29"],
    "time": ["00:00", "24:00:00", "23:59:59.999999"],
    "timetz": ["00:00:00+1559", "24:00:00-1559", "12:34:56.123456+05:45"],
    "timestamp": ["infinity", "-infinity", "4713-01-01 00:00:00 BC", "294276-12-31 23:59:59.999999",
                  "2000-01-01 00:00:00.000001"],
    "timestamptz": ["infinity", "-infinity", "4713-01-01 00:00:00+00 BC", "294276-12-31 23:59:59.999999+00",
                    "2024-01-01 12:34:56.789012+05:30"],
    "interval": ["1 day", "24:00:00", "-178000000 years", "1 year 2 mons 3 days 04:05:06.789", "0", "infinity"],
    "bit": ["0", "1"],
    "varbit": ["", "1010", "0" * 100],
    "numeric": ["1.0", "1.00", "NaN", "Infinity", "-Infinity", "0", "-0.000001",
                "123456789012345678901234567890.123456789012345678901234567890"],
    "uuid": ["00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff"],
    "pg_lsn": ["0/0", "FFFFFFFF/FFFFFFFF"],
    "tsvector": ["", "a:1 fat:2B cat", "'tab\there' 'back\\\\slash'"],
    "tsquery": ["", "fat & !rat", "'a' <-> 'b'"],
    # extensions
    "citext": ["A", "a", "", "Ünïcödé\ttab"],
    "hstore": ["", '"a"=>"1", "b"=>NULL', '"tab\there"=>"back\\\\slash"'],
    "ltree": ["", "Top.Science.Astronomy"],
    "lquery": ["*.Science.*", "!tree"],
    "ltxtquery": ["Europe & Russia*@ & !Transportation"],
    "cube": ["(1,2,3)", "(0),(1)", "(1e+308)"],
    "seg": ["5.0", "5", "<1.5", "1.5 .. 2.5"],
    "query_int": ["1&(2|3)", "!1"],
    "ean13": ["9780393040029", "0036000291452"],
    "isbn": ["978-0-393-04002-9", "0-306-40615-2"],
    "isbn13": ["978-0-393-04002-9"],
    "ismn": ["979-0-060-11561-5"],
    "ismn13": ["979-0-060-11561-5"],
    "issn": ["1436-4522"],
    "issn13": ["977-1436-452-00-8"],
    "upc": ["036000291452"],
    "earth": ["(6378168, 0, 0)"],
    "lo": ["0", "4294967295"],
    "vector": ["[1,2,3]", "[-0.5]"],
    "halfvec": ["[1,2,3]", "[-0.5]"],
    "sparsevec": ["{1:1.5,3:2}/5", "{}/1"],
}

# Edge values an older server refuses.
NEWER_VALUES = {("interval", "infinity")}

# Types whose values PostgreSQL writes but cannot read back: the engine refuses such a column.
NO_INPUT = {"pg_node_tree", "pg_ndistinct", "pg_dependencies", "pg_mcv_list", "pg_brin_bloom_summary",
            "pg_brin_minmax_multi_summary", "gtsvector"}

CATALOG_TYPES = """
select t.typdelim::text, format_type(t.oid, -1), t.typname, t.typtype::text, t.typarray <> 0, n.nspname
from pg_type as t join pg_namespace as n on n.oid = t.typnamespace
where t.typtype in ('b', 'r', 'm', 'd') and t.typisdefined and t.typrelid = 0
  and not (t.typsubscript = 'pg_catalog.array_subscript_handler'::regproc)
  and (n.nspname = 'pg_catalog' or exists (
      select from pg_depend as d where d.classid = 'pg_type'::regclass and d.objid = t.oid and d.deptype = 'e'))
order by n.nspname, t.typname
"""

USER_TYPES = r"""
create schema "Märkte";
create type "Märkte"."Status" as enum ('listed', 'délisté, old', 'has "quote"', 'back\slash', ' ');
create domain "Märkte".positive_price as numeric(12,4) check (value > 0);
create domain "Märkte".code as text check (value <> 'forbidden');
create domain "Märkte".int_list as integer[];
create type "Märkte".price_range as range (subtype = float8);
create type "Märkte"."Quote" as (bid numeric, "Note" text, at timestamptz, tags text[], status "Märkte"."Status")
"""

USER_VALUES: dict[str, list[str]] = {
    '"Märkte"."Status"': ["listed", "délisté, old", 'has "quote"', "back\\slash", " "],
    '"Märkte".positive_price': ["0.0001", "12.5000", "99999999.9999"],
    '"Märkte".code': ["a\tb", "😀"],
    '"Märkte".int_list': ["{}", "{1,NULL,3}", "{{1,2},{3,4}}"],
    '"Märkte".price_range': ["empty", "[1.5,2.5)", "(,)", "[-Infinity,Infinity]"],
    '"Märkte".price_multirange': ["{}", "{[1.5,2.5),[3,4]}"],
    '"Märkte"."Quote"': ['(1.10,"XKRX, main","2024-01-01 00:00+00","{a,\\"b c\\"}",listed)', "(,,,,)",
                         '(-0,"tab\there\\\\",infinity,{},"délisté, old")'],
}


@dataclass(frozen=True)
class WideColumn:
    name: str
    type_sql: str
    values: list[str | None]  # per row; None for NULL
    xml_like: bool = False  # compared through ::text[] (arrays of xml) to see the stored text


@dataclass(frozen=True)
class Wide:
    columns: list[WideColumn]
    rows: int

    def dump(self, pair, dsn: str, relation: str) -> list[tuple[object, ...]]:
        def as_text(column: WideColumn) -> sql.Composable:
            cast = "::text[]::text" if column.xml_like and column.type_sql.endswith("[]") else "::text"
            return sql.SQL("{}" + cast).format(sql.Identifier(column.name))

        query = sql.SQL("select id, {} from {} order by id").format(
            sql.SQL(", ").join(as_text(c) for c in self.columns), sql.SQL(relation))
        with psycopg.connect(dsn, options="-c TimeZone=UTC -c extra_float_digits=3") as conn:
            return conn.execute(query).fetchall()


def _accepted(conn: psycopg.Connection, type_sql: str, literal: str) -> str | None:
    """The literal if the server's input for the type accepts it (some values are newer than PostgreSQL 15)."""
    try:
        with conn.transaction():
            conn.execute(sql.SQL("select {}::{}").format(sql.Literal(literal), sql.SQL(type_sql)))
        return literal
    except psycopg.Error:
        return None


def _rejects_everything(conn: psycopg.Connection, type_sql: str) -> bool:
    return all(_accepted(conn, type_sql, probe) is None for probe in ("", "0", "a", "(0,0)", "[1]", "{}"))


def _extensions(pair, dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        names = [row[0] for row in conn.execute("select name from pg_available_extensions order by name")]
        for name in names:
            try:
                conn.execute(sql.SQL("create extension if not exists {} cascade").format(sql.Identifier(name)))
            except psycopg.Error:
                pass  # needs a preload library or a superuser feature this server lacks


def build_wide(pair) -> Wide:
    """Create the wide table on the source from the catalog; returns its columns and values."""
    _extensions(pair, pair.source)
    _extensions(pair, pair.target)
    pair.run(pair.source, USER_TYPES)
    columns: list[WideColumn] = []
    missing: list[str] = []
    rejected: list[tuple[str, str]] = []
    with psycopg.connect(pair.source, autocommit=True, options="-c search_path=public,pg_catalog") as conn:
        user = str(conn.execute("select current_user").fetchone()[0])
        has_xml = _accepted(conn, "xml", "<a/>") is not None
        catalog = conn.execute(CATALOG_TYPES).fetchall()
        for delimiter, type_sql, typname, typtype, has_array, nspname in catalog:
            if typname in NO_INPUT:
                continue
            if typtype in ("r", "m"):
                values = _range_values(conn, type_sql, typtype)
            elif typname in EDGE_VALUES:
                values = [v.format(user=user) if typname == "aclitem" else v for v in EDGE_VALUES[typname]]
            elif _rejects_everything(conn, type_sql):
                values = []  # an index's storage type: a column of it can only hold NULL
            else:
                missing.append(f"{nspname}.{typname}")
                continue
            if typname == "xml" and not has_xml:
                values = []  # built without libxml: xml columns hold only NULL
            accepted = [v for v in values if _accepted(conn, type_sql, v) is not None]
            # Only a singleton range at the subtype's maximum (its canonical upper bound overflows) and
            # values newer than the server (infinite intervals came with PostgreSQL 17) may be refused.
            rejected.extend((typname, v) for v in values if v not in accepted and typtype not in ("r", "m")
                            and (typname, v) not in NEWER_VALUES)
            name = f"c_{typname}"
            columns.append(WideColumn(name, type_sql, list(accepted), typname == "xml"))
            if has_array:
                array = _array_values(accepted, delimiter)
                columns.append(WideColumn(f"a_{typname}", f"{type_sql}[]", array, typname == "xml"))
        for type_sql, values in USER_VALUES.items():
            name = "u_" + type_sql.split(".")[-1].strip('"').lower()
            columns.append(WideColumn(name, type_sql, list(values)))
            if "int_list" not in type_sql:
                columns.append(WideColumn(name + "_array", f"{type_sql}[]", _array_values(values)))
    assert not missing, f"give edge values in EDGE_VALUES for the catalog's types {missing}"
    assert not rejected, f"the server refuses these edge values: {rejected}"
    columns.append(WideColumn("Größe MixedCase", "text", ["Ä", "ä"]))
    rows = max(len(c.values) for c in columns) + 1  # the last row is all NULL
    definitions = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(c.type_sql)) for c in columns)
    pair.run(pair.source, sql.SQL("create table public.wide (id int primary key, changed_at int not null default 1, "
                                  "{})").format(definitions))
    with psycopg.connect(pair.source, autocommit=True, options="-c search_path=public,pg_catalog") as conn:
        for row in range(rows):
            values = [sql.SQL("{}::{}").format(sql.Literal(c.values[row]), sql.SQL(c.type_sql))
                      if row < len(c.values) and c.values[row] is not None else sql.NULL for c in columns]
            conn.execute(sql.SQL("insert into public.wide values ({}, 1, {})").format(
                sql.Literal(row + 1), sql.SQL(", ").join(values)))
    return Wide(columns, rows)


def _range_values(conn, type_sql, typtype) -> list[str]:
    """Empty, unbounded and one singleton range per edge value of the subtype, from the catalog."""
    subtype = conn.execute("select t.typname from pg_range as r join pg_type as t on t.oid = r.rngsubtype "
                           "where r.rngtypid = %s::regtype or r.rngmultitypid = %s::regtype",
                           (type_sql, type_sql)).fetchone()[0]
    bounds = [v for v in EDGE_VALUES.get(subtype, []) if v not in ("NaN",)]
    ranges = ["empty", "(,)"] + ['["{0}","{0}"]'.format(v.replace('"', '\\"')) for v in bounds]
    if typtype == "r":
        return ranges
    return ["{}", "{(,)}"] + ["{" + r + "}" for r in ranges[2:]]


def _array_values(values: list[str | None], delimiter: str = ",") -> list[str | None]:
    """An empty array, all the values with a NULL among them, and a two-dimensional one."""
    def element(value: str | None) -> str:
        if value is None:
            return "NULL"
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    present = [v for v in values if v is not None]
    if not present:
        return ["{}"]
    flat = "{" + delimiter.join([element(present[0]), "NULL", *(element(v) for v in present[1:])]) + "}"
    return ["{}", flat, "{{" + element(present[0]) + "}" + delimiter + "{NULL}}"]


@pytest.fixture
def wide(pair) -> Wide:
    return build_wide(pair)


def test_every_catalog_type_round_trips_in_a_full_sync_and_validation_names_each_changed_key(pair, wide, caplog):
    table = TableConfig(name="wide", source="public.wide", target="raw.wide", validation_ranges=4)
    caplog.set_level("INFO", logger="include.copy_engine")

    report = sync_table(pair.source, pair.target, table)

    assert report.rows_read == wide.rows
    assert report.validation.match is True
    assert report.copy_format == "text"
    assert wide.dump(pair, pair.target, "raw.wide") == wide.dump(pair, pair.source, "public.wide")
    assert "COPY in text format; binary cannot carry column(s) " in caplog.text
    assert "c_aclitem (aclitem: the type has no binary send/receive functions)" in caplog.text

    # Behind the engine's back, one value per column type changes in the target: to the value the
    # next row holds, or to NULL. Validation fails and names exactly those rows. A second table
    # holds two rows per column (copies of two neighbouring rows of the wide table), so that up to
    # 20 changes (the keys a report names) are checked at once.
    changes: list[tuple[WideColumn, int, int]] = []  # column, wide row changed (0-based), drill row
    sources = []
    for column in wide.columns:
        present = [i for i, value in enumerate(column.values) if value is not None]
        if present:
            row = next((i for i in present if i + 1 in present), present[0])
            changes.append((column, row, 2 * len(changes) + 1))
            sources += [(2 * len(changes) - 1, row + 1), (2 * len(changes), row + 2)]
    names = sql.SQL(", ").join(sql.Identifier(c.name) for c in wide.columns)
    pair.run(pair.source, sql.SQL("create table public.drill as select k.id, {} from (values {}) as k(id, wide_id) "
                                  "join public.wide as w on w.id = k.wide_id").format(
        names, sql.SQL(", ").join(sql.SQL("({}, {})").format(sql.Literal(a), sql.Literal(b)) for a, b in sources)))
    pair.run(pair.source, "alter table public.drill add primary key (id)")
    drill = TableConfig(name="drill", source="public.drill", target="raw.drill", validation_ranges=1)
    assert sync_table(pair.source, pair.target, drill).validation.match is True
    pair.run(pair.target, "create table raw.drill_before as table raw.drill")
    unnamed = []
    for start in range(0, len(changes), 20):
        batch = changes[start:start + 20]
        with psycopg.connect(pair.target, autocommit=True) as conn:
            for column, row, key in batch:
                replacement = sql.SQL("(select {} from raw.drill where id = {})").format(
                    sql.Identifier(column.name), sql.Literal(key + 1)) \
                    if row + 1 < len(column.values) and column.values[row + 1] is not None else sql.NULL
                conn.execute(sql.SQL("update raw.drill set {} = {} where id = {}").format(
                    sql.Identifier(column.name), replacement, sql.Literal(key)))
        result = validate_table(pair.source, pair.target, drill)
        expected = {str(key): column.name for column, _, key in batch}
        named = {key for (key,) in result.differing_keys}
        unnamed += [(name, key, result.differing_keys) for key, name in expected.items() if key not in named]
        assert named <= set(expected)
        with psycopg.connect(pair.target, autocommit=True) as conn:
            for column, _, key in batch:
                conn.execute(sql.SQL("update raw.drill as d set {0} = p.{0} from raw.drill_before as p "
                                     "where p.id = d.id and d.id = {1}").format(sql.Identifier(column.name),
                                                                               sql.Literal(key)))
    assert unnamed == []
    assert validate_table(pair.source, pair.target, drill).match is True


def binary_only(pair, wide: Wide) -> Wide:
    """Drop the source columns binary COPY cannot carry exactly, as the engine's catalog reading names them."""
    with psycopg.connect(pair.source) as conn:
        shape = describe_source(conn, table="wide", schema_name="public", relation="wide", select=None,
                                primary_key=None)
    text_columns = {column.name for column in shape.columns if not column.binary_safe}
    assert {"c_int4", "a_int4", "c_numeric", "c_text", "a_text", "c_timestamptz", "c_jsonb", "c_float8"} & \
        text_columns == set()
    assert {"c_xml", "c_aclitem", "c_regclass", "c_tsquery", "c_citext", "u_quote", "u_status_array"} <= text_columns
    for name in text_columns:
        pair.run(pair.source, sql.SQL("alter table public.wide drop column {}").format(sql.Identifier(name)))
    return Wide([c for c in wide.columns if c.name not in text_columns], wide.rows)


def change_every_row(pair, wide: Wide) -> None:
    """At the source, every row takes the next row's values, the last row goes, and a new row copies the first."""
    names = [c.name for c in wide.columns]
    assignments = sql.SQL(", ").join(sql.SQL("{0} = _next.{0}").format(sql.Identifier(n)) for n in names)
    pair.run(pair.source, sql.SQL(
        "update public.wide set {}, changed_at = 2 from public.wide as _next "
        "where _next.id = public.wide.id % {} + 1").format(assignments, sql.Literal(wide.rows)))
    pair.run(pair.source, f"delete from public.wide where id = {wide.rows}")
    pair.run(pair.source, sql.SQL("insert into public.wide select {} + 1, 3, {} from public.wide where id = 1").format(
        sql.Literal(wide.rows), sql.SQL(", ").join(sql.Identifier(n) for n in names)))


@pytest.mark.parametrize("copy_format", ["text", "binary"])
def test_every_catalog_type_round_trips_in_incremental_syncs(pair, wide, copy_format):
    if copy_format == "binary":
        wide = binary_only(pair, wide)
    table = TableConfig(name="wide", source="public.wide", target="raw.wide", mode="incremental",
                        cursor_column="changed_at", delete_detection="hard", validation_ranges=4)
    first = sync_table(pair.source, pair.target, table)
    assert (first.rows_read, first.validation.match, first.copy_format) == (wide.rows, True, copy_format)

    # Every row takes the next row's values (through the staging table and the upsert), one row
    # goes, and a new row copies the first.
    change_every_row(pair, wide)

    second = sync_table(pair.source, pair.target, table)

    assert (second.rows_read, second.rows_inserted, second.rows_updated, second.rows_deleted) == (
        wide.rows, 1, wide.rows - 1, 1)
    assert (second.validation.match, second.copy_format) == (True, copy_format)
    assert wide.dump(pair, pair.target, "raw.wide") == wide.dump(pair, pair.source, "public.wide")
    # Read again through a look-back that covers every row: nothing differs, so nothing is written.
    again = sync_table(pair.source, pair.target, table.with_overrides(lookback="10"))
    assert (again.rows_read, again.rows_inserted, again.rows_updated, again.rows_deleted) == (wide.rows, 0, 0, 0)


def test_every_catalog_type_round_trips_in_a_parallel_copy(pair, wide):
    table = TableConfig(name="wide", source="public.wide", target="raw.wide", parallel=2, validation_ranges=4)
    for _ in range(2):  # the first run creates the target, the second swaps a new copy in
        report = sync_table(pair.source, pair.target, table)
        assert (report.workers, report.rows_read, report.validation.match) == (2, wide.rows, True)
        assert wide.dump(pair, pair.target, "raw.wide") == wide.dump(pair, pair.source, "public.wide")


@pytest.mark.parametrize("typname", sorted(NO_INPUT - {"gtsvector"}))
def test_a_type_postgresql_cannot_read_back_is_refused_before_anything_is_written(pair, typname):
    pair.run(pair.source, f"create table public.stats (id int primary key, v {typname})")
    table = TableConfig(name="stats", source="public.stats")
    with pytest.raises(SourceError, match=rf"^stats: column v \({typname}\) cannot be copied: PostgreSQL has no "
                                          r"input for this type; leave the column out with a custom select$"):
        sync_table(pair.source, pair.target, table)
    assert pair.scalar(pair.target, "select to_regclass('raw.stats') is null") is True


def test_a_composite_holding_xml_is_refused_before_anything_is_written(pair):
    # Inside a composite, xml travels through its output function, which drops a declaration.
    pair.run(pair.source, "create type public.envelope as (id int, body xml)")
    pair.run(pair.source, "create table public.mail (id int primary key, letter public.envelope)")
    table = TableConfig(name="mail", source="public.mail")
    with pytest.raises(SourceError, match=r"^mail: column letter \(public\.envelope\) cannot be copied: its "
                       r"attribute\(s\) body cannot travel inside a composite \(xml drops its declaration there\); "
                       r"select them as columns of their own with a custom select$"):
        sync_table(pair.source, pair.target, table)
    assert pair.scalar(pair.target, "select to_regclass('raw.mail') is null") is True
    assert pair.scalar(pair.target, "select to_regtype('public.envelope') is null") is True


def test_a_type_from_an_extension_the_target_lacks_is_named_with_the_fix(pair):
    pair.run(pair.source, "create extension if not exists citext")
    pair.run(pair.source, "create table public.people (id int primary key, email citext)")
    table = TableConfig(name="people", source="public.people")
    with pytest.raises(SchemaConflictError, match=r"column type public\.citext comes from extension "
                       r"citext, which the target database lacks; install it there first \(create extension "
                       r"citext schema public\)"):
        sync_table(pair.source, pair.target, table)
    assert pair.scalar(pair.target, "select to_regclass('raw.people') is null") is True
