"""Incremental reuse (``--reuse URI``): carry forward the rows of an earlier run whose input and
model are unchanged, without fetching, decoding or inferring them again.

A nightly catalog changes by a few percent a day. A row of tonight's manifest is *reused* when the
earlier run's committed table (``URI``, e.g. yesterday's ``--out``) holds an ``ok`` row with the
same ``image_id``, the same ``uri`` and the same **content fingerprint**, and that run used the
same model (``model_version`` and the model directory's other files) and the same options that
decide results, as the commit record of its committed generation says (``jobs.publish``). Its result row is copied (tonight's passthrough columns,
the earlier ``processed_at``) and its products are copied server-side into tonight's ``--out``
(a rename-free ``CopyObject`` on S3, a file copy locally), so tonight's output stands on its own
when yesterday's is deleted. With ``--reuse`` equal to ``--out`` the products are already there.

The content fingerprint of a row, recorded in the ``source_fingerprint`` column of every result
row so that the next run can compare it:

- the manifest's ``content_hash`` or ``etag`` column when it has one (free: nothing is listed);
- otherwise, when ``--reuse`` is given, the object's listing entry: ``etag:<ETag>`` on S3,
  ``size:<bytes>;mtime:<seconds>`` on local disks, from one listing of each folder the manifest's
  images live in (S3 lists 1,000 keys a call; no request per image). A folder that also holds
  many objects the manifest does not name is listed whole: keep catalogs in their own prefixes.

Rows with no fingerprint (http(s) URIs, objects missing from the listing) are never reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vbatch.operators.columns import set_column
from vbatch.operators.manifest import ERROR, id_hashes, sorted_lookup
from vbatch.operators.quality import GT_COLUMN, GT_ERROR, metric_kind
from vbatch.operators.storage import Storage, is_http, join, normalize, resolve
from vbatch.operators.tables import PRODUCTS, commit_record, committed_generation
from vbatch.schemas.errors import classify_errors
from vbatch.schemas.images import (
    INTERNAL_PREFIX,
    OUTPUT_FIELDS,
    STATUS_OK,
    image_results_schema,
    metric_fields,
)

logger = logging.getLogger(__name__)

#: manifest columns taken as the content fingerprint, in this order of preference
FINGERPRINT_COLUMNS = ("content_hash", "etag")
#: internal columns: the row's fingerprint, and whether it is carried forward
FINGERPRINT = "_vb_fingerprint"
REUSE = "_vb_reuse"


def model_identity(model_version: str, local_model_dir: Path) -> str:
    """The model as reuse compares it: its checkpoint's ``model_version`` and a hash of the other
    files of the directory (a salient ``config.py`` changing the input size changes results with
    the same weights). Large files (the weights themselves) are covered by ``model_version``."""
    h = hashlib.sha256(model_version.encode())
    for p in sorted(local_model_dir.rglob("*")):
        if p.is_file() and p.stat().st_size <= 16 << 20 and not p.name.startswith("."):
            h.update(str(p.relative_to(local_model_dir)).encode() + b"\0" + p.read_bytes())
    return f"{model_version}:{h.hexdigest()[:16]}"


def fingerprint_of(info: dict[str, Any]) -> str | None:
    """A listing entry's (or ``info()``'s) content fingerprint; ``None`` when it has none."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return "etag:" + str(etag).strip('"')
    size, mtime = info.get("size"), info.get("mtime") or info.get("LastModified")
    if size is None or mtime is None:
        return None
    stamp = mtime.isoformat() if hasattr(mtime, "isoformat") else repr(float(mtime))
    return f"size:{int(size)};mtime:{stamp}"


def _location(uri: str, base: str, storage: Storage) -> str | None:
    """The canonical name of a manifest row's object (``s3:bucket/key`` or ``file:/abs/path``), as
    listings name it; ``None`` for URIs that cannot be listed (http(s), unsupported schemes)."""
    try:
        full = resolve(uri.strip(), base)
    except Exception:
        return None
    if is_http(full):
        return None
    return ("s3:" + full[len("s3://") :]) if full.startswith("s3://") else "file:" + full


def _key(location: str) -> tuple[str, str]:
    """``(scheme, fs path)`` of a location."""
    scheme, path = location.split(":", 1)
    return scheme, path


@dataclass
class Listing:
    """Content fingerprints of the objects of the folders a manifest's images live in."""

    #: sorted hashes of the locations (see :func:`_location`)
    hashes: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    fingerprints: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))
    folders: int = 0
    objects: int = 0

    def lookup(self, locations: list[str | None]) -> list[str | None]:
        if not len(self.hashes):
            return [None] * len(locations)
        h = id_hashes(pa.array([loc or "" for loc in locations], pa.string()))
        found, at = sorted_lookup(h, self.hashes)
        fps = self.fingerprints.take(pa.array(at)).to_pylist()
        return [
            fp if ok and loc is not None else None
            for fp, ok, loc in zip(fps, found, locations, strict=True)
        ]


def manifest_uris(files: Iterable[str], storage: Storage) -> Iterator[str]:
    """The ``uri`` column of the manifest's files, streamed a record batch at a time."""
    for uri in files:
        afs, path = storage.arrow_fs(uri)
        with afs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(columns=["uri"], batch_size=65536):
                yield from (u for u in batch.column(0).to_pylist() if u)


def list_fingerprints(
    uris: Iterable[str], base: str, storage: Storage, threads: int = 16
) -> Listing:
    """List every folder the images ``uris`` (manifest values, resolved against ``base``) live in,
    once, and keep each object's fingerprint."""
    folders: set[str] = set()
    for uri in uris:
        loc = _location(uri, base, storage)
        if loc is not None:
            scheme, path = _key(loc)
            folders.add(f"{scheme}:{posixpath.dirname(path)}")

    def list_one(folder: str) -> list[tuple[str, str]]:
        scheme, path = _key(folder)
        out = []
        for e in storage.list_entries(f"s3://{path}" if scheme == "s3" else path):
            fp = fingerprint_of(e) if e.get("type") == "file" else None
            if fp is not None:
                out.append((f"{scheme}:{e['name']}", fp))
        return out

    names: list[str] = []
    fps: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(folders)))) as pool:
        for found in pool.map(list_one, sorted(folders)):
            for name, fp in found:
                names.append(name)
                fps.append(fp)
    hashes = id_hashes(pa.array(names, pa.string()))
    order = np.argsort(hashes, kind="stable")
    return Listing(
        hashes[order], pa.array(fps, pa.string()).take(pa.array(order)), len(folders), len(names)
    )


def _row_keys(image_ids: pa.Array, uris: pa.Array, fingerprints: pa.Array) -> np.ndarray:
    """One hash per (image_id, uri, fingerprint)."""
    joined = pc.binary_join_element_wise(
        pa.array(image_ids, pa.string()).fill_null(""),
        pa.array(uris, pa.string()).fill_null(""),
        pa.array(fingerprints, pa.string()).fill_null(""),
        "\x1f",
    )
    return id_hashes(joined)


@dataclass
class Previous:
    """The reusable rows of the earlier run: where each sits among its files."""

    out: str
    files: list[str] = field(default_factory=list)
    #: sorted row keys (:func:`_row_keys`), with each row's file index and row number
    keys: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    file_index: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))
    row_index: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    #: why nothing is reusable, when nothing is
    reason: str | None = None

    @property
    def rows(self) -> int:
        return len(self.keys)


#: what ``--reuse`` names an Iceberg table by: ``iceberg:NAMESPACE.TABLE`` (in ``--catalog``)
TABLE_PREFIX = "iceberg:"


def previous_run(
    reuse: str,
    storage: Storage,
    identity: str,
    options: dict[str, Any],
    catalog: str = "default",
    scratch: str | None = None,
) -> Previous:
    """Read what the earlier run at ``reuse`` can give: its ``ok`` rows with a fingerprint, if it
    was computed with the same model (``identity``, :func:`model_identity`) and the same
    ``options`` (the job's fields that decide results, ``jobs.config.reuse_fields``).

    ``reuse`` is an earlier ``--out``, whose committed generation's commit record says what it
    was computed with, or ``iceberg:NAMESPACE.TABLE``, whose current snapshot's properties say
    it (the table's current rows are exported as Parquet files into ``scratch`` first).

    Reads only the rows' key columns (``image_id, uri, status, source_fingerprint``).
    """
    if reuse.startswith(TABLE_PREFIX):
        return _previous_table(
            reuse[len(TABLE_PREFIX) :], catalog, storage, identity, options, scratch
        )
    reuse = normalize(reuse)
    found = Previous(out=reuse)
    # the committed generation's own record, not run.json: a run that failed between its commit
    # and its run.json would leave run.json describing another generation
    try:
        record = commit_record(reuse, storage)
    except FileNotFoundError as e:
        found.reason = str(e)
        return found
    if record is None:
        found.reason = f"{reuse} has no committed table (no finished run there)"
        return found
    found.reason = _differs(record.get("model_identity"), record.get("options"), identity, options)
    if found.reason is not None:
        return found
    generation = committed_generation(reuse, storage)
    assert generation is not None
    return _collect(found, [join(generation, name) for name in record["files"]], storage)


def _differs(
    then_identity: str | None, then_options: Any, identity: str, options: dict[str, Any]
) -> str | None:
    """Why an earlier run's rows cannot be reused (``None``: they can)."""
    if then_identity is None:
        return "its commit record has no model identity (written before vbatch recorded one)"
    if then_identity != identity:
        return f"the model differs (then {then_identity}, now {identity})"
    then = json.loads(then_options) if isinstance(then_options, str) else (then_options or {})
    now = json.loads(json.dumps(options, default=str))
    if then != now:
        differs = sorted(k for k in set(then) | set(now) if then.get(k) != now.get(k))
        return f"options that decide results differ: {', '.join(differs)}"
    return None


def _previous_table(
    name: str,
    catalog: str,
    storage: Storage,
    identity: str,
    options: dict[str, Any],
    scratch: str | None,
) -> Previous:
    """:func:`previous_run` of an Iceberg table's current snapshot."""
    from vbatch.operators.lakehouse import IcebergTarget, current_summary, export_current
    from vbatch.operators.lakehouse.catalog import MODEL_IDENTITY, OPTIONS, OUT

    target = IcebergTarget(name, catalog)
    try:
        summary = current_summary(target)
    except FileNotFoundError as e:
        return Previous(out="", reason=str(e))
    if not summary:
        return Previous(out="", reason=f"Iceberg table {name} has no snapshot yet")
    found = Previous(out=normalize(summary[OUT]) if summary.get(OUT) else "")
    found.reason = _differs(summary.get(MODEL_IDENTITY), summary.get(OPTIONS), identity, options)
    if found.reason is not None:
        return found
    if scratch is None:
        raise ValueError("reusing an Iceberg table needs a scratch folder to export its rows to")
    return _collect(found, export_current(target, scratch, storage), storage)


def _collect(found: Previous, files: list[str], storage: Storage) -> Previous:
    """``found`` with the reusable rows of ``files`` (ok, with a content fingerprint)."""
    keys, file_index, row_index = [], [], []
    for i, uri in enumerate(files):
        afs, path = storage.arrow_fs(uri)
        schema = pq.read_schema(path, filesystem=afs)
        if "source_fingerprint" not in schema.names:
            continue  # written before fingerprints were recorded
        t = pq.read_table(
            path, filesystem=afs, columns=["image_id", "uri", "status", "source_fingerprint"]
        )
        usable = pc.and_(
            pc.equal(t.column("status"), STATUS_OK).fill_null(False),
            pc.is_valid(t.column("source_fingerprint")),
        )
        rows = np.flatnonzero(usable.to_numpy(zero_copy_only=False))
        if not len(rows):
            continue
        t = t.take(pa.array(rows))
        keys.append(
            _row_keys(t.column("image_id"), t.column("uri"), t.column("source_fingerprint"))
        )
        file_index.append(np.full(len(rows), i, np.int32))
        row_index.append(rows.astype(np.int64))
    found.files = files
    if keys:
        k = np.concatenate(keys)
        order = np.argsort(k, kind="stable")
        found.keys = k[order]
        found.file_index = np.concatenate(file_index)[order]
        found.row_index = np.concatenate(row_index)[order]
    else:
        found.reason = "its table has no ok rows with a content fingerprint"
    return found


def mark(
    batch: pa.Table,
    *,
    fingerprint_column: str | None,
    listing: Listing | None,
    base_uri: str,
    storage: Storage,
    previous_keys: np.ndarray,
) -> pa.Table:
    """Ray Data stage on the annotated manifest: each row's content fingerprint (``_vb_fingerprint``)
    and whether an earlier run's row can be carried forward (``_vb_reuse``)."""
    n = batch.num_rows
    fps: pa.Array
    if fingerprint_column is not None:
        fps = pc.cast(batch.column(fingerprint_column), pa.string()).combine_chunks()
    elif listing is not None:
        uris = batch.column("uri").to_pylist()
        locations = [_location(u, base_uri, storage) if u else None for u in uris]
        fps = pa.array(listing.lookup(locations), pa.string())
    else:
        fps = pa.nulls(n, pa.string())
    usable = batch.column(ERROR).is_null().to_numpy(zero_copy_only=False) & fps.is_valid().to_numpy(
        zero_copy_only=False
    )
    keys = _row_keys(batch.column("image_id"), batch.column("uri"), fps)
    hit, _ = sorted_lookup(keys, previous_keys)
    batch = set_column(batch, FINGERPRINT, fps)
    return set_column(batch, REUSE, pa.array(usable & hit, pa.bool_()))


def keep(batch: pa.Table, *, reused: bool) -> pa.Table:
    """Ray Data stage: the rows to carry forward (``reused=True``) or to process."""
    flags = batch.column(REUSE)
    return batch.filter(flags if reused else pc.invert(flags))


def _product_path(rel: str) -> str:
    """A product's path inside its run's product folder: ``products/<run id>/masks/a.png`` →
    ``masks/a.png`` (a legacy ``masks/a.png`` stays as it is)."""
    parts = rel.split("/")
    return "/".join(parts[2:]) if parts[0] == PRODUCTS and len(parts) > 2 else rel


def _product_columns(output: str) -> list[str]:
    return [f.name for f in OUTPUT_FIELDS.get(output, []) if f.name.endswith("_uri")]


def carry_forward(
    batch: pa.Table,
    *,
    previous: Previous,
    out: str,
    task: str,
    output: str,
    embedding_dim: int | None,
    storage: Storage,
    product_root: str | None = None,
) -> pa.Table:
    """Ray Data stage: the result rows of reused manifest rows, taken from the earlier run's table,
    their products copied into this run's ``product_root`` (default: to the same path under
    ``out``) — or, when the earlier run is this
    ``out``, referenced where they are: its committed generation owns them, and the commit keeps
    every product folder the new rows reference). One row out per row in, in the results schema
    plus the (tonight's) passthrough columns."""
    schema = image_results_schema(output, embedding_dim=embedding_dim)
    n = batch.num_rows
    keys = _row_keys(batch.column("image_id"), batch.column("uri"), batch.column(FINGERPRINT))
    hit, at = sorted_lookup(keys, previous.keys)
    if not hit.all():  # the stage only ever sees rows that `mark` matched
        raise RuntimeError("reuse: a carried-forward row has no earlier row")
    files, rows = previous.file_index[at], previous.row_index[at]
    # the columns a result row carries over: the results schema, and the ground-truth scores
    kind = metric_kind(task)
    wanted = set(schema.names) | {GT_COLUMN} | {f.name for f in metric_fields(kind)}
    pieces, positions = [], []
    for f in np.unique(files):  # the rows are read file by file, then put back in batch order
        afs, path = storage.arrow_fs(previous.files[int(f)])
        table = pq.read_table(path, filesystem=afs)
        picked = np.flatnonzero(files == f)
        table = table.select([c for c in table.column_names if c in wanted])
        pieces.append(table.take(pa.array(rows[picked])))
        positions.append(picked)
    old = pa.concat_tables(pieces, promote_options="permissive")
    old = old.take(pa.array(np.argsort(np.concatenate(positions), kind="stable")))
    # a hash collision would carry the wrong row: the strings must agree too
    same = pc.all(
        pc.and_(
            pc.equal(old.column("image_id"), batch.column("image_id")),
            pc.equal(old.column("uri"), batch.column("uri")),
        )
    ).as_py()
    if not same:
        raise RuntimeError("reuse: an earlier row does not match its manifest row (hash collision)")
    errors: list[str | None] = [None] * n
    columns: dict[str, pa.Array] = {}
    src_out = previous.out.rstrip("/")
    for name in _product_columns(output):
        values = old.column(name).to_pylist() if name in old.column_names else [None] * n
        moved: list[str | None] = []
        for i, src in enumerate(values):
            if src is None or not src.startswith(src_out + "/") or src_out == out.rstrip("/"):
                moved.append(src)  # not under the earlier --out, or under this one: in place
                continue
            rel = src[len(src_out) + 1 :]
            dst = join(product_root, _product_path(rel)) if product_root else join(out, rel)
            if dst != src:
                try:
                    storage.copy(src, dst)
                except Exception as e:
                    errors[i] = f"reuse: cannot copy {src}: {type(e).__name__}: {e}"
            moved.append(dst)
        columns[name] = pa.array(moved, pa.string())
    columns["source_fingerprint"] = batch.column(FINGERPRINT)
    arrays = []
    for f in schema:
        if f.name in columns:
            arrays.append(pa.array(columns[f.name], f.type))
        elif f.name == "status":
            arrays.append(pa.array(["error" if e else STATUS_OK for e in errors], pa.string()))
        elif f.name == "error":
            arrays.append(pa.array(errors, pa.string()))
        elif f.name == "error_class":
            arrays.append(classify_errors(pa.array(errors, pa.string())))
        elif f.name in old.column_names:
            arrays.append(pc.cast(old.column(f.name).combine_chunks(), f.type))
        else:
            arrays.append(pa.nulls(n, f.type))
    table = pa.Table.from_arrays(arrays, schema=schema)
    if GT_COLUMN in batch.column_names and kind is not None:
        # scores against ground truth, as write_products adds them: kept when the ground truth
        # is the one the earlier run scored against
        same_gt = (
            pc.equal(old.column(GT_COLUMN), batch.column(GT_COLUMN)).fill_null(False)
            if GT_COLUMN in old.column_names
            else pa.array([False] * n)
        )
        for f in metric_fields(kind):
            if f.name in old.column_names:
                col = pc.if_else(same_gt, pc.cast(old.column(f.name), f.type), pa.nulls(n, f.type))
            else:
                col = pa.nulls(n, f.type)
            if f.name == GT_ERROR:
                col = pc.if_else(
                    same_gt,
                    col,
                    pa.array(
                        ["not scored: the ground truth changed since the reused run"] * n,
                        pa.string(),
                    ),
                )
            table = table.append_column(f, col)
    for name in batch.column_names:
        if not name.startswith(INTERNAL_PREFIX) and name not in schema.names:
            table = table.append_column(batch.schema.field(name), batch.column(name))
    return table


def fingerprint_column(schema: pa.Schema) -> str | None:
    """The manifest column that holds content fingerprints, if any."""
    return next((c for c in FINGERPRINT_COLUMNS if c in schema.names), None)
