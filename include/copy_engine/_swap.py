"""Put a fully loaded copy of a table in the target's place, keeping what depends on the target.

A parallel full copy loads its key ranges in separate transactions, so it cannot write into the
target itself (a TRUNCATE would hold the table locked for the whole copy, and other sessions cannot
write into a table truncated by an uncommitted transaction). It loads a new table built `LIKE` the
target instead, adds the primary key while readers still read the old rows, and then swaps it in,
which only changes the catalog: under the target's lock, in the caller's transaction, the new table
takes the target's name, owner, grants and comments, every plain view reading the target is
redefined on it with its own text, and the old table is dropped.

Anything the swap would not carry over (a trigger, a foreign key, another index, a policy, a
publication, a materialized view reading the table, a table that is not a plain logged heap table
with a primary key, ...) makes `swap_blockers` name it, and the caller writes the rows into the
target in place instead.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from psycopg import sql

from ._errors import SwapRefusedError
from ._schema import relation_oid

logger = logging.getLogger(__name__)

# What CREATE TABLE ... (LIKE) copies, but indexes (the key is built after the load), identity columns
# (their sequence would start over) and extended statistics (they would stay in the staging schema):
# tables with those are not swapped.
LIKE_TARGET = sql.SQL(
    "including defaults including constraints including generated including storage including compression "
    "including comments")

_COLUMN_OPTIONS = frozenset({"n_distinct", "n_distinct_inherited"})
_PRIVILEGES = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER", "MAINTAIN"})

# Properties of the table itself that a new table would not have.
_PROPERTY_BLOCKERS = """
select reason from (values
    (c.relkind <> 'r' or c.relispartition, 'it is not a plain table'),
    (c.relpersistence <> 'p', 'it is unlogged or temporary'),
    (c.reltablespace <> 0, 'it is in its own tablespace'),
    (c.relam is distinct from (select oid from pg_am where amname = 'heap'), 'its access method is not heap'),
    (c.reloptions is not null, 'it has storage parameters'),
    (c.reloftype <> 0, 'it is a typed table'),
    (c.relreplident <> 'd', 'it has a replica identity'),
    (c.relrowsecurity, 'it has row-level security'),
    (exists (select from pg_inherits where inhrelid = c.oid), 'it inherits from another table'),
    (not exists (select from pg_constraint where conrelid = c.oid and contype = 'p'), 'it has no primary key'),
    (exists (select from pg_attribute as a where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
             and (a.attidentity <> '' or a.attacl is not null)),
     'a column is an identity column or has its own grants'),
    (exists (select from pg_seclabel where classoid = 'pg_class'::regclass and objoid = c.oid),
     'it has security labels')
) as checks (blocked, reason)
where blocked
"""

# Objects that depend on the table and that a swap would neither carry over nor redefine. The row type,
# column defaults, CHECK and NOT NULL constraints are copied by LIKE, the primary key is rebuilt, and
# plain views are redefined; anything else is named.
_DEPENDENT_BLOCKERS = """
select coalesce((select pg_describe_object('pg_class'::regclass, r.ev_class, 0) from pg_rewrite as r
                 where d.classid = 'pg_rewrite'::regclass and r.oid = d.objid),  -- the view, not its rule
                pg_describe_object(d.classid, d.objid, d.objsubid))
from pg_depend as d
where d.refclassid = 'pg_class'::regclass and d.refobjid = %(oid)s and d.deptype in ('n', 'a')
  and d.classid not in ('pg_type'::regclass, 'pg_attrdef'::regclass)
  and not (d.classid = 'pg_constraint'::regclass
           and exists (select from pg_constraint as k
                       where k.oid = d.objid and k.conrelid = %(oid)s and k.contype in ('p', 'c', 'n')))
  and not (d.classid = 'pg_class'::regclass
           and exists (select from pg_class as x where x.oid = d.objid and x.relkind = 't'))
  and not (d.classid = 'pg_rewrite'::regclass
           and exists (select from pg_rewrite as r join pg_class as v on v.oid = r.ev_class
                       where r.oid = d.objid and v.relkind = 'v' and v.oid <> %(oid)s))
group by 1
order by 1
"""

_VIEWS = """
select distinct v.oid, n.nspname, v.relname, v.reloptions, pg_get_viewdef(v.oid)
from pg_depend as d
join pg_rewrite as r on d.classid = 'pg_rewrite'::regclass and r.oid = d.objid
join pg_class as v on v.oid = r.ev_class
join pg_namespace as n on n.oid = v.relnamespace
where d.refclassid = 'pg_class'::regclass and d.refobjid = %s and v.relkind = 'v' and v.oid <> %s
order by v.oid
"""


@dataclass(frozen=True)
class _View:
    oid: int
    schema: str
    name: str
    options: list[str]
    definition: str

    def redefine(self) -> sql.Composable:
        options = sql.SQL("")
        if self.options:
            pairs = [option.split("=", 1) for option in self.options]
            options = sql.SQL(" with ({})").format(sql.SQL(", ").join(
                sql.SQL("{} = {}").format(sql.Identifier(key), sql.Literal(value)) for key, value in pairs))
        # The definition is PostgreSQL's own deparse of the view, taken with an empty search_path so
        # that every name in it is schema-qualified.
        return sql.SQL("create or replace view {}{} as {}").format(
            sql.Identifier(self.schema, self.name), options, sql.SQL(self.definition.rstrip().rstrip(";")))


def swap_blockers(conn: psycopg.Connection, oid: int) -> list[str]:
    """What keeps the table `oid` from being swapped, in words; empty when a swap keeps everything."""
    reasons = [str(row[0]) for row in conn.execute(
        "select found.reason from pg_class as c, lateral (" + _PROPERTY_BLOCKERS + ") as found where c.oid = %s",
        (oid,)).fetchall()]
    with _names_qualified(conn):
        dependents = conn.execute(_DEPENDENT_BLOCKERS, {"oid": oid}).fetchall()
    reasons += [f"{row[0]} depends on it" for row in dependents]
    return reasons


def swap_in(conn: psycopg.Connection, *, loaded: tuple[str, str], loaded_key: str, schema: str, relation: str,
            table: str) -> int:
    """Swap the loaded table `loaded` (schema, name; primary key `loaded_key`) in for `schema.relation`.

    Runs inside the caller's transaction, which should be a savepoint: on `SwapRefusedError` the
    caller rolls it back and loads in place. Returns the number of rows the old table held. Lock
    timeouts, deadlocks and lost connections are raised as they are (the run retries them).
    """
    target = sql.Identifier(schema, relation)
    oid = relation_oid(conn, schema, relation)
    if oid is None:
        raise SwapRefusedError(f"{schema}.{relation} does not exist")
    # Readers of a view lock the view, then the table: take the locks in that order, or a reader
    # waiting for the table while holding its view would deadlock with the swap.
    views = _views(conn, oid)
    for view in views:
        conn.execute(sql.SQL("lock table {} in access exclusive mode").format(sql.Identifier(view.schema, view.name)))
    conn.execute(sql.SQL("lock table {} in access exclusive mode").format(target))
    if {view.oid for view in _views(conn, oid)} != {view.oid for view in views}:
        raise SwapRefusedError("the views reading it changed while the swap took its locks")
    blockers = swap_blockers(conn, oid)
    if blockers:
        raise SwapRefusedError("; ".join(blockers))
    row = conn.execute(sql.SQL("select count(*) from {}").format(target)).fetchone()
    old_rows = int(row[0]) if row else 0
    try:
        _replace(conn, oid, views, loaded=loaded, loaded_key=loaded_key, schema=schema, relation=relation)
    except (psycopg.ProgrammingError, psycopg.InternalError, psycopg.NotSupportedError, psycopg.DataError,
            psycopg.IntegrityError) as error:
        raise SwapRefusedError((str(error).splitlines() or [type(error).__name__])[0]) from error
    logger.info("%s: swapped the loaded table in for %s.%s (%d view(s) redefined on it)", table, schema, relation,
                len(views))
    return old_rows


def _views(conn: psycopg.Connection, oid: int) -> list[_View]:
    with _names_qualified(conn):
        rows = conn.execute(_VIEWS, (oid, oid)).fetchall()
    return [_View(int(view_oid), str(schema), str(name), list(options or []), str(definition))
            for view_oid, schema, name, options, definition in rows]


@contextmanager
def _names_qualified(conn: psycopg.Connection) -> Iterator[None]:
    """An empty search_path for the transaction, so that PostgreSQL's deparsed names are schema-qualified."""
    path = conn.execute("select current_setting('search_path')").fetchone()
    conn.execute("select set_config('search_path', '', true)")
    try:
        yield
    finally:
        conn.execute("select set_config('search_path', %s, true)", (path[0] if path else "",))


def _replace(conn: psycopg.Connection, oid: int, views: list[_View], *, loaded: tuple[str, str], loaded_key: str,
             schema: str, relation: str) -> None:
    old_name = f"{relation[:40]}_replaced_{uuid.uuid4().hex[:8]}"
    old = sql.Identifier(schema, old_name)
    new = sql.Identifier(schema, relation)
    row = conn.execute(
        "select pg_get_userbyid(c.relowner), obj_description(c.oid, 'pg_class'), "
        "(select conname from pg_constraint where conrelid = c.oid and contype = 'p') "
        "from pg_class as c where c.oid = %s", (oid,)).fetchone()
    assert row is not None
    owner, comment, key_name = row
    conn.execute(sql.SQL("alter table {} rename to {}").format(sql.Identifier(schema, relation),
                                                              sql.Identifier(old_name)))
    loaded_schema, loaded_name = loaded
    if loaded_schema != schema:
        conn.execute(sql.SQL("alter table {} set schema {}").format(sql.Identifier(*loaded), sql.Identifier(schema)))
    conn.execute(sql.SQL("alter table {} rename to {}").format(sql.Identifier(schema, loaded_name),
                                                              sql.Identifier(relation)))
    conn.execute(sql.SQL("alter table {} owner to {}").format(new, sql.Identifier(owner)))
    _copy_grants(conn, old, new)
    conn.execute(sql.SQL("comment on table {} is {}").format(new, sql.Literal(comment)))
    for column, text, statistics, options in conn.execute(
            "select a.attname, col_description(a.attrelid, a.attnum), a.attstattarget, a.attoptions "
            "from pg_attribute as a where a.attrelid = %s and a.attnum > 0 and not a.attisdropped", (oid,)).fetchall():
        conn.execute(sql.SQL("comment on column {} is {}").format(sql.Identifier(schema, relation, column),
                                                                 sql.Literal(text)))
        if statistics is not None and statistics >= 0:
            conn.execute(sql.SQL("alter table {} alter column {} set statistics {}").format(
                new, sql.Identifier(column), sql.Literal(int(statistics))))
        for key, value in (option.split("=", 1) for option in options or []):
            if key in _COLUMN_OPTIONS:  # what the planner reads; other keys belong to extensions
                conn.execute(sql.SQL("alter table {} alter column {} set ({} = {})").format(
                    new, sql.Identifier(column), sql.Identifier(key), sql.Literal(value)))
    for view in views:
        conn.execute(view.redefine())
    conn.execute(sql.SQL("drop table {}").format(old))
    conn.execute(sql.SQL("alter table {} rename constraint {} to {}").format(
        new, sql.Identifier(loaded_key), sql.Identifier(key_name)))


def _copy_grants(conn: psycopg.Connection, old: sql.Identifier, new: sql.Identifier) -> None:
    """Give `new` exactly the table privileges of `old` (the owner's own included)."""
    acl = ("select grantor, grantee, privilege_type, is_grantable from pg_class as c, "
           "aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) where c.oid = %s::regclass "
           "order by 1, 2, 3, 4")
    old_name, new_name = old.as_string(conn), new.as_string(conn)
    wanted = conn.execute(acl, (old_name,)).fetchall()
    current = conn.execute(acl, (new_name,)).fetchall()
    if current == wanted:
        return
    for grantee in sorted({grantee for _grantor, grantee, _privilege, _grantable in current}):
        conn.execute(sql.SQL("revoke all on table {} from {}").format(new, _role(conn, grantee)))
    for _grantor, grantee, privilege, grantable in wanted:
        if privilege not in _PRIVILEGES:
            raise SwapRefusedError(f"unknown table privilege {privilege!r}")
        conn.execute(sql.SQL("grant {} on table {} to {}{}").format(
            sql.SQL(privilege), new, _role(conn, grantee), sql.SQL(" with grant option" if grantable else "")))
    if conn.execute(acl, (new_name,)).fetchall() != wanted:
        raise SwapRefusedError("its grants could not be copied exactly (a grant by a role other than the owner?)")


def _role(conn: psycopg.Connection, oid: int) -> sql.Composable:
    if oid == 0:
        return sql.SQL("public")
    row = conn.execute("select rolname from pg_roles where oid = %s", (oid,)).fetchone()
    assert row is not None
    return sql.Identifier(row[0])
