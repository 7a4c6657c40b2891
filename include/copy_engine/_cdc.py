"""The change-data-capture strategy: a logical replication slot (pgoutput) on the source.

First run (or after the slot was lost): check the source's requirements, create the table's
publication and slot on a replication connection with `EXPORT_SNAPSHOT`, and copy the table in
full from that exported snapshot, which holds exactly the transactions committed before the slot's
start. The slot's start position is stored with the rows, in the target's transaction.

Later runs read the changes up to the source's current position with
`pg_logical_slot_peek_binary_changes` (nothing is consumed), decode pgoutput, coalesce them per
key in commit order, and apply them in one target transaction that also stores the position
reached. Only after that commit is the slot advanced (`pg_replication_slot_advance`). A run killed
between the two replays the same changes next time; transactions that commit before the stored
position are skipped, so nothing is applied twice and nothing is missed.

The slot is read by that SQL function, not over the streaming replication protocol: a stream lets the
engine decode while the server decodes, but the walsender sends every message on its own, which cost
more than the overlap saved (2026-12-01, 1% of 2M rows changed: 0.81 s by a stream against 0.71 s by
the function in one bench; the README's "How the slot is read"). The function sends nothing before it
has decoded every change, so it runs on a source connection of its own (`_SlotReader`), started as soon
as the run holds its lock, while the run describes the table, checks the slot and prepares the target.

Values arrive in their types' binary send format where binary COPY carries every column exactly
(`_binary_types`): the stage then holds the source's types and the apply parses no text. Otherwise,
or when a column's type changed within the changes read, they arrive as text.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import itertools
import logging
import queue
import re
import struct
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.adapt import Dumper
from psycopg.pq import Format
from psycopg.rows import scalar_row

from ._config import TableConfig
from ._connect import connect
from ._errors import SourceError, TerminalError, TransientError
from ._keys import key_changes
from ._report import ValidationResult
from ._run import TableRun, column_list, import_snapshot, wait_for
from ._schema import Shape
from ._state import ensure_state_tables, forget_replication, read_cdc_states, read_watermark, write_state

logger = logging.getLogger(__name__)

_STAGE = "_copy_engine_cdc_stage"
# The stage's chunks (`_write`): the first one small, as the engine builds it while the warehouse waits;
# each later one is built while the warehouse applies the one before, which takes the warehouse 3-5 times
# as long per row as the engine takes to build it (2026-12-01, the 2M-row bench: 7-8 us against 25 us).
_FIRST_CHUNK = 256 << 10  # bytes of binary COPY rows
_CHUNK_GROWTH = 3
_LARGEST_CHUNK = 16 << 20
PROGRESS_EVERY = 50_000  # decoded changes between progress lines
_READ_BATCH = 10_000  # messages per fetch from the slot
# A stage this large gets statistics before the joins (a wrong plan would cost more than the ANALYZE);
# below it the planner's estimate from the stage's size serves, and the ANALYZE was a tenth of a run.
_ANALYZE_STAGE_FROM = 50_000


class _Keep:
    """A column value the change did not carry (an unchanged TOASTed value): the target keeps its own."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP = _Keep()
_DELETED = _Keep()  # stage_rows' mark of a deleted key
Value = str | bytes | None | _Keep


class NeedsText(Exception):  # noqa: N818 (a signal, not an error: the caller reads the changes again)
    """The changes cannot be read with binary values (a column's type changed, or a value came as text):
    read them again with text values."""


def replication_name(target_table: str, target_database: str) -> str:
    """The slot's and the publication's name: readable, unique per warehouse table, at most 63 characters."""
    relation = re.sub(r"[^a-z0-9_]", "_", target_table.split(".")[-1].lower())[:30]
    digest = hashlib.sha256(f"{target_database}\0{target_table}".encode()).hexdigest()[:10]
    return f"copy_engine_{relation}_{digest}"


def lsn_int(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def lsn_text(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


# --- the source's requirements --------------------------------------------------------------------

_REQUIREMENTS_SQL = """
select current_setting('wal_level'),
       (select rolreplication or rolsuper from pg_roles where rolname = current_user),
       current_user,
       has_database_privilege(current_database(), 'CREATE'),
       pg_has_role(c.relowner, 'USAGE'),
       c.relreplident::text,
       c.relkind::text,
       current_setting('max_replication_slots')::int,
       (select count(*) from pg_replication_slots)::int,
       current_setting('max_wal_senders')::int,
       exists (select from pg_publication where pubname = %(name)s)
from pg_class as c
where c.oid = %(oid)s
"""


def check_requirements(run: TableRun, name: str) -> None:
    """Everything a first CDC run creates on the source, checked first; every missing one named with its fix."""
    table, src = run.table, run.src
    schema_name, relation = table.source_schema_table
    with src.transaction(force_rollback=True):
        oid = src.execute("select to_regclass(%s)::oid::int", (str(run.names.base().as_string(src)),)).fetchone()
        row = src.execute(_REQUIREMENTS_SQL, {"name": name, "oid": oid[0] if oid else None}).fetchone()
        source_key = src.execute(
            "select array_agg(a.attname order by k.n) from pg_index as i "
            "join lateral unnest(i.indkey) with ordinality as k(attnum, n) on true "
            "join pg_attribute as a on a.attrelid = i.indrelid and a.attnum = k.attnum "
            "where i.indrelid = %s and i.indisprimary", (oid[0] if oid else None,)).fetchone()
    if row is None:
        raise SourceError(f"the source table {table.source} does not exist", table=table.name)
    (wal_level, can_replicate, user, can_create, owns, identity, kind, max_slots, slots, max_senders,
     publication_exists) = row
    missing: list[str] = []
    if wal_level != "logical":
        missing.append(f"wal_level is {wal_level}: set wal_level = logical on the source and restart it "
                       "(on Amazon RDS / Aurora: rds.logical_replication = 1 in the parameter group)")
    if not can_replicate:
        missing.append(f"the role {user} may not create replication slots: ALTER ROLE {user} REPLICATION "
                       f"(on Amazon RDS: GRANT rds_replication TO {user})")
    if not publication_exists and not (can_create and owns):
        missing.append(f"the role {user} cannot create the publication {name} (it needs CREATE on the database "
                       f"and to own {schema_name}.{relation}): have the owner run "
                       f"CREATE PUBLICATION {name} FOR TABLE {schema_name}.{relation}")
    if kind != "r":
        missing.append(f"{table.source} is not a plain table (relkind {kind}); CDC reads plain tables")
    key = tuple(source_key[0] or ()) if source_key else ()
    wanted = run.shape.primary_key
    if identity == "n" or (identity == "d" and (not key or key != wanted)) or identity == "i":
        what = "has no primary key" if not key else f"identifies its rows by ({', '.join(key)})"
        missing.append(f"{table.source} {what}, so its updates and deletes cannot be matched to target rows by "
                       f"({', '.join(wanted) or 'no key'}): add a primary key, or set primary_key and "
                       f"ALTER TABLE {schema_name}.{relation} REPLICA IDENTITY FULL")
    if slots >= max_slots:
        missing.append(f"all {max_slots} replication slots are in use: raise max_replication_slots (restart) or "
                       "drop an unused slot")
    if max_senders < 1:
        missing.append("max_wal_senders is 0: raise it (restart) so the slot can be created")
    if missing:
        raise SourceError("mode cdc cannot start, nothing was created: " + "; ".join(missing), table=table.name)


# --- pgoutput -------------------------------------------------------------------------------------

_COUNT = struct.Struct("!h").unpack_from
_SIZE = struct.Struct("!i").unpack_from
_OID = struct.Struct("!I").unpack_from
_TEXT, _BINARY, _NULL, _UNCHANGED, _NEW = ord("t"), ord("b"), ord("n"), ord("u"), ord("N")
_INSERT, _UPDATE = ord("I"), ord("U")
# Binary COPY: the file's signature (no flags, no header extension), a row's field count, a NULL field,
# the end of the data.
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_FIELD_COUNT = struct.Struct("!h").pack
_FIELD_SIZE = struct.Struct("!i").pack
_NULL_FIELD = _FIELD_SIZE(-1)
_COPY_TRAILER = _FIELD_COUNT(-1)
_EMPTY_FIELD = _FIELD_SIZE(0)
_DELETE_FIELD, _UPSERT_FIELD = _FIELD_SIZE(1) + b"d", _FIELD_SIZE(1) + b"u"


def _text_field(value: str, encoding: str) -> bytes:
    data = value.encode(encoding)
    return _FIELD_SIZE(len(data)) + data


@dataclass
class _Relation:
    columns: list[str]
    # Per relation column: its position among the target's columns (None: the target lacks it).
    targets: list[int | None] = field(default_factory=list)
    # Per relation column up to the last key column: its position in the key (-1: not a key column).
    key_slots: list[int] = field(default_factory=list)
    # The target's columns the relation lacks: a change keeps the target's values there.
    uncovered: list[int] = field(default_factory=list)
    # The relation's columns are the target's, in the target's order.
    in_order: bool = False
    # The key is one column, the relation's first.
    key_first: bool = False


@dataclass(slots=True)
class _Lazy:
    """A row not decoded yet: a later change of its key would make decoding it wasted work."""

    message: bytes
    position: int
    relation: _Relation


@dataclass
class Changes:
    """The changes of a batch coalesced per key: the last row of each key (decoded, or the message it is in),
    or None for a deleted key."""

    rows: dict[tuple[str | None, ...], list[Value] | None] = field(default_factory=dict)
    truncated: bool = False
    messages: int = 0
    transactions: int = 0
    skipped_transactions: int = 0


@dataclass(slots=True)
class StageChunk:
    """Rows of the CDC stage in binary COPY format (without the file's signature and trailer)."""

    data: bytearray = field(default_factory=bytearray)
    rows: int = 0
    # Rows that keep a value of the target's (an unchanged TOASTed value), and deleted keys.
    kept: int = 0
    deletes: int = 0


class PgOutputDecoder:
    """Decodes pgoutput (protocol 1) into `Changes` over the target's columns.

    Values are text (decoded to str), or with `binary_types` (pgoutput's `binary` option) each type's
    binary send format, kept as bytes: a binary COPY field of the column's type as it is.

    `lookup` fetches a column of the target's row for a key: an update that moves a row to a new
    key and leaves a TOASTed value unchanged carries no value for it.

    A key changed many times in a batch costs one decode: an insert or update is first read only up
    to its key and kept undecoded; a later change of the key replaces it unless that change leaves a
    TOASTed value unchanged (then the two are decoded and merged). `stage_rows()` copies what is left
    into the stage's COPY rows without decoding the values.
    """

    def __init__(self, columns: list[str], key: tuple[str, ...], skip_before: int,
                 lookup: Callable[[tuple[Any, ...], str], Any] | None = None,
                 encoding: str = "utf-8", binary_types: dict[str, int] | None = None) -> None:
        self.columns = columns
        self.index = {name: position for position, name in enumerate(columns)}
        self.key_positions = [self.index[name] for name in key]
        self.skip_before = skip_before
        self.lookup = lookup
        self.relations: dict[int, _Relation] = {}
        self.changes = Changes()
        # pgoutput sends values converted to the decoding session's client encoding, as any result
        self.encoding = encoding
        # Binary values (pgoutput's `binary` option): each column's type oid at the source, which every
        # relation message must match; values stay bytes (the type's send format, a binary COPY field).
        self.binary_types = binary_types
        self._value = _BINARY if binary_types is not None else _TEXT
        self._skipping = False

    def _text(self, data: bytes) -> Any:
        """A value's bytes as the decoder keeps them: text decoded, binary as is."""
        return data if self._value == _BINARY else data.decode(self.encoding)

    def _field(self, value: Any, encoding: str) -> bytes:
        if self._value == _BINARY:
            return _FIELD_SIZE(len(value)) + value  # type: ignore[no-any-return]
        return _text_field(value, encoding)

    def _unexpected(self, kind: int) -> None:
        if kind == _TEXT and self._value == _BINARY:
            raise NeedsText("pgoutput sent a value as text (its type has no binary send function)")

    def feed(self, message: bytes) -> None:
        self.feed_all((message,))

    def feed_all(self, messages: Iterable[bytes]) -> None:
        """Decode the messages in order. The common case (an insert, or an update that keeps its key, of a
        table keyed by its first column) takes a few steps on locals: it is most of a batch's messages."""
        rows, relations, value_kind, encoding = self.changes.rows, self.relations, self._value, self.encoding
        binary, fast = value_kind == _BINARY, 0
        for message in messages:
            kind = message[0]
            if (kind == _INSERT or (kind == _UPDATE and message[5] == _NEW)) and not self._skipping:
                relation = relations[_OID(message, 1)[0]]
                if relation.key_first and message[8] == value_kind:
                    # The key's value starts at byte 13 (kind, oid, 'N', column count, its kind, its size).
                    # A key seen before is replaced unless the change keeps a TOASTed value (a byte 'u',
                    # searched at C speed, may be one); `_feed` handles what this cannot.
                    end = 13 + _SIZE(message, 9)[0]
                    key = (message[13:end] if binary else message[13:end].decode(encoding),)
                    if kind == _INSERT or rows.get(key) is None or message.find(b"u", end) < 0:
                        rows[key] = _Lazy(message, 6, relation)  # type: ignore[assignment]
                        fast += 1
                        continue
            self._feed(message)
        self.changes.messages += fast

    def _feed(self, message: bytes) -> None:
        if (message[0] == _INSERT or (message[0] == _UPDATE and message[5] == _NEW)) and not self._skipping:
            relation = self.relations[_OID(message, 1)[0]]
            self.changes.messages += 1
            if self._defer(message[0] == _INSERT, message, 6, relation):
                return
            self.changes.messages -= 1  # counted again below
        kind = message[:1]
        if kind == b"B":
            final_lsn, _, _ = struct.unpack_from("!qqi", message, 1)
            self._skipping = final_lsn < self.skip_before
            if self._skipping:
                self.changes.skipped_transactions += 1
            return
        if kind == b"C":
            if not self._skipping:
                self.changes.transactions += 1
            self._skipping = False
            return
        if kind == b"R":
            self._relation(message)
            return
        if self._skipping or kind not in (b"I", b"U", b"D", b"T"):
            return  # types, origins and messages carry no rows
        if kind == b"T":
            self.changes.truncated = True
            self.changes.rows.clear()
            self.changes.messages += 1
            return
        relation = self.relations[struct.unpack_from("!I", message, 1)[0]]
        position = 5
        self.changes.messages += 1
        if kind == b"I":
            position += 1  # 'N'
            row, _ = self._tuple(message, position, relation)
            self._put(row, merge=False)
        elif kind == b"D":
            position += 1  # 'K' or 'O'
            old, _ = self._tuple(message, position, relation)
            self.changes.rows[self._key(old)] = None
        else:
            old = None
            if message[position:position + 1] in (b"K", b"O"):
                old, position = self._tuple(message, position + 1, relation)
            row, _ = self._tuple(message, position + 1, relation)
            new_key = self._key(row)
            if old is not None and self._key(old) != new_key:
                old_key = self._key(old)
                moved_from = self._decoded(self.changes.rows.get(old_key, KEEP))
                for column, value in enumerate(row):
                    if value is KEEP:
                        if isinstance(moved_from, list) and moved_from[column] is not KEEP:
                            row[column] = moved_from[column]
                        else:
                            assert self.lookup is not None, "a moved key needs the target's row"
                            row[column] = self.lookup(old_key, self.columns[column])
                self.changes.rows[old_key] = None
            self._put(row, merge=True)

    def _defer(self, insert: bool, message: bytes, position: int, relation: _Relation) -> bool:
        """Keep the row undecoded when that is exact: an insert, the first change of its key, or a
        change that carries every value. False: decode it now."""
        slots = relation.key_slots
        count = _COUNT(message, position)[0]
        at = position + 2
        values: list[Any] = [None] * len(self.key_positions)
        value_kind = self._value
        for slot in slots:
            kind = message[at]
            if kind == value_kind:
                size = _SIZE(message, at + 1)[0]
                if slot >= 0:
                    values[slot] = self._text(message[at + 5:at + 5 + size])
                at += 5 + size
            else:
                self._unexpected(kind)
                if kind == _UNCHANGED and slot >= 0:
                    return False  # a TOASTed key value: the full path handles it
                at += 1
        key = tuple(values)
        rows = self.changes.rows
        # No byte 'u' left in the message (searched at C speed): no unchanged-TOAST marker either.
        if not insert and rows.get(key) is not None and message.find(b"u", at) >= 0:
            for _ in range(count - len(slots)):  # an unchanged TOASTed value takes the earlier one's
                kind = message[at]
                if kind == value_kind:
                    at += 5 + _SIZE(message, at + 1)[0]
                elif kind == _UNCHANGED:
                    return False
                else:
                    self._unexpected(kind)
                    at += 1
        rows[key] = _Lazy(message, position, relation)  # type: ignore[assignment]
        return True

    def row(self, key: tuple[Any, ...]) -> list[Value] | None:
        """The key's row, decoded (and kept decoded, for a caller that changes its values); None if deleted."""
        row = self._decoded(self.changes.rows[key])
        self.changes.rows[key] = row
        return row  # type: ignore[no-any-return]

    def _decoded(self, row: Any) -> Any:
        return self._tuple(row.message, row.position, row.relation)[0] if isinstance(row, _Lazy) else row

    def _key(self, row: list[Value]) -> tuple[Any, ...]:
        return tuple(row[position] for position in self.key_positions)  # type: ignore[misc]

    def _put(self, row: list[Value], *, merge: bool) -> None:
        key = self._key(row)
        earlier = self._decoded(self.changes.rows.get(key))
        if merge and earlier is not None:
            row = [earlier[column] if value is KEEP else value for column, value in enumerate(row)]
        self.changes.rows[key] = row

    def _relation(self, message: bytes) -> None:
        oid = struct.unpack_from("!I", message, 1)[0]
        position = 5
        for _ in range(2):  # namespace, name
            position = message.index(b"\0", position) + 1
        position += 1  # replica identity
        count = struct.unpack_from("!h", message, position)[0]
        position += 2
        columns = []
        for _ in range(count):
            position += 1  # flags
            end = message.index(b"\0", position)
            column = message[position:end].decode()
            columns.append(column)
            expected = None if self.binary_types is None else self.binary_types.get(column)
            if expected is not None and _OID(message, end + 1)[0] != expected:
                raise NeedsText(f"the type of column {column} changed at the source since the slot's changes began")
            position = end + 1 + 8  # type oid, typmod
        targets = [self.index.get(column) for column in columns]
        slots = [self.key_positions.index(target) if target in self.key_positions else -1 for target in targets]
        while slots and slots[-1] < 0:
            slots.pop()
        uncovered = sorted(set(range(len(self.columns))) - set(targets))  # type: ignore[arg-type]
        in_order = targets == list(range(len(self.columns)))
        self.relations[oid] = _Relation(columns, targets, slots, uncovered, in_order,
                                        slots == [0] and len(self.key_positions) == 1)

    def stage_rows(self, generated: Collection[str], encoding: str, first: int = 1 << 62,
                   growth: int = 1, largest: int = 1 << 62) -> Iterator[StageChunk]:
        """The keys' changes as rows of the CDC stage in binary COPY format (the target's columns as text,
        or in their types for binary values; `_op`, `_keep`), in chunks of about `first` bytes, each chunk
        `growth` times the one before up to `largest`.

        `encoding`: the target session's client encoding. An undecoded row is copied from the message
        without decoding it: pgoutput's value (length, bytes) is already a binary COPY field, of a text
        column when both sessions use one client encoding, or of its type for a binary value.
        """
        width = len(self.columns)
        header = _FIELD_COUNT(width + 2)
        skipped = {self.index[name] for name in generated if name in self.index}
        raw = self._value == _BINARY or codecs.lookup(encoding).name == codecs.lookup(self.encoding).name
        value_kind, size, upsert_end = self._value, _SIZE, _UPSERT_FIELD + _EMPTY_FIELD
        chunk = StageChunk()
        data = chunk.data
        extend = data.extend
        limit, rows = first, 0
        # The deleted keys first, so every delete is applied before any upsert, as in one pass.
        deleted = [(row_key, _DELETED) for row_key, row in self.changes.rows.items() if row is None]
        upserted = ((row_key, row) for row_key, row in self.changes.rows.items() if row is not None)
        for row_key, row in itertools.chain(deleted, upserted):
            if len(data) >= limit:
                chunk.rows = rows
                yield chunk
                rows = 0
                limit = min(limit * growth, largest)
                chunk = StageChunk()
                data = chunk.data
                extend = data.extend
            rows += 1
            if raw and type(row) is _Lazy and row.relation.in_order:
                # The common case in few steps: every column sent, in the target's order.
                message, at, mark = row.message, row.position + 2, len(data)
                extend(header)
                for _ in range(width):
                    kind = message[at]
                    if kind == value_kind:
                        end = at + 5 + size(message, at + 1)[0]
                        extend(message[at + 1:end])
                        at = end
                    elif kind == _NULL:
                        extend(_NULL_FIELD)
                        at += 1
                    else:  # an unchanged TOASTed value: the general path below
                        del data[mark:]
                        break
                else:
                    extend(upsert_end)
                    continue
            row_data, keeps = self._stage_row(row_key, row, width, header, skipped, raw, encoding)
            extend(row_data)
            chunk.kept += keeps
            chunk.deletes += row is _DELETED
        chunk.rows = rows
        yield chunk

    def _stage_row(self, row_key: tuple[Any, ...], row: Any, width: int, header: bytes, skipped: set[int],
                   raw: bool, encoding: str) -> tuple[bytes, bool]:
        """One key's stage row in binary COPY format, and whether it keeps a value of the target's."""
        if row is _DELETED:
            fields = [_NULL_FIELD] * width
            for position, value in zip(self.key_positions, row_key, strict=True):
                fields[position] = self._field(value, encoding)
            return b"".join((header, *fields, _DELETE_FIELD, _EMPTY_FIELD)), False
        if isinstance(row, _Lazy) and raw:
            fields, kept = self._raw_fields(row, width)
        else:
            values = self._decoded(row)
            fields = [_NULL_FIELD if value is None or value is KEEP else self._field(value, encoding)
                      for value in values]
            kept = [position for position, value in enumerate(values) if value is KEEP]
        kept = [position for position in kept if position not in skipped]
        if kept:
            flags = ["0"] * width
            for position in kept:
                flags[position] = "1"
            return b"".join((header, *fields, _UPSERT_FIELD, _text_field("".join(flags), encoding))), True
        return b"".join((header, *fields, _UPSERT_FIELD, _EMPTY_FIELD)), False

    def _raw_fields(self, row: _Lazy, width: int) -> tuple[list[bytes], list[int]]:
        """The binary COPY fields of an undecoded row, and the target columns it keeps (unchanged or not sent)."""
        message, relation, at = row.message, row.relation, row.position + 2
        size = _SIZE
        value_kind = self._value
        kept = relation.uncovered
        if relation.in_order:  # the common case in few steps: the relation's columns are the target's
            fields: list[bytes] = []
            append = fields.append
            for _ in range(_COUNT(message, row.position)[0]):
                kind = message[at]
                if kind == value_kind:
                    end = at + 5 + size(message, at + 1)[0]
                    append(message[at + 1:end])
                    at = end
                else:
                    self._unexpected(kind)
                    if kind == _UNCHANGED:
                        kept = [*kept, len(fields)]
                    append(_NULL_FIELD)
                    at += 1
            return fields, kept
        targets = relation.targets
        fields = [_NULL_FIELD] * width
        for column in range(_COUNT(message, row.position)[0]):
            kind = message[at]
            target = targets[column] if column < len(targets) else None
            if kind == value_kind:
                end = at + 5 + size(message, at + 1)[0]
                if target is not None:
                    fields[target] = message[at + 1:end]
                at = end
            else:
                self._unexpected(kind)
                if kind == _UNCHANGED and target is not None:
                    kept = [*kept, target]
                at += 1
        return fields, kept

    def _tuple(self, message: bytes, position: int, relation: _Relation) -> tuple[list[Value], int]:
        """A TupleData as the target's columns: columns the change lacks are KEEP (the target keeps them)."""
        count = _COUNT(message, position)[0]
        position += 2
        row: list[Value] = [KEEP] * len(self.columns)
        targets = relation.targets
        value_kind = self._value
        for column in range(count):
            kind = message[position]
            target = targets[column] if column < len(targets) else None
            if kind == value_kind:
                size = _SIZE(message, position + 1)[0]
                position += 5
                if target is not None:
                    row[target] = self._text(message[position:position + size])
                position += size
            else:
                self._unexpected(kind)
                position += 1
                if kind == _NULL and target is not None:
                    row[target] = None
        return row, position


# --- the strategy ---------------------------------------------------------------------------------

@dataclass
class _Slot:
    name: str
    state_lsn: str | None


def attempt_cdc(run: TableRun) -> None:
    """One attempt of a CDC run, filling `run.report`: a full copy from the slot's start, or the changes since."""
    table, report = run.table, run.report
    with run.connected():
        ensure_state_tables(run.tgt)
        with run.locked():
            name = replication_name(run.names.target_text, run.tgt.info.dbname)
            stored = read_watermark(run.tgt, run.names.target_text, cdc=True)
            run.tgt.commit()
            report.watermark_before = stored
            # Under the lock, so that the position read cannot be older than the stored one. The values' format
            # is guessed before the source is described: binary where the servers allow it (`_binary_types`).
            reader = None if stored is None else _SlotReader(run, name, stored, binary=_may_read_binary(run))
            try:
                shape = run.describe(key_for="mode cdc")
                reason = None if stored is None else _why_full_copy(run, name, stored, shape)
                if reader is None or reason is not None:
                    if reader is not None:
                        reader.stop()  # it holds the slot, which the full copy drops
                    if reason:
                        logger.warning("%s: %s", table.name, reason)
                        report.notes.append(reason)
                    _full_copy(run, name)
                else:
                    _apply_changes(run, name, stored, reader)
            finally:
                if reader is not None:
                    reader.stop()
            _measure_slot(run, name)


def _measure_slot(run: TableRun, name: str) -> None:
    """What the slot costs the source as this run leaves it: WAL kept for it, and WAL not yet confirmed."""
    with run.src.transaction(force_rollback=True):
        row = run.src.execute(
            "select pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, "
            "pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint "
            "from pg_replication_slots where slot_name = %s", (name,)).fetchone()
    if row is not None:
        run.report.slot_retained_wal_bytes, run.report.slot_lag_bytes = int(row[0]), int(row[1])
        logger.info("%s: slot %s keeps %.1f MB of WAL on the source, %.1f MB not yet confirmed", run.table.name,
                    name, row[0] / 1e6, row[1] / 1e6)


def _slot_row(src: psycopg.Connection, name: str) -> dict[str, Any] | None:
    with src.transaction(force_rollback=True):
        row = src.execute("select to_jsonb(s) from pg_replication_slots as s where slot_name = %s",
                          (name,)).fetchone()
    return None if row is None else dict(row[0])


def _why_full_copy(run: TableRun, name: str, stored: str, shape: Shape) -> str | None:
    """Why the stored position cannot be continued from (the slot is gone, lost, …), or None when it can."""
    slot = _slot_row(run.src, name)
    if slot is None:
        return (f"the replication slot {name} no longer exists on the source (dropped); the changes since "
                f"{stored} are gone, so the table is copied in full again")
    reason = slot.get("invalidation_reason") or ("wal_removed" if slot.get("wal_status") == "lost" else None)
    if reason or slot.get("conflicting"):
        return (f"the replication slot {name} was invalidated on the source ({reason or 'conflict'}: the server "
                f"removed WAL the slot had not read, see max_slot_wal_keep_size); the changes since {stored} are "
                "gone, so the table is copied in full again")
    confirmed = slot.get("confirmed_flush_lsn")
    if confirmed and lsn_int(confirmed) > lsn_int(stored):
        return (f"the replication slot {name} was advanced past the stored position ({confirmed} > {stored}) "
                "outside this engine; the table is copied in full again")
    with run.src.transaction(force_rollback=True):
        published = run.src.execute(
            "select exists (select from pg_publication_tables where pubname = %s and schemaname = %s "
            "and tablename = %s)", (name, *run.table.source_schema_table)).fetchone()
    if not (published and published[0]):
        return (f"the publication {name} no longer publishes {run.table.source}; the table is copied in full "
                "again")
    target_columns = _target_columns(run)
    added = [column for column in shape.names if column not in target_columns]
    if target_columns and added:
        return (f"the source has new column(s) {', '.join(added)}, whose values the changes do not carry for "
                "unchanged rows; the table is copied in full again")
    if not target_columns:
        return f"the target table {run.names.target_text} is gone; the table is copied in full again"
    return None


def _target_columns(run: TableRun) -> set[str]:
    schema_name, relation = run.table.target_schema_table
    with run.tgt.transaction(force_rollback=True):
        # pg_attribute, not information_schema.columns: the same names at a fraction of the cost.
        rows = run.tgt.execute("select attname from pg_attribute where attrelid = to_regclass(%s) and attnum > 0 "
                               "and not attisdropped", (sql.Identifier(schema_name, relation).as_string(run.tgt),)
                               ).fetchall()
    return {str(row[0]) for row in rows}


def _ensure_publication(run: TableRun, name: str) -> None:
    """The table's publication, created if missing; one made beforehand by the table's owner is used as is."""
    src = run.src
    schema_name, relation = run.table.source_schema_table
    with src.transaction():
        row = src.execute(
            "select exists (select from pg_publication where pubname = %(name)s), exists (select from "
            "pg_publication_tables where pubname = %(name)s and schemaname = %(schema)s and tablename = %(table)s)",
            {"name": name, "schema": schema_name, "table": relation}).fetchone()
        exists, publishes = row if row else (False, False)
        if not exists:
            src.execute(sql.SQL("create publication {} for table {}").format(
                sql.Identifier(name), sql.Identifier(schema_name, relation)))
        elif not publishes:
            src.execute(sql.SQL("alter publication {} add table {}").format(
                sql.Identifier(name), sql.Identifier(schema_name, relation)))


def _drop_slot(src: psycopg.Connection, name: str) -> None:
    with src.transaction():
        src.execute("select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = %s",
                    (name,))


@dataclass
class _ExportedSlot:
    connection: psycopg.Connection
    start: str
    snapshot: str


def _create_slot(run: TableRun, name: str) -> _ExportedSlot:
    """Create the slot on a replication connection; its exported snapshot lives while the connection idles."""
    conn = psycopg.connect(run.source_dsn, replication="database", autocommit=True, connect_timeout=10,
                           application_name="copy_engine_cdc")
    try:
        # The old keyword form: servers from PostgreSQL 10 on take it.
        command = sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT").format(sql.Identifier(name))
        result = conn.pgconn.exec_(command.as_bytes(conn))
        if result.status != psycopg.pq.ExecStatus.TUPLES_OK:
            raise psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
        start = (result.get_value(0, 1) or b"").decode()
        snapshot = (result.get_value(0, 2) or b"").decode()
    except BaseException:
        conn.close()
        raise
    return _ExportedSlot(conn, start, snapshot)


def _full_copy(run: TableRun, name: str) -> None:
    """Create the publication and a new slot, then copy the table from the slot's exported snapshot."""
    table, report = run.table, run.report
    check_requirements(run, name)
    run.create_types()
    _ensure_publication(run, name)
    wait_until_slot_free(run.src, name, run.table)
    _drop_slot(run.src, name)
    run.src.rollback()
    run.tgt.rollback()  # a slot's creation waits for every open transaction that wrote, ours too
    exported = _create_slot(run, name)
    try:
        logger.info("%s: created replication slot %s at %s; copying the table in full from its snapshot",
                    table.name, name, exported.start)
        import_snapshot(run.src, exported.snapshot)
        with run.data_transaction():
            run.prepare_target(need_key=True)
            run.load_full(key_changes)
            report.watermark_after = exported.start
            write_state(run.tgt, report, None, replication_slot=name)
            run.record_committed()
        logger.info("%s: committed %d row(s) into %s", table.name, report.rows_read, run.names.target_text)
        if run.validate:
            report.validation = run.validate_in_snapshot()
        run.src.rollback()
    finally:
        exported.connection.close()


def read_changes(src: psycopg.Connection, name: str, upto: str, *, binary: bool = False) -> Iterator[list[bytes]]:
    """The slot's pgoutput messages of transactions that commit before `upto`, in batches, without consuming them.

    `binary`: values in their types' binary send format (pgoutput's `binary` option, PostgreSQL 14+).
    """
    with src.transaction(force_rollback=True), \
            src.cursor(name="copy_engine_cdc_changes", row_factory=scalar_row) as cursor:
        # The option only when wanted: pgoutput before PostgreSQL 14 refuses it.
        cursor.execute(sql.SQL(
            "select data from pg_logical_slot_peek_binary_changes(%s, %s::pg_lsn, null, 'proto_version', '1', "
            "'publication_names', %s{})").format(sql.SQL(", 'binary', 'true'") if binary else sql.SQL("")),
            (name, upto, name), binary=True)
        while batch := cursor.fetchmany(_READ_BATCH):
            yield batch


class _SlotReader(threading.Thread):
    """Reads the slot's changes up to the source's flushed position on a source connection of its own, into
    a queue of message batches, with values in binary or text format (`binary`).

    Started as soon as the run holds its lock: it connects, takes the position and reads while the run
    describes the table and checks the slot. The source sends the first message only after decoding them
    all; meanwhile the run prepares the target.
    """

    def __init__(self, run: TableRun, name: str, stored: str, upto: str | None = None, *, binary: bool) -> None:
        super().__init__(name="copy_engine_cdc_read", daemon=True)
        self.table_run, self.slot, self.stored = run, name, stored
        self.upto = upto  # set before the first batch is queued
        self.binary = binary
        # Batches, then None at the end or what the read raised; a few at most, so memory follows the decoder.
        self.batches: queue.Queue[list[bytes] | BaseException | None] = queue.Queue(maxsize=4)
        self._stopped = threading.Event()
        self._connection: psycopg.Connection | None = None
        self.start()

    def run(self) -> None:
        outcome: BaseException | None = None
        try:
            run = self.table_run
            with connect(run.source_dsn, role="source", table=run.table.name) as src:
                self._connection = src
                if self.upto is None:
                    wait_until_slot_free(src, self.slot, run.table, self._stopped)
                    flush_source_wal(src)
                    row = src.execute("select pg_current_wal_flush_lsn()::text").fetchone()
                    src.commit()
                    assert row is not None
                    # The flushed position, not the inserted one: decoding reads only flushed WAL, and a
                    # transaction committed asynchronously before `upto` must not be left behind a position
                    # stored as applied.
                    self.upto = max(row[0], self.stored, key=lsn_int)
                if not self._stopped.is_set():
                    for batch in read_changes(src, self.slot, self.upto, binary=self.binary):
                        if self._stopped.is_set():
                            break
                        self.batches.put(batch)
        except BaseException as error:  # noqa: BLE001 (raised in the run's thread by messages())
            outcome = error
        finally:
            self._connection = None
            if not self._stopped.is_set():
                self.batches.put(outcome)

    def messages(self) -> Iterator[list[bytes]]:
        """The batches of messages in the slot's order; raises what the read raised."""
        while (item := self.batches.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    def stop(self) -> None:
        """End the read (its query cancelled) and wait for the thread; what it read or raised is dropped."""
        self._stopped.set()
        connection = self._connection
        if connection is not None:
            with contextlib.suppress(psycopg.Error):
                connection.cancel_safe(timeout=10)
        while self.is_alive():
            with contextlib.suppress(queue.Empty):
                self.batches.get(timeout=0.05)  # a full queue would keep the thread waiting
        self.join()


def wait_until_slot_free(src: psycopg.Connection, name: str, table: TableConfig,
                         stopped: threading.Event | None = None) -> None:
    """Wait (up to `lock_wait_s`, or until `stopped`) while another session uses the slot, such as the backend
    of a killed run that has not noticed its client is gone; then fail transiently."""
    def free() -> bool | None:
        with src.transaction(force_rollback=True):
            row = src.execute("select active_pid from pg_replication_slots where slot_name = %s",
                              (name,)).fetchone()
        return True if row is None or row[0] is None or (stopped and stopped.is_set()) else None

    if wait_for(free, timeout_s=table.lock_wait_s, poll_s=0.2) is None:
        raise TransientError(f"the replication slot {name} is in use by another session on the source; "
                             "the run will be retried", table=table.name)


def _apply_changes(run: TableRun, name: str, stored: str, reader: _SlotReader) -> None:
    binary_types = _binary_types(run)
    try:
        if reader.binary and binary_types is None:
            raise NeedsText("a column's values cannot travel in binary format")  # the reader's guess was wrong
        _read_and_write(run, name, stored, reader, binary_types)
    except NeedsText as why:
        if not reader.binary:
            raise
        logger.info("%s: %s; reading the changes again with text values", run.table.name, why)
        reader.stop()
        reader = _SlotReader(run, name, stored, reader.upto, binary=False)
        try:
            _read_and_write(run, name, stored, reader, None)
        finally:
            reader.stop()
    _applied(run, name)


def _applied(run: TableRun, name: str) -> None:
    """After the target's commit: the slot told the position applied."""
    table, report = run.table, run.report
    upto = report.watermark_after
    assert upto is not None
    logger.info("%s: applied up to %s (inserted %d, updated %d, deleted %d)", table.name, upto,
                report.rows_inserted, report.rows_updated, report.rows_deleted)
    confirm_position(run.src, name, upto)
    if run.validate:
        # No source snapshot matches the applied position: the summary says "not validated", not "off".
        report.validation = ValidationResult(match=None)


def _binary_types(run: TableRun) -> dict[str, int] | None:
    """Each column's type oid at the source when the changes can be read with binary values, else None.

    Binary values are the types' send format, which is a binary COPY field of the same type: the stage
    takes them in the source's types and the apply parses no text. They need PostgreSQL 14, columns that
    binary COPY carries exactly (the type catalog of the full and incremental copies: no extension or
    object-identifier type, no composite, no array of a user type), no domain (the stage would check its
    constraints on a delete's empty columns), and one client encoding on both sides (a text value's
    send format is in the client encoding).
    """
    shape, src = run.shape, run.src
    if not _may_read_binary(run) or not all(column.binary_safe for column in shape.columns):
        return None
    with src.transaction(force_rollback=True):
        row = src.execute("select exists (select from pg_type where oid = any(%s) and typtype = 'd')",
                          ([column.type_oid for column in shape.columns],)).fetchone()
    if row is None or row[0]:
        return None
    return {column.name: column.type_oid for column in shape.columns}


def _may_read_binary(run: TableRun) -> bool:
    """What `_binary_types` needs of the servers, before the source's columns are known."""
    same_encoding = codecs.lookup(run.src.info.encoding).name == codecs.lookup(run.tgt.info.encoding).name
    return run.src.info.server_version >= 140000 and same_encoding


def _read_and_write(run: TableRun, name: str, stored: str, reader: _SlotReader,
                    binary_types: dict[str, int] | None) -> None:
    """Read the slot's changes (by `reader`), coalesce them per key, and apply them with the position in one
    target transaction. Raises NeedsText, having written nothing, when binary values cannot carry them."""
    table, report, src, shape = run.table, run.report, run.src, run.shape
    assert reader.binary == (binary_types is not None)
    lookup = _target_value if binary_types is None else _target_binary_value
    decoder = PgOutputDecoder(shape.names, shape.primary_key, lsn_int(stored), lookup=lambda key, column:
                              lookup(run, key, column), encoding=src.info.encoding, binary_types=binary_types)
    generated = _generated_expressions(run) if any(column.generated for column in shape.columns) else {}
    run.tgt.rollback()
    with run.data_transaction():
        # The target's side is prepared while the source decodes the slot, which sends nothing before it is done.
        _prepare_stage(run, binary=binary_types is not None)
        started, count = time.monotonic(), 0
        for batch in reader.messages():
            decoder.feed_all(batch)
            if (count + len(batch)) // PROGRESS_EVERY > count // PROGRESS_EVERY:
                logger.info("%s: decoded %d change message(s), %d key(s) so far (%.0f/s)", table.name,
                            count + len(batch), len(decoder.changes.rows),
                            (count + len(batch)) / (time.monotonic() - started))
            count += len(batch)
        changes, upto = decoder.changes, reader.upto
        assert upto is not None
        report.rows_read = changes.messages
        logger.info("%s: %d change(s) in %d transaction(s) (%d already applied) up to %s: %d key(s) to write%s",
                    table.name, changes.messages, changes.transactions, changes.skipped_transactions, upto,
                    len(changes.rows), " (binary values)" if binary_types is not None else "")
        if any(column.facts.read_cast for column in shape.columns):
            _restore_stored_text(run, decoder)
        _write(run, decoder, generated)
        report.watermark_after = upto
        write_state(run.tgt, report, None, replication_slot=name)
        run.record_committed()


def _restore_stored_text(run: TableRun, decoder: PgOutputDecoder) -> None:
    """Give the written rows' xml values (and arrays, domains of xml) the text the source stores.

    pgoutput sends a value by its type's output function, which for xml drops a default declaration
    (`<?xml version="1.0"?>`) that the table copies keep by reading the column through its cast to text
    (`TypeFacts.read_cast`). So the source's current rows of the written keys are read: where the output of
    a value is the text the change carried, the source holds that document still, and its stored text replaces
    the change's. A value changed since keeps the change's text; the run that reads that change restores it.
    """
    shape, src = run.shape, run.src
    key = list(shape.primary_key)
    columns = [column for column in shape.columns if column.facts.read_cast]
    keys = [row_key for row_key, row in decoder.changes.rows.items() if row is not None]
    names = [sql.Identifier(f"_key{number}") for number in range(len(key))]
    query = sql.SQL("select {}, {} from {} as s join unnest({}) as u({}) on {}").format(
        column_list(key, "s"),
        sql.SQL(", ").join(sql.SQL("s.{0}, s.{0}::{1}").format(sql.Identifier(column.name),
                                                               sql.SQL(column.facts.read_cast))  # type: ignore[arg-type]
                           for column in columns),
        sql.Identifier(*run.table.source_schema_table),
        sql.SQL(", ").join(sql.SQL("%s::text[]") for _ in key), sql.SQL(", ").join(names),
        sql.SQL(" and ").join(sql.SQL("s.{} = u.{}::{}").format(
            sql.Identifier(name), alias, sql.SQL(shape.column(name).type_sql))  # type: ignore[union-attr]
            for name, alias in zip(key, names, strict=True)))
    positions = [decoder.index[column.name] for column in columns]
    for start in range(0, len(keys), _READ_BATCH):
        batch = keys[start:start + _READ_BATCH]
        with src.transaction(force_rollback=True):
            result = src.execute(query, [list(values) for values in zip(*batch, strict=True)]).pgresult
        assert result is not None
        for number in range(result.ntuples):
            # The values as text, as pgoutput sends them: the raw result, past psycopg's loaders.
            text = [None if value is None else bytes(value).decode(decoder.encoding)
                    for value in (result.get_value(number, field) for field in range(result.nfields))]
            row_key = tuple(text[:len(key)])
            if row_key not in decoder.changes.rows:
                continue
            row = decoder.row(row_key)
            assert row is not None
            for position, output, stored in zip(positions, text[len(key)::2], text[len(key) + 1::2], strict=True):
                if row[position] == output:
                    row[position] = stored


def flush_source_wal(src: psycopg.Connection) -> None:
    """Make the source flush its WAL up to a record's end before the run reads its flushed position.

    A quiet server's WAL writer flushes whole pages only, so the flushed position can fall inside a
    record that nothing has committed yet (a page image a read wrote when it set hint bits). Decoding
    up to that position then waits for the rest of the record until some later commit flushes it:
    7-22 s per run on a quiet source in the bench. A committed transactional message (no table, not
    sent by pgoutput) flushes everything before it.
    """
    try:
        with src.transaction():
            src.execute("set local synchronous_commit = on")
            src.execute("select pg_logical_emit_message(true, 'copy_engine', '')")
    except psycopg.Error as error:  # a read-only source, or a role without the function: read as before
        logger.info("could not flush the source's WAL before reading the slot (%s)",
                    (str(error).splitlines() or [""])[0])


def confirm_position(src: psycopg.Connection, name: str, lsn: str) -> None:
    """Tell the slot the changes before `lsn` are applied, so the source may recycle their WAL.

    Runs after the target's commit; if it never happens, the next run reads them again and skips them.
    """
    try:
        with src.transaction():
            src.execute("select pg_replication_slot_advance(%s, %s::pg_lsn)", (name, lsn))
    except psycopg.Error as error:
        logger.warning("could not advance the replication slot %s to %s (%s); the next run skips what this one "
                       "applied", name, lsn, (str(error).splitlines() or [""])[0])


def _target_value(run: TableRun, key: tuple[str | None, ...], column: str) -> str | None:
    shape = run.shape
    match = sql.SQL(" and ").join(
        sql.SQL("{} = %s::{}").format(sql.Identifier(name), sql.SQL(shape.column(name).type_sql))  # type: ignore[union-attr]
        for name in shape.primary_key)
    row = run.tgt.execute(sql.SQL("select {}::text from {} where {}").format(
        sql.Identifier(column), run.names.target, match), key).fetchone()
    if row is None:
        raise TerminalError(f"an update moved key {list(key)} and left {column} unchanged, but the target has no row "
                            "for that key; it was changed outside the engine: drop the target table to copy it again",
                            table=run.table.name)
    return None if row[0] is None else str(row[0])


class _SendFormat(bytes):
    """A value in its type's binary send format, passed to the server as a binary parameter."""


class _SendFormatDumper(Dumper):
    format = Format.BINARY

    def dump(self, obj: Any) -> bytes:
        return bytes(obj)


def _target_binary_value(run: TableRun, key: tuple[bytes | None, ...], column: str) -> bytes | None:
    """`_target_value` for binary values: the key and the value travel in their types' send format."""
    shape = run.shape

    def type_sql(name: str) -> sql.Composable:
        return sql.SQL(shape.column(name).type_sql)  # type: ignore[union-attr]

    match = sql.SQL(" and ").join(sql.SQL("{} = %s::{}").format(sql.Identifier(name), type_sql(name))
                                  for name in shape.primary_key)
    cursor = run.tgt.cursor(binary=True)
    cursor.adapters.register_dumper(_SendFormat, _SendFormatDumper)
    cursor.execute(sql.SQL("select {}::{} from {} where {}").format(
        sql.Identifier(column), type_sql(column), run.names.target, match),
        [None if value is None else _SendFormat(value) for value in key])
    result = cursor.pgresult
    if result is None or result.ntuples == 0:
        raise TerminalError(f"an update moved key {list(key)} and left {column} unchanged, but the target has no row "
                            "for that key; it was changed outside the engine: drop the target table to copy it again",
                            table=run.table.name)
    value = result.get_value(0, 0)
    return None if value is None else bytes(value)


def _generated_expressions(run: TableRun) -> dict[str, str]:
    """The source's generated columns and their expressions: pgoutput sends none of their values."""
    src = run.src
    with src.transaction(force_rollback=True):
        rows = src.execute(
            "select a.attname, pg_get_expr(d.adbin, d.adrelid) from pg_attribute as a join pg_attrdef as d "
            "on d.adrelid = a.attrelid and d.adnum = a.attnum where a.attrelid = %s::regclass "
            "and a.attgenerated <> '' order by a.attnum", (run.names.base().as_string(src),)).fetchall()
    return {str(name): str(expression) for name, expression in rows}


def _compute_generated(run: TableRun, generated: dict[str, str], stage: sql.Composable,
                       typed: Callable[[str], sql.Composable]) -> None:
    """Set the generated columns of the inserted and updated rows by the source's expressions, which
    read the row's other columns: the target holds them as plain columns."""
    shape, key = run.shape, list(run.shape.primary_key)

    def value(name: str) -> sql.Composable:
        return sql.SQL("({})::{}").format(sql.SQL(generated[name]), sql.SQL(shape.column(name).type_sql))  # type: ignore[union-attr]

    names = [name for name in generated if shape.column(name) is not None]
    if not names:
        return
    try:
        with run.tgt.transaction():  # a savepoint: a failing expression is named below
            run.tgt.execute(sql.SQL("update {} set {} where ({}) in (select {} from {} as s where s._op = 'u') "
                                    "and ({})").format(
                run.names.target,
                sql.SQL(", ").join(sql.SQL("{} = {}").format(sql.Identifier(name), value(name)) for name in names),
                column_list(key), sql.SQL(", ").join(typed(name) for name in key), stage,
                sql.SQL(" or ").join(sql.SQL("{} is distinct from {}").format(sql.Identifier(name), value(name))
                                     for name in names)))
    except psycopg.Error as error:
        raise TerminalError(
            f"the generated column(s) {', '.join(names)} could not be computed in the warehouse by the source's "
            f"expressions ({(str(error).splitlines() or [''])[0]}): create the functions they call in the "
            "warehouse, or sync the table with mode full or incremental", table=run.table.name) from error


def _prepare_stage(run: TableRun, *, binary: bool) -> None:
    """In the data transaction: the target brought in line with the source, the lock timeout, and the empty
    stage. Its columns take binary values in the source's types; text values as text, cast by the apply.

    Runs while the slot is read, so a schema change's lock (a widened column) is held during the read too."""
    shape = run.shape
    # The transaction idles while the source decodes the slot and the engine the messages: a warehouse's
    # idle_in_transaction_session_timeout must not end it (a large backlog is read for minutes).
    run.tgt.execute("select set_config('idle_in_transaction_session_timeout', '0', true)")
    run.prepare_target(need_key=True)
    run.set_lock_timeout()

    def stage_type(name: str) -> sql.Composable:
        return sql.SQL(shape.column(name).type_sql) if binary else sql.SQL("text")  # type: ignore[union-attr]

    # `_keep`: per column, 1 where the change left a TOASTed value unchanged; empty when it carries every value.
    run.tgt.execute(sql.SQL("create temporary table {} ({}, _op text not null, _keep text not null) on commit drop")
                    .format(sql.Identifier(_STAGE), sql.SQL(", ").join(
                        sql.SQL("{} {}").format(sql.Identifier(c), stage_type(c)) for c in shape.names)))


def _write(run: TableRun, decoder: PgOutputDecoder, generated: dict[str, str] | None = None) -> None:
    """Apply the coalesced changes: deletes, then an upsert of the rows that carry every value, then
    updates of the rows that keep a TOASTed value of the target's; then the generated columns of the
    rows written. Each statement reaches the target's rows through its key index.

    The stage is filled and applied in chunks, each `_CHUNK_GROWTH` times the size of the one before, the
    deleted keys first (so every delete precedes every upsert): while the warehouse applies a chunk (its
    statements sent in pipeline mode), the engine builds the next chunk's rows. A key is in one chunk only,
    so the counts are those of a single pass."""
    generated = generated or {}
    report, tgt, shape, changes = run.report, run.tgt, run.shape, decoder.changes
    target = run.names.target
    if changes.truncated:
        cursor = tgt.execute(sql.SQL("delete from {}").format(target))
        report.rows_deleted += max(cursor.rowcount, 0)
    if not changes.rows:
        return
    columns, key = shape.names, list(shape.primary_key)
    stage = sql.Identifier(_STAGE)
    binary = decoder.binary_types is not None

    def typed(name: str) -> sql.Composable:
        if binary:
            return sql.SQL("s.{}").format(sql.Identifier(name))
        return sql.SQL("s.{}::{}").format(sql.Identifier(name), sql.SQL(shape.column(name).type_sql))  # type: ignore[union-attr]

    match = sql.SQL(" and ").join(sql.SQL("t.{} = {}").format(sql.Identifier(name), typed(name)) for name in key)
    delete = sql.SQL("delete from {} as t using {} as s where s._op = 'd' and {}").format(target, stage, match)
    # In key order, as the cursor run's upsert (its `distinct on`): the target's key index and its rows, loaded
    # in key order, are then visited in order rather than in the order of the source's changes.
    upsert = run.upsert_query(sql.SQL("select {} from {} as s where s._op = 'u' and s._keep = '' order by {}").format(
        sql.SQL(", ").join(typed(name) for name in columns), stage, sql.SQL(", ").join(typed(name) for name in key)),
        computed=generated)
    chunks = decoder.stage_rows(generated, tgt.info.encoding, _FIRST_CHUNK, _CHUNK_GROWTH, _LARGEST_CHUNK)
    chunk: StageChunk | None = next(chunks)
    first = True
    while chunk is not None:
        if not first:
            tgt.execute(sql.SQL("truncate {}").format(stage))
        first = False
        with tgt.cursor().copy(sql.SQL("copy {} from stdin (format binary)").format(stage)) as copy:
            copy.write(_COPY_SIGNATURE)
            copy.write(chunk.data)
            copy.write(_COPY_TRAILER)
        if chunk.rows > _ANALYZE_STAGE_FROM:
            tgt.execute(sql.SQL("analyze {}").format(stage))
        deleting, upserting = tgt.cursor(), tgt.cursor()
        # Pipeline mode needs libpq 14+ (psycopg[binary] ships its own); without it the statements run
        # one after the other and the next chunk is built after them.
        with tgt.pipeline() if psycopg.Pipeline.is_supported() else contextlib.nullcontext():
            if chunk.deletes:
                deleting.execute(delete)
            if chunk.rows > chunk.deletes + chunk.kept:
                upserting.execute(upsert)
            following = next(chunks, None)  # built while the warehouse applies this chunk
        if chunk.deletes:
            report.rows_deleted += max(deleting.rowcount, 0)
        if chunk.rows > chunk.deletes + chunk.kept:
            row = upserting.fetchone()
            assert row is not None
            report.rows_inserted += int(row[0])
            report.rows_updated += int(row[1])
        if chunk.kept:
            _write_kept(run, stage, typed, match, generated)
        if generated and chunk.rows > chunk.deletes:
            _compute_generated(run, generated, stage, typed)
        chunk = following


def _write_kept(run: TableRun, stage: sql.Identifier, typed: Callable[[str], sql.Composable], match: sql.Composable,
                generated: dict[str, str]) -> None:
    """Update the rows whose change left a TOASTed value unchanged: the target keeps its own value."""
    report, tgt, shape, plan = run.report, run.tgt, run.shape, run.plan
    columns, key = shape.names, list(shape.primary_key)
    lacking = tgt.execute(sql.SQL("select {} from {} as s where s._keep <> '' and not exists "
                                  "(select from {} as t where {}) limit 1").format(
        column_list(key, "s"), stage, run.names.target, match)).fetchone()
    if lacking is not None:
        raise TerminalError(f"an update of key {list(lacking)} left a TOASTed value unchanged, but the target has no "
                            "row for that key; it was changed outside the engine: drop the target table to copy it "
                            "again", table=run.table.name)
    values = [name for name in columns if name not in key and name not in generated]
    kept = {name: sql.SQL("substr(s._keep, {}, 1) = '1'").format(sql.Literal(columns.index(name) + 1))
            for name in values}
    setters = [sql.SQL("{0} = case when {1} then t.{0} else {2} end").format(sql.Identifier(name), kept[name],
                                                                             typed(name)) for name in values]
    setters += [sql.SQL("{} = null").format(sql.Identifier(name)) for name in plan.extra_columns]
    changed = [sql.SQL("(not {1} and t.{0}::text is distinct from ({2})::text)").format(
        sql.Identifier(name), kept[name], typed(name)) for name in values]
    changed += [sql.SQL("t.{} is not null").format(sql.Identifier(name)) for name in plan.extra_columns]
    if setters and changed:
        updated = tgt.execute(sql.SQL("update {} as t set {} from {} as s where s._keep <> '' and {} and ({})").format(
            run.names.target, sql.SQL(", ").join(setters), stage, match, sql.SQL(" or ").join(changed)))
        report.rows_updated += max(updated.rowcount, 0)


# --- removing what a table taken out of the configuration left on the source ---------------------

def drop_replication(source_dsn: str, target_dsn: str, configured_targets: Iterable[str], *,
                     dry_run: bool = False) -> list[str]:
    """Drop the slot and publication of every CDC table this warehouse synced that is no longer configured.

    Returns what it dropped (or would drop); forgets the table's stored CDC position, so adding the
    table back with mode cdc starts with a full copy.
    """
    keep = set(configured_targets)
    done: list[str] = []
    with psycopg.connect(target_dsn, connect_timeout=10) as tgt, \
            psycopg.connect(source_dsn, connect_timeout=10, autocommit=True) as src:
        ensure_state_tables(tgt)
        for target_table, source, name in read_cdc_states(tgt):
            if target_table in keep:
                continue
            done.append(f"{target_table} (source {source}): slot and publication {name}")
            if dry_run:
                continue
            src.execute("select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = %s",
                        (name,))
            src.execute(sql.SQL("drop publication if exists {}").format(sql.Identifier(name)))
            with tgt.transaction():
                forget_replication(tgt, target_table)
            logger.info("dropped the replication slot and publication %s of %s", name, target_table)
    return done
