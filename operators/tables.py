"""The one listing rule for the tables jobs publish (see :mod:`vbatch.jobs.publish`).

A job's ``--out`` holds generations of its results table and a pointer to the committed one;
every reader of job outputs (``read_table``, ``vbatch reid index``/``add``, ``search
--embeddings``, ``eval``) finds the table's Parquet files through :func:`results_files`, so stale
staging output or an uncommitted generation is never read.
"""

from __future__ import annotations

import json
import posixpath
import re

from vbatch.operators.storage import Storage, join, normalize, parent

RESULTS = "results"
#: ``<out>/products/<run id>/``: the products (masks, mattes, frames…) one run wrote; the rows of a
#: committed generation reference them, no other run writes there
PRODUCTS = "products"
STAGING = ".staging"
POINTER = "_LATEST"
SUCCESS = "_SUCCESS"

#: run ids, and so generation folder names: UTC time, then a random suffix
_RUN_ID = re.compile(r"^\d{8}T\d{6}Z?-[0-9a-f]{6}$")


def read_text(uri: str, storage: Storage) -> str | None:
    try:
        return storage.read_bytes(uri).decode().strip()
    except (FileNotFoundError, NotADirectoryError):  # no such object; a file, not a folder
        return None


def _hidden(path: str, root: str) -> bool:
    """A path below ``root`` with a component starting with ``.`` or ``_`` (staging folders,
    markers, temp files): what pyarrow, Spark and Hive skip too."""
    rel = posixpath.relpath(path.split("://", 1)[-1], root.split("://", 1)[-1].rstrip("/"))
    return rel != "." and any(part.startswith((".", "_")) for part in rel.split("/"))


def _uncommitted_generation(path: str, root: str) -> bool:
    rel = posixpath.relpath(path.split("://", 1)[-1], root.split("://", 1)[-1].rstrip("/"))
    parts = rel.split("/")
    # <root>/<run id>/… or <root>/results/<run id>/…
    return (len(parts) > 1 and bool(_RUN_ID.match(parts[0]))) or (
        len(parts) > 2 and parts[0] == RESULTS and bool(_RUN_ID.match(parts[1]))
    )


def committed_generation(out: str, storage: Storage) -> str | None:
    """The committed generation's folder (``<out>/results/<run id>``), ``None`` before the first."""
    pointer = read_text(join(out, POINTER), storage)
    return join(out, pointer) if pointer else None


def commit_record(out: str, storage: Storage) -> dict | None:
    """The committed generation's ``_SUCCESS``: its files and rows, and what it was computed with
    (``jobs.publish.publish``'s commit record); ``None`` before the first commit."""
    folder = committed_generation(out, storage)
    if folder is None:
        return None
    marker = read_text(join(folder, SUCCESS), storage)
    if marker is None:
        raise FileNotFoundError(f"{folder}: committed by {POINTER} but has no {SUCCESS}")
    record: dict = json.loads(marker)
    return record


def product_root(out: str, run_id: str) -> str:
    """Where run ``run_id`` writes its products: ``<out>/products/<run id>``."""
    return join(out, PRODUCTS, run_id)


def results_files(uri: str, storage: Storage) -> list[str]:
    """The Parquet files of the table at ``uri``: the one listing rule for job outputs.

    Args:
        uri: a job's ``--out``, its ``results/`` folder, a folder of Parquet files, or one file.

    Returns:
        Sorted file URIs. For a job's output (``<out>/_LATEST`` exists; ``uri`` is ``<out>`` or
        ``<out>/results``) exactly the files the committed generation's ``_SUCCESS`` lists; otherwise every ``.parquet`` file
        below ``uri`` except those under a component starting with ``.`` or ``_`` (staging) and
        those of generations no pointer commits (a first run that crashed while publishing).
        Empty when there is no table.
    """
    uri = normalize(uri)
    outs = [uri, parent(uri)] if posixpath.basename(uri.rstrip("/")) == RESULTS else [uri]
    for out in outs:
        folder = committed_generation(out, storage)
        if folder is None:
            continue
        marker = read_text(join(folder, SUCCESS), storage)
        if marker is None:
            raise FileNotFoundError(f"{folder}: committed by {POINTER} but has no {SUCCESS}")
        return [join(folder, name) for name in json.loads(marker)["files"]]
    files = storage.list_files(uri, suffix=".parquet")
    return [f for f in files if not _hidden(f, uri) and not _uncommitted_generation(f, uri)]
