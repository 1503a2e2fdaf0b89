"""Where a job's Iceberg table is: the target (``--table``, ``--catalog``), its catalog and reads.

The catalog is configured the way pyiceberg users already configure it (``~/.pyiceberg.yaml`` or
``PYICEBERG_CATALOG__<NAME>__<KEY>`` variables: REST, Glue, SQL, Hive…), so no secret ever
appears on a command line. pyiceberg is imported only here and in the modules that write, and
only when called: ``vbatch --help`` and jobs without ``--table`` never import it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import pyarrow as pa

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog
    from pyiceberg.table import Table

_NAME_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


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
    table = load_table(load_catalog(target.catalog), target)
    if table is None:
        raise FileNotFoundError(f"no Iceberg table {target.table} in catalog {target.catalog!r}")
    fields = tuple(columns) if columns else ("*",)
    return table.scan(selected_fields=fields, snapshot_id=snapshot_id).to_arrow()
