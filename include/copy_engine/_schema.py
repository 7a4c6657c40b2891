"""Read the source's exact column types; create and evolve the target table to match.

Type names come from `format_type()` with an empty search_path, so built-in types read as
`numeric(18,6)` and user-defined ones come schema-qualified and quoted by the server itself; they
are catalog output, not user input, and are composed as SQL fragments for that reason.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from ._errors import MissingPrimaryKeyError, SchemaConflictError, SourceError

logger = logging.getLogger(__name__)

SOFT_DELETE_COLUMN = "_deleted_at"

_COLUMNS_SQL = """
select a.attname, format_type(a.atttypid, a.atttypmod), a.atttypid::int, a.attnotnull, a.attgenerated::text,
       coalesce(coll.collisdeterministic, true)
from pg_attribute as a
left join pg_collation as coll on coll.oid = a.attcollation
where a.attrelid = %s and a.attnum > 0 and not a.attisdropped
order by a.attnum
"""

_RELATION_SQL = """
select c.oid::int, c.relkind::text from pg_class as c join pg_namespace as n on n.oid = c.relnamespace
where n.nspname = %s and c.relname = %s and c.relkind in ('r', 'p', 'v', 'm', 'f')
"""

_PRIMARY_KEY_SQL = """
select a.attname
from pg_index as i
join lateral unnest(i.indkey) with ordinality as k(attnum, position) on true
join pg_attribute as a on a.attrelid = i.indrelid and a.attnum = k.attnum
where i.indrelid = %s and i.indisprimary
order by k.position
"""

_TYPE_FACTS_SQL = """
select t.typtype::text, n.nspname, t.typname, t.typelem::int, t.typbasetype::int,
       coalesce(r.rngsubtype, mr.rngsubtype, 0)::int, t.typsend::oid <> 0 and t.typreceive::oid <> 0,
       t.typsubscript = 'pg_catalog.array_subscript_handler'::regproc, t.typrelid::int,
       exists (select from pg_opclass as oc join pg_am as am on am.oid = oc.opcmethod
               where am.amname = 'hash' and oc.opcdefault and oc.opcintype = t.oid)
from pg_type as t
join pg_namespace as n on n.oid = t.typnamespace
left join pg_range as r on r.rngtypid = t.oid
left join pg_range as mr on mr.rngmultitypid = t.oid
where t.oid = %s
"""

# Built-in types PostgreSQL stores but cannot read back (their input functions always refuse).
_NO_INPUT = frozenset({"pg_node_tree", "pg_ndistinct", "pg_dependencies", "pg_mcv_list", "pg_brin_bloom_summary",
                       "pg_brin_minmax_multi_summary", "gtsvector"})
# Types whose binary input rejects values their binary output produces (an empty tsquery).
_BINARY_REJECTS = frozenset({"tsquery"})
# Object-identifier types: binary COPY carries the oid, text COPY the name the target resolves again.
_OBJECT_NAMES = frozenset({"regproc", "regprocedure", "regoper", "regoperator", "regclass", "regtype", "regrole",
                           "regnamespace", "regconfig", "regdictionary", "regcollation"})
# Built-in types whose default hash tells apart every two values whose text differs. Others (numeric
# 1.0 and 1.00, float 0 and -0, interval '1 day' and '24:00:00', char 'a' and 'a ', jsonb, enums, citext)
# are hashed as text.
_EXACT_HASH = frozenset({"int2", "int4", "int8", "oid", "bool", "text", "varchar", "name", "char", "uuid",
                         "bytea", "date", "timestamp", "timestamptz", "time", "timetz", "inet", "cidr", "macaddr",
                         "macaddr8", "bit", "varbit", "pg_lsn", "xid8"})


@dataclass(frozen=True)
class TypeFacts:
    """How values of one column type travel and are compared; see `type_facts`."""

    text_reason: str | None = None  # why binary COPY cannot carry it exactly (None: it can)
    read_cast: str | None = None  # COPY reads `column::<read_cast>`: the output function drops stored content
    hash: str = "text"  # validation hashes it "native"ly, as "numeric" (value and scale) or as "text"
    refusal: str | None = None  # why no copy can carry it at all
    padded: bool = False  # bpchar: its cast to text drops trailing spaces that its output keeps


@dataclass(frozen=True)
class Column:
    name: str
    type_sql: str
    type_oid: int
    not_null: bool
    facts: TypeFacts = TypeFacts()
    generated: str = ""  # "s" stored, "v" virtual: the target holds the values in a plain column
    deterministic: bool = True  # its collation compares bytes (a nondeterministic one hashes 'A' as 'a')

    @property
    def binary_safe(self) -> bool:
        return self.facts.text_reason is None

    @property
    def hash_mode(self) -> str:
        return self.facts.hash if self.deterministic else "text"


@dataclass(frozen=True)
class Shape:
    """The columns of a source (table or custom select) and its primary key."""

    columns: list[Column]
    primary_key: tuple[str, ...]
    # Why `COPY table TO` cannot read the source and a `COPY (select …) TO` does (None: it can).
    read_reason: str | None = None

    @property
    def names(self) -> list[str]:
        return [column.name for column in self.columns]

    def column(self, name: str) -> Column | None:
        return next((column for column in self.columns if column.name == name), None)

    def text_columns(self) -> list[str]:
        """`name (type: reason)` of each column binary COPY cannot carry exactly."""
        return [f"{c.name} ({c.type_sql}: {c.facts.text_reason})" for c in self.columns if not c.binary_safe]

    def as_text(self, name: str, prefix: str | None = None) -> sql.Composable:
        """The column's stored value as text, compared byte by byte: equal exactly when the values are."""
        column = self.column(name)
        identifier = sql.Identifier(prefix, name) if prefix else sql.Identifier(name)
        if column is not None and column.facts.read_cast:
            identifier = sql.SQL("{}::{}").format(identifier, sql.SQL(column.facts.read_cast))
        elif column is not None and column.facts.padded:
            identifier = sql.SQL("pg_catalog.textin(pg_catalog.bpcharout({}))").format(identifier)
        return sql.SQL('({}::text collate pg_catalog."C")').format(identifier)

    def read_list(self, columns: list[str]) -> sql.Composable:
        """The select list a COPY reads: a column whose output loses stored content is read through its cast."""
        items: list[sql.Composable] = []
        for name in columns:
            column = self.column(name)
            if column is not None and column.facts.read_cast:
                items.append(sql.SQL("{0}::{1} as {0}").format(sql.Identifier(name), sql.SQL(column.facts.read_cast)))
            else:
                items.append(sql.Identifier(name))
        return sql.SQL(", ").join(items)


@dataclass
class TargetPlan:
    """What the target looks like after `prepare_target`: the columns COPY writes and its format."""

    columns: list[str]
    extra_columns: list[str]
    binary: bool
    changes: list[str] = field(default_factory=list)
    existed: bool = True
    ordinary_table: bool = True  # not partitioned or foreign: those refuse COPY FREEZE
    # Columns the target holds in a wider type than the source: validation reads them in the
    # source's type (column -> source type), so 0.5000 in numeric(14,4) compares as 0.50.
    converted: dict[str, str] = field(default_factory=dict)


def find_relation(conn: psycopg.Connection, schema: str, name: str) -> tuple[int, str] | None:
    """The relation's oid and relkind, or None when there is none of that name."""
    row = conn.execute(_RELATION_SQL, (schema, name)).fetchone()
    return (int(row[0]), str(row[1])) if row else None


def relation_oid(conn: psycopg.Connection, schema: str, name: str) -> int | None:
    found = find_relation(conn, schema, name)
    return found[0] if found else None


def type_facts(conn: psycopg.Connection, oid: int, cache: dict[int, TypeFacts] | None = None) -> TypeFacts:
    """How a type's values travel: through domains to their base, arrays to their element, ranges to
    their subtype."""
    cache = {} if cache is None else cache
    if oid in cache:
        return cache[oid]
    row = conn.execute(_TYPE_FACTS_SQL, (oid,)).fetchone()
    assert row is not None, f"type {oid} is not in pg_type"
    typtype, nsp, name, element, base, subtype, has_binary_io, is_array, relid, has_hash = row
    builtin = nsp == "pg_catalog"
    facts: TypeFacts
    if typtype == "d":
        facts = type_facts(conn, base, cache)
    elif is_array and element:
        inner = type_facts(conn, element, cache)
        element_builtin = conn.execute("select typnamespace = 'pg_catalog'::regnamespace and typtype = 'b' "
                                       "from pg_type where oid = %s", (element,)).fetchone()
        reason = inner.text_reason
        if reason is None and not (element_builtin and element_builtin[0]):
            reason = "binary arrays carry their element type's oid, which differs between databases"
        facts = TypeFacts(reason, f"{inner.read_cast}[]" if inner.read_cast else None,
                          "native" if inner.hash == "native" else "text", inner.refusal)
    elif typtype == "c":
        lossy = [a.name for a in _read_columns(conn, relid) if a.facts.read_cast or a.facts.refusal]
        facts = TypeFacts("binary composites carry their attributes' type oids, which differ between databases",
                          refusal=f"its attribute(s) {', '.join(lossy)} cannot travel inside a composite (xml drops "
                          "its declaration there); select them as columns of their own with a custom select"
                          if lossy else None)
    elif typtype == "e":
        facts = TypeFacts()  # binary enums are their labels; hashed as text (their hash is of the oid)
    elif typtype in ("r", "m"):
        inner = type_facts(conn, subtype, cache)
        facts = TypeFacts(inner.text_reason, None, "native" if inner.hash == "native" else "text", inner.refusal)
    elif not builtin:
        facts = TypeFacts("an extension type (its binary form is the extension's own)")
    elif name in _NO_INPUT:
        facts = TypeFacts("PostgreSQL cannot read this type back", refusal="PostgreSQL has no input for this type; "
                          "leave the column out with a custom select")
    elif name == "xml":
        facts = TypeFacts("its output drops a default XML declaration: read as text", read_cast="text")
    elif name in _OBJECT_NAMES:
        facts = TypeFacts("binary COPY carries the object's oid, text COPY its name")
    elif not has_binary_io:
        facts = TypeFacts("the type has no binary send/receive functions")
    elif name in _BINARY_REJECTS:
        facts = TypeFacts("its binary input rejects values its binary output produces (an empty tsquery)")
    elif name == "bpchar":
        facts = TypeFacts(padded=True)
    elif name == "numeric":
        facts = TypeFacts(hash="numeric")
    else:
        facts = TypeFacts(hash="native" if name in _EXACT_HASH and has_hash else "text")
    cache[oid] = facts
    return facts


def _read_columns(conn: psycopg.Connection, oid: int) -> list[Column]:
    conn.execute("select set_config('search_path', '', true)")
    rows = conn.execute(_COLUMNS_SQL, (oid,)).fetchall()
    cache: dict[int, TypeFacts] = {}
    return [Column(name, type_sql, type_oid, bool(not_null), type_facts(conn, type_oid, cache), generated or "",
                   bool(deterministic))
            for name, type_sql, type_oid, not_null, generated, deterministic in rows]


def _read_reason(conn: psycopg.Connection, oid: int, kind: str, columns: list[Column]) -> str | None:
    """Why the plain `COPY table TO` cannot read this table (None: it can)."""
    if kind == "p":
        return "a partitioned table (COPY reads its partitions through a select)"
    if kind != "r":
        return "not a plain table"
    children = conn.execute("select exists (select from pg_inherits where inhparent = %s)", (oid,)).fetchone()
    if children and children[0]:
        return "it has inheritance children (a select reads their rows too)"
    generated = [c.name for c in columns if c.generated]
    if generated:
        return f"generated column(s) {', '.join(generated)} (COPY TO cannot name them)"
    cast = [c.name for c in columns if c.facts.read_cast]
    if cast:
        return f"column(s) {', '.join(cast)} are read through a cast"
    return None


def read_primary_key(conn: psycopg.Connection, oid: int) -> tuple[str, ...]:
    return tuple(row[0] for row in conn.execute(_PRIMARY_KEY_SQL, (oid,)).fetchall())


def describe_source(
    conn: psycopg.Connection,
    *,
    table: str,
    schema_name: str,
    relation: str,
    select: sql.Composable | None,
    where: sql.Composable | None = None,
    primary_key: tuple[str, ...] | None,
) -> Shape:
    """The source's columns and key, read in a short transaction that is rolled back."""
    with conn.transaction(force_rollback=True):
        found = find_relation(conn, schema_name, relation)
        oid = found[0] if found else None
        if select is None and oid is None:
            raise SourceError(
                f"source table {schema_name}.{relation} does not exist; check `source` in the configuration",
                table=table,
            )
        read_reason: str | None = "a custom select or where"
        if select is None and where is None:
            assert oid is not None and found is not None
            columns = _read_columns(conn, oid)
            read_reason = _read_reason(conn, oid, found[1], columns)
        else:
            base = sql.SQL("({})").format(select) if select is not None else sql.Identifier(schema_name, relation)
            query = sql.SQL("select * from {} as _source").format(base)
            if where is not None:
                query = sql.SQL("{} where ({})").format(query, where)
            # A temporary view gives the custom select's exact result types, typmods included.
            try:
                with conn.transaction():
                    conn.execute(sql.SQL("create temporary view _copy_engine_shape as {}").format(query), {})
            except psycopg.Error as error:
                message = (str(error).strip().splitlines() or [""])[0]
                raise SourceError(
                    f"the custom select/where does not run on the source: {message}; fix it in the configuration",
                    table=table,
                ) from error
            view_oid = conn.execute("select 'pg_temp._copy_engine_shape'::regclass::oid::int").fetchone()
            assert view_oid is not None
            columns = _read_columns(conn, int(view_oid[0]))
        key = primary_key or (read_primary_key(conn, oid) if oid is not None else ())
    for column in columns:
        if column.facts.refusal:
            raise SourceError(
                f"column {column.name} ({column.type_sql}) cannot be copied: {column.facts.refusal}",
                table=table,
            )
    names = {column.name for column in columns}
    missing = [name for name in key if name not in names]
    if missing:
        raise SourceError(
            f"primary key column(s) {', '.join(missing)} are not among the source columns "
            f"({', '.join(sorted(names))}); fix primary_key or the custom select",
            table=table,
        )
    return Shape(columns=columns, primary_key=tuple(key), read_reason=read_reason)


# --- user-defined types -------------------------------------------------------------------------

_TYPE_SQL = """
select t.oid::int, n.nspname, t.typname, t.typtype::text, t.typcategory::text, t.typelem::int,
       t.typbasetype::int, format_type(t.typbasetype, t.typtypmod), t.typnotnull,
       coalesce(r.rngsubtype, 0)::int, format_type(r.rngsubtype, null), t.typrelid::int
from pg_type as t
join pg_namespace as n on n.oid = t.typnamespace
left join pg_range as r on r.rngtypid = t.oid
where t.oid = %s
"""


@dataclass(frozen=True)
class UserType:
    oid: int
    schema: str
    name: str
    kind: str
    definition: sql.Composed | sql.SQL
    enum_labels: tuple[str, ...] = ()
    extension: str | None = None  # the extension a base type comes from: the target must have it


def user_types(conn: psycopg.Connection, columns: list[Column], *, table: str) -> list[UserType]:
    """User-defined types the columns need, dependencies first."""
    ordered: list[UserType] = []
    seen: set[int] = set()

    def visit(oid: int) -> None:
        if oid in seen or oid == 0:
            return
        seen.add(oid)
        row = conn.execute(_TYPE_SQL, (oid,)).fetchone()
        assert row is not None
        (_, nsp, name, typtype, category, elem, base, base_sql, notnull, subtype, subtype_sql, relid) = row
        if category == "A" and elem:
            visit(elem)
            return
        if nsp in ("pg_catalog", "information_schema"):
            return
        qualified = sql.Identifier(nsp, name)
        if typtype == "e":
            labels = tuple(r[0] for r in conn.execute(
                "select enumlabel from pg_enum where enumtypid = %s order by enumsortorder", (oid,)))
            definition = sql.SQL("create type {} as enum ({})").format(
                qualified, sql.SQL(", ").join(sql.Literal(label) for label in labels))
            ordered.append(UserType(oid, nsp, name, "enum", definition, labels))
        elif typtype == "d":
            visit(base)
            checks = [r[0] for r in conn.execute(
                "select pg_get_constraintdef(oid) from pg_constraint where contypid = %s and contype = 'c' "
                "order by conname", (oid,))]
            parts: list[sql.Composable] = [sql.SQL("create domain {} as {}").format(qualified, sql.SQL(base_sql))]
            if notnull:
                parts.append(sql.SQL("not null"))
            parts.extend(sql.SQL(check) for check in checks)
            ordered.append(UserType(oid, nsp, name, "domain", sql.SQL(" ").join(parts)))
        elif typtype == "r":
            visit(subtype)
            definition = sql.SQL("create type {} as range (subtype = {})").format(qualified, sql.SQL(subtype_sql))
            ordered.append(UserType(oid, nsp, name, "range", definition))
        elif typtype == "c":
            attributes = _read_columns(conn, relid)
            for attribute in attributes:
                visit(attribute.type_oid)
            definition = sql.SQL("create type {} as ({})").format(qualified, sql.SQL(", ").join(
                sql.SQL("{} {}").format(sql.Identifier(a.name), sql.SQL(a.type_sql)) for a in attributes))
            ordered.append(UserType(oid, nsp, name, "composite", definition))
        elif typtype == "m":
            ranges = conn.execute("select rngtypid::int from pg_range where rngmultitypid = %s", (oid,)).fetchone()
            assert ranges is not None
            visit(int(ranges[0]))  # a range type brings its multirange type with it
        else:
            extension = conn.execute(
                "select e.extname from pg_depend as d join pg_extension as e on e.oid = d.refobjid "
                "where d.classid = 'pg_type'::regclass and d.objid = %s and d.deptype = 'e'", (oid,)).fetchone()
            ordered.append(UserType(oid, nsp, name, "extension", sql.SQL(""),
                                    extension=str(extension[0]) if extension else None))

    conn.execute("select set_config('search_path', '', true)")
    for column in columns:
        visit(column.type_oid)
    return ordered


def create_schema_if_missing(conn: psycopg.Connection, name: str) -> None:
    """`create schema if not exists` that tolerates a concurrent first run creating it too.

    Two tables loading into a new schema at once both insert it into pg_namespace; the second
    waits for the first and then fails on the unique index. A savepoint keeps that from
    aborting the data transaction.
    """
    if conn.execute("select 1 from pg_namespace where nspname = %s", (name,)).fetchone():
        return
    try:
        with conn.transaction():
            conn.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(name)))
    except psycopg.errors.UniqueViolation:
        logger.info("schema %s was created by a concurrent run", name)


def ensure_types(conn: psycopg.Connection, types: list[UserType], *, table: str | None = None) -> list[str]:
    """Create missing types in the target; add enum labels the target lacks. Returns the changes."""
    changes: list[str] = []
    for user_type in types:
        if user_type.kind != "extension":
            create_schema_if_missing(conn, user_type.schema)
        exists = conn.execute(
            "select t.oid::int from pg_type as t join pg_namespace as n on n.oid = t.typnamespace "
            "where n.nspname = %s and t.typname = %s", (user_type.schema, user_type.name)).fetchone()
        if exists is None and user_type.kind == "extension":
            origin = f"extension {user_type.extension}" if user_type.extension else "an extension"
            raise SchemaConflictError(
                f"column type {user_type.schema}.{user_type.name} comes from {origin}, which the target database "
                f"lacks; install it there first (create extension {user_type.extension or '…'} schema "
                f"{user_type.schema})",
                table=table,
            )
        if exists is None:
            conn.execute(user_type.definition)
            changes.append(f"created {user_type.kind} type {user_type.schema}.{user_type.name}")
            continue
        if user_type.kind == "enum":
            present = {r[0] for r in conn.execute(
                "select enumlabel from pg_enum where enumtypid = %s", (exists[0],))}
            for label in user_type.enum_labels:
                if label not in present:
                    conn.execute(sql.SQL("alter type {} add value {}").format(
                        sql.Identifier(user_type.schema, user_type.name), sql.Literal(label)))
                    changes.append(f"added value {label!r} to enum {user_type.schema}.{user_type.name}")
    return changes


# --- target table and drift ---------------------------------------------------------------------

_INTEGER_RANK = {"smallint": 1, "integer": 2, "bigint": 3}
_NUMERIC = re.compile(r"^numeric(?:\((\d+),(\d+)\))?$")
_VARCHAR = re.compile(r"^character varying(?:\((\d+)\))?$")
_VARBIT = re.compile(r"^bit varying(?:\((\d+)\))?$")


def is_safe_widening(old: str, new: str) -> bool:
    """True when every value of type `old` is exactly representable in `new`."""
    if old == new:
        return True
    if old in _INTEGER_RANK and (new in _INTEGER_RANK and _INTEGER_RANK[new] > _INTEGER_RANK[old]):
        return True
    if old in _INTEGER_RANK and new == "numeric":
        return True
    if old == "real" and new == "double precision":
        return True
    old_num, new_num = _NUMERIC.match(old), _NUMERIC.match(new)
    if old_num and new_num:
        if new_num.group(1) is None:
            return True
        if old_num.group(1) is None:
            return False
        old_p, old_s, new_p, new_s = (int(x) for x in (*old_num.groups(), *new_num.groups()))
        return new_s >= old_s and new_p - new_s >= old_p - old_s
    for pattern in (_VARCHAR, _VARBIT):
        old_match, new_match = pattern.match(old), pattern.match(new)
        if old_match and new_match:
            return new_match.group(1) is None or (
                old_match.group(1) is not None and int(new_match.group(1)) >= int(old_match.group(1)))
    return bool(_VARCHAR.match(old)) and new == "text"


def prepare_target(
    conn: psycopg.Connection,
    shape: Shape,
    *,
    table: str,
    schema_name: str,
    relation: str,
    soft_delete: bool,
    need_key: bool,
) -> TargetPlan:
    """Create the target table or bring it in line with the source; runs in the data transaction."""
    create_schema_if_missing(conn, schema_name)
    target = sql.Identifier(schema_name, relation)
    found = find_relation(conn, schema_name, relation)
    changes: list[str] = []
    if found is None:
        definitions = [
            sql.SQL("{} {}{}").format(sql.Identifier(c.name), sql.SQL(c.type_sql),
                                      sql.SQL(" not null") if c.not_null else sql.SQL(""))
            for c in shape.columns
        ]
        if soft_delete:
            definitions.append(sql.SQL("{} timestamptz").format(sql.Identifier(SOFT_DELETE_COLUMN)))
        if shape.primary_key:
            definitions.append(sql.SQL("primary key ({})").format(
                sql.SQL(", ").join(sql.Identifier(name) for name in shape.primary_key)))
        conn.execute(sql.SQL("create table {} ({})").format(target, sql.SQL(", ").join(definitions)))
        changes.append(f"created table {schema_name}.{relation}")
        logger.info("%s: created target table %s.%s", table, schema_name, relation)
        _log_copy_format(table, shape, [])
        return TargetPlan(shape.names, [SOFT_DELETE_COLUMN] if soft_delete else [],
                          all(c.binary_safe for c in shape.columns), changes, existed=False)

    oid, kind = found
    existing = {column.name: column for column in _read_columns(conn, oid)}
    binary = True
    widened: list[str] = []
    for column in shape.columns:
        current = existing.get(column.name)
        if current is not None and current.generated:
            raise SchemaConflictError(
                f"column {column.name} of the target {schema_name}.{relation} is a generated column, which no "
                "COPY can write; make it a plain column (alter table … alter column … drop expression) or drop "
                "the target table to reload it",
                table=table,
            )
        if current is None:
            conn.execute(sql.SQL("alter table {} add column {} {}").format(
                target, sql.Identifier(column.name), sql.SQL(column.type_sql)))
            changes.append(f"added column {column.name} {column.type_sql}")
        elif current.type_sql != column.type_sql:
            if is_safe_widening(column.type_sql, current.type_sql):
                binary = False  # the target is already wider: text COPY converts
                widened.append(f"{column.name} ({current.type_sql} in the target, {column.type_sql} in the source)")
            elif is_safe_widening(current.type_sql, column.type_sql):
                conn.execute(sql.SQL("alter table {} alter column {} type {}").format(
                    target, sql.Identifier(column.name), sql.SQL(column.type_sql)))
                changes.append(f"widened column {column.name} from {current.type_sql} to {column.type_sql}")
            else:
                raise SchemaConflictError(
                    f"column {column.name} is {current.type_sql} in the target {schema_name}.{relation} but "
                    f"{column.type_sql} in the source, which is not a safe widening; change the target column "
                    "by hand or drop the target table to reload it",
                    table=table,
                )
        if not column.binary_safe:
            binary = False
    source_names = set(shape.names)
    extra: list[str] = []
    for name, current in existing.items():
        if name in source_names:
            continue
        if name == SOFT_DELETE_COLUMN and soft_delete:
            extra.append(name)
            continue
        if current.not_null:
            conn.execute(sql.SQL("alter table {} alter column {} drop not null").format(
                target, sql.Identifier(name)))
        changes.append(f"column {name} is no longer in the source: kept in the target, filled with NULL")
        extra.append(name)
    if soft_delete and SOFT_DELETE_COLUMN not in existing:
        conn.execute(sql.SQL("alter table {} add column {} timestamptz").format(
            target, sql.Identifier(SOFT_DELETE_COLUMN)))
        changes.append(f"added column {SOFT_DELETE_COLUMN} timestamptz for soft deletes")
        extra.append(SOFT_DELETE_COLUMN)
    target_key = read_primary_key(conn, oid)
    if shape.primary_key and not target_key:
        conn.execute(sql.SQL("alter table {} add primary key ({})").format(
            target, sql.SQL(", ").join(sql.Identifier(name) for name in shape.primary_key)))
        changes.append(f"added primary key ({', '.join(shape.primary_key)})")
    elif shape.primary_key and target_key != shape.primary_key:
        raise SchemaConflictError(
            f"the target's primary key ({', '.join(target_key)}) differs from the source's "
            f"({', '.join(shape.primary_key)}); align primary_key in the configuration",
            table=table,
        )
    if need_key and not shape.primary_key:
        raise MissingPrimaryKeyError(
            "the source has no primary key; set primary_key in the configuration", table=table)
    for change in changes:
        logger.info("%s: schema change: %s", table, change)
    _log_copy_format(table, shape, widened)
    return TargetPlan(shape.names, extra, binary, changes, existed=True, ordinary_table=kind == "r",
                      converted=target_conversions(conn, shape, oid))


def target_conversions(conn: psycopg.Connection, shape: Shape, oid: int) -> dict[str, str]:
    """The source type of each column the target (relation `oid`) holds in another type."""
    existing = {column.name: column.type_sql for column in _read_columns(conn, oid)}
    return {column.name: column.type_sql for column in shape.columns
            if column.name in existing and existing[column.name] != column.type_sql}


def _log_copy_format(table: str, shape: Shape, widened: list[str]) -> None:
    """Say which columns make the COPY go as text, and why."""
    reasons = shape.text_columns() + [f"{item}: text COPY converts" for item in widened]
    if reasons:
        logger.info("%s: COPY in text format; binary cannot carry column(s) %s", table, "; ".join(reasons))
    if shape.read_reason:
        logger.info("%s: COPY reads the source through a select: %s", table, shape.read_reason)
