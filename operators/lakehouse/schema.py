"""Whether a job's results schema fits its Iceberg table, and the table a first commit creates.

Iceberg's own rules decide (the spec's "Schema Evolution"): a column the table lacks is added as
optional (earlier rows read null); an ``int``/``float`` column may widen to ``long``/``double``;
a required column may become optional. Any other change (``string`` to ``int``, a nested type
that differs, a required column the job does not write, another key) is refused, naming the
column, before any work. A new table is partitioned by ``bucket(BUCKETS, <first key column>)``
and sorted by its key (what a compaction that sorts, Spark's ``rewrite_data_files``, follows).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from vbatch.operators.lakehouse.catalog import (
    IcebergError,
    IcebergTarget,
    load_catalog,
    load_table,
)
from vbatch.operators.lakehouse.keys import TableKey, as_key

if TYPE_CHECKING:
    from pyiceberg.schema import Schema as IcebergSchema

logger = logging.getLogger(__name__)

#: table properties: the key the table is upserted by (comma-separated columns)
KEY_PROPERTY = "vbatch.key"
REPLACE_PROPERTY = "vbatch.replace-key"

#: buckets of the first key column. An upsert rewrites the files holding its keys, and a nightly
#: run spread over the catalog hits every file whatever the layout; buckets keep files bounded
#: (a million image rows of ~300 B: ~20 MB a bucket), let a point lookup (``image_id = …``) read
#: 1/16 of the table and a small run rewrite only its keys' buckets, and let commits rewrite them
#: in parallel. A partition by run date prunes neither: an upsert replaces rows of any date.
BUCKETS = 16


def iceberg_type(name: str, typ: pa.DataType) -> Any:
    """The Iceberg type of a column; :class:`IcebergError` naming it when there is none."""
    from pyiceberg.io.pyarrow import _pyarrow_to_schema_without_ids

    try:
        return _pyarrow_to_schema_without_ids(pa.schema([pa.field(name, typ)])).fields[0].field_type
    except (ValueError, TypeError) as e:
        raise IcebergError(f"column {name!r} ({typ}) has no Iceberg type: {e}") from e


def _same_shape(ours: Any, theirs: Any) -> bool:
    """Identical types, field ids aside (nested columns are written only unchanged)."""
    from pyiceberg.types import ListType, MapType, PrimitiveType, StructType

    if isinstance(ours, PrimitiveType) and isinstance(theirs, PrimitiveType):
        return bool(ours == theirs)
    if isinstance(ours, ListType) and isinstance(theirs, ListType):
        return _same_shape(ours.element_type, theirs.element_type)
    if isinstance(ours, MapType) and isinstance(theirs, MapType):
        return _same_shape(ours.key_type, theirs.key_type) and _same_shape(
            ours.value_type, theirs.value_type
        )
    if isinstance(ours, StructType) and isinstance(theirs, StructType):
        return [f.name for f in ours.fields] == [f.name for f in theirs.fields] and all(
            _same_shape(a.field_type, b.field_type)
            for a, b in zip(ours.fields, theirs.fields, strict=True)
        )
    return False


def _writable(ours: Any, theirs: Any) -> str | None:
    """How values of Iceberg type ``ours`` go into a column of type ``theirs``: ``"same"``,
    ``"cast"`` (they widen into it: int into long), ``"widen"`` (Iceberg evolves the column to
    ours: int to long, float to double) or ``None`` (no way)."""
    from pyiceberg.exceptions import ResolveError
    from pyiceberg.schema import promote
    from pyiceberg.types import PrimitiveType

    if _same_shape(ours, theirs):
        return "same"
    if not (isinstance(ours, PrimitiveType) and isinstance(theirs, PrimitiveType)):
        return None
    for way, (src, dst) in (("cast", (ours, theirs)), ("widen", (theirs, ours))):
        try:
            promote(src, dst)
            return way
        except ResolveError:
            pass
    return None


@dataclass(frozen=True)
class Evolution:
    """The schema changes a commit makes (in its own transaction, so only if it lands)."""

    add: tuple[tuple[str, Any], ...] = ()  # new optional columns
    widen: tuple[tuple[str, Any], ...] = ()  # int -> long, float -> double
    relax: tuple[str, ...] = ()  # required columns the job may leave null

    def __bool__(self) -> bool:
        return bool(self.add or self.widen or self.relax)

    def apply(self, txn: Any) -> None:
        """Stage the changes in pyiceberg transaction ``txn``."""
        with txn.update_schema() as update:
            for name, typ in self.add:
                update.add_column(name, typ)  # optional: earlier rows read null
            for name, typ in self.widen:
                update.update_column(name, field_type=typ)
            for name in self.relax:
                update.make_column_optional(name)


def check_schema(
    target: IcebergTarget,
    theirs: IcebergSchema,
    properties: Mapping[str, str],
    schema: pa.Schema,
    key: TableKey,
) -> Evolution:
    """What committing rows of ``schema`` into the table changes.

    Args:
        theirs, properties: the table's schema and properties.

    Raises:
        IcebergError: a change Iceberg does not allow, naming the column.
    """
    where = f"Iceberg table {target.table}"
    stored = properties.get(KEY_PROPERTY)
    if stored is not None and tuple(stored.split(",")) != key.row:
        raise IcebergError(
            f"{where} is keyed by ({stored}), the job by ({', '.join(key.row)}): write to "
            "another table"
        )
    names = set(schema.names)
    for f in theirs.fields:
        if f.required and f.name not in names:
            raise IcebergError(f"{where}: required column {f.name!r} is not in the job's results")
    add, widen, relax = [], [], []
    for f in schema:
        ours = iceberg_type(f.name, f.type)
        try:
            existing = theirs.find_field(f.name)
        except ValueError:  # pyiceberg's "could not find field"
            if f.name in key.row:
                raise IcebergError(f"{where} has no key column {f.name!r}") from None
            add.append((f.name, ours))
            continue
        way = _writable(ours, existing.field_type)
        if way is None:
            raise IcebergError(
                f"{where}: column {f.name!r} is {existing.field_type} in the table and {ours} in "
                "the job's results, a change Iceberg cannot make (rename the column or write to "
                "another table)"
            )
        if way == "widen":
            widen.append((f.name, ours))
        if existing.required and f.nullable:
            relax.append(f.name)
    return Evolution(tuple(add), tuple(widen), tuple(relax))


def new_table(schema: pa.Schema, key: TableKey) -> tuple[Any, Any, Any, dict[str, str]]:
    """What a first commit creates: the Iceberg schema, partition spec, sort order, properties."""
    from pyiceberg.io.pyarrow import _pyarrow_to_schema_without_ids
    from pyiceberg.partitioning import PartitionField, PartitionSpec
    from pyiceberg.schema import assign_fresh_schema_ids
    from pyiceberg.table.sorting import SortField, SortOrder
    from pyiceberg.transforms import BucketTransform, IdentityTransform

    for f in schema:
        iceberg_type(f.name, f.type)  # names the column Iceberg cannot type
    fresh = assign_fresh_schema_ids(_pyarrow_to_schema_without_ids(schema))
    first = fresh.find_field(key.row[0]).field_id
    spec = PartitionSpec(
        PartitionField(first, 1000, BucketTransform(BUCKETS), f"{key.row[0]}_bucket")
    )
    order = SortOrder(
        *(SortField(fresh.find_field(c).field_id, IdentityTransform()) for c in key.row)
    )
    properties = {KEY_PROPERTY: ",".join(key.row), REPLACE_PROPERTY: ",".join(key.replace)}
    return fresh, spec, order, properties


def prepare(target: IcebergTarget, schema: pa.Schema, key: TableKey | Sequence[str]) -> None:
    """Check, before any work, that the job's results can be committed to ``target``.

    Opens the catalog and the table; a missing table (or namespace) is fine: the first commit
    creates it. Nothing is written.

    Args:
        schema: the job's results schema (passthrough columns included).
        key: the job's key (:data:`~vbatch.operators.lakehouse.keys.JOB_KEYS`) or its columns.

    Raises:
        IcebergError: a bad name, a catalog not configured or unreachable, a key column missing
            from ``schema``, or a table whose schema cannot take ``schema`` (naming the column).
    """
    key = as_key(key)
    for c in key.row:
        if c not in schema.names:
            raise IcebergError(f"key column {c!r} is not in the job's results")
    table = load_table(load_catalog(target.catalog), target)
    if table is None:
        new_table(schema, key)
        logger.info("Iceberg table %s will be created by the first commit", target.table)
        return
    evolution = check_schema(target, table.schema(), table.properties, schema, key)
    if evolution.add:
        names = ", ".join(n for n, _ in evolution.add)
        logger.info("Iceberg table %s: the commit will add column(s) %s", target.table, names)
