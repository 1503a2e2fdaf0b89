"""Where a job's Iceberg table is: the target (``--table``, ``--catalog``), its catalog and reads.

The catalog is configured the way pyiceberg users already configure it (``~/.pyiceberg.yaml`` or
``PYICEBERG_CATALOG__<NAME>__<KEY>`` variables: REST, Glue, SQL, Hive…), so no secret ever
appears on a command line. pyiceberg is imported only here and in the modules that write, and
only when called: ``vbatch --help`` and jobs without ``--table`` never import it.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import pyarrow as pa
import pyarrow.parquet as pq

from vbatch.operators.storage import Storage, join

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog
    from pyiceberg.table import Table

#: rows per Parquet file :func:`export_current` writes
EXPORT_FILE_ROWS = 1_000_000

_NAME_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


#: snapshot summary properties a job's commit records and ``--reuse iceberg:…`` compares
#: (``operators.reuse``): the model's content identity, the options that decide results (JSON),
#: the ``--out`` the run's products live under
MODEL_IDENTITY = "vbatch.model-identity"
OPTIONS = "vbatch.options"
OUT = "vbatch.out"


class IcebergError(ValueError):
    """The catalog, the table or its schema cannot take the job's results (found before any
    work, or before anything is written)."""


@dataclass(frozen=True)
class IcebergTarget:
    """A table in a configured catalog.

    Attributes:
        table: ``NAMESPACE.TABLE``; a namespace may be nested (``lake.ml.segment_results``).
        catalog: the pyiceberg catalog name (``default`` unless several are configured).
    """

    table: str
    catalog: str = "default"

    def __post_init__(self) -> None:
        parts = self.table.split(".")
        if len(parts) < 2 or not all(_NAME_PART.match(p) for p in parts):
            raise IcebergError(
                f"--table {self.table!r}: expected NAMESPACE.TABLE (letters, digits, _ and -; "
                "e.g. catalog_ml.segment_results)"
            )
        if not _NAME_PART.match(self.catalog):
            raise IcebergError(f"--catalog {self.catalog!r} is not a catalog name")

    @property
    def namespace(self) -> tuple[str, ...]:
        return tuple(self.table.split(".")[:-1])


def load_catalog(name: str) -> Catalog:
    """The catalog ``name`` as pyiceberg users configure it, with the environment read now.

    pyiceberg reads ``PYICEBERG_*`` once, when ``pyiceberg.catalog`` is first imported; the
    configuration is read again here, so variables a process sets later (a test, a launcher)
    count.

    Raises:
        IcebergError: pyiceberg is missing, the catalog is not configured or cannot be opened.
    """
    try:
        from pyiceberg import catalog as pyi_catalog
        from pyiceberg.utils.config import Config
    except ImportError as e:
        raise IcebergError("--table needs pyiceberg: pip install 'vbatch[iceberg]'") from e
    config = Config().get_catalog_config(name)
    if not config:
        env = f"PYICEBERG_CATALOG__{name.upper()}__"
        raise IcebergError(
            f"Iceberg catalog {name!r} is not configured: set {env}TYPE, {env}URI, "
            f"{env}WAREHOUSE (and credentials) or add catalog: {name}: … to ~/.pyiceberg.yaml "
            "(docs/ICEBERG.md)"
        )
    try:
        return pyi_catalog.load_catalog(name, **cast(dict[str, Any], config))
    except Exception as e:  # a REST catalog is contacted here: unreachable, refused, misnamed
        uri = config.get("uri", "")
        raise IcebergError(
            f"cannot open Iceberg catalog {name!r} {uri}: {type(e).__name__}: {e}"
        ) from e


def load_table(catalog: Catalog, target: IcebergTarget) -> Table | None:
    """The table, ``None`` when it (or its namespace) does not exist yet."""
    from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError

    try:
        return catalog.load_table(target.table)
    except (NoSuchTableError, NoSuchNamespaceError):
        return None


def read_current(
    target: IcebergTarget, columns: Sequence[str] | None = None, snapshot_id: int | None = None
) -> pa.Table:
    """The table's rows at its current snapshot, or at ``snapshot_id`` (time travel).

    Args:
        columns: the columns to read (all by default); ``--reuse`` needs only a few.

    Raises:
        FileNotFoundError: there is no such table.
    """
    fields = tuple(columns) if columns else ("*",)
    table = _existing(target).scan(selected_fields=fields, snapshot_id=snapshot_id).to_arrow()
    return table.cast(_small_schema(table.schema))


def _small(typ: pa.DataType) -> pa.DataType:
    """``typ`` with 32-bit offsets: pyiceberg reads ``large_string``/``large_list``, vbatch's
    schemas (schemas/) and its readers use ``string``/``list``."""
    if pa.types.is_large_string(typ):
        return pa.string()
    if pa.types.is_large_binary(typ):
        return pa.binary()
    if pa.types.is_large_list(typ) or pa.types.is_list(typ):
        return pa.list_(typ.value_field.with_type(_small(typ.value_type)))
    if pa.types.is_struct(typ):
        return pa.struct([f.with_type(_small(f.type)) for f in typ])
    return typ


def _small_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f.with_type(_small(f.type)) for f in schema], metadata=schema.metadata)


def _existing(target: IcebergTarget) -> Table:
    table = load_table(load_catalog(target.catalog), target)
    if table is None:
        raise FileNotFoundError(f"no Iceberg table {target.table} in catalog {target.catalog!r}")
    return table


def current_summary(target: IcebergTarget) -> dict[str, str]:
    """The current snapshot's summary: the last run's record (``vbatch.run-id`` and the properties
    its commit recorded; what ``--reuse`` compares), empty before the first commit.

    Raises:
        FileNotFoundError: there is no such table.
    """
    snapshot = _existing(target).current_snapshot()
    if snapshot is None or snapshot.summary is None:
        return {}
    return {"operation": snapshot.summary.operation.value, **snapshot.summary.additional_properties}


def export_current(
    target: IcebergTarget, folder: str, storage: Storage, columns: Sequence[str] | None = None
) -> list[str]:
    """Stream the table's current rows into Parquet files under ``folder`` (at most
    :data:`EXPORT_FILE_ROWS` rows each), the form ``--reuse`` reads an earlier run's rows in.

    The table's own data files are not handed out: reading them needs the catalog's credentials,
    their rows may be deleted by delete files, and older files lack newer columns.

    Returns:
        The files written, in order; none for a table without rows.

    Raises:
        FileNotFoundError: there is no such table.
    """
    fields = tuple(columns) if columns else ("*",)
    reader = _existing(target).scan(selected_fields=fields).to_arrow_batch_reader()
    schema = _small_schema(reader.schema)
    files: list[str] = []
    writer: pq.ParquetWriter | None = None
    rows = 0
    storage.makedirs(folder)
    try:
        for batch in reader:
            if writer is not None and rows + batch.num_rows > EXPORT_FILE_ROWS and rows:
                writer.close()
                writer = None
            if writer is None:
                files.append(join(folder, f"part-{len(files):05d}-{uuid.uuid4().hex[:8]}.parquet"))
                fs, path = storage.arrow_fs(files[-1])
                writer = pq.ParquetWriter(fs.open_output_stream(path), schema)
                rows = 0
            writer.write_batch(batch.cast(schema))
            rows += batch.num_rows
    finally:
        if writer is not None:
            writer.close()
    return files
