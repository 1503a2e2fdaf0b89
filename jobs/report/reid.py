"""The re-ID pages of the report: after ``reid search --out`` (a section of the run's report) and
after ``reid index``/``add`` (``<index>/report/index.html``).

Both show the gallery index's facts (factory, size, bytes per vector, tuned recall …) and, for a
deterministic sample of queries, the query crop next to its top-k gallery crops with their scores.
When both sides know their ``person_id`` (a column the manifests carried through ``reid embed``),
a hit of the same person is framed green and one of another person red; grey when unknown.

Gallery crops are found through the index's history: the embeddings tables it was built from hold
each ``image_id``'s ``uri`` (and ``person_id``). Only the shown ids are kept from those tables; a
table replaced since the build leaves its crops out ("crop not found"). The index page searches a
sample of the gallery's own images against the index (their own hit removed): a quick look at
whether neighbours are the same people.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from vbatch.jobs.report import page
from vbatch.jobs.report.data import id_key, read_record
from vbatch.jobs.report.visuals import encode_jpeg, read_rgb
from vbatch.operators.storage import Storage, join, normalize, parent, resolve
from vbatch.operators.tables import results_files

logger = logging.getLogger(__name__)

#: queries shown at most (each with its top hits), and hits per query
MAX_QUERIES = 24
HITS = 5
#: long side of a crop's thumbnail, px (re-ID crops are tall and small)
CROP = 128
#: frame colours (RGB): the query, a hit of the same person, of another, unknown
QUERY_FRAME = (40, 90, 200)
SAME = (26, 140, 60)
OTHER = (200, 40, 40)
UNKNOWN = (170, 170, 170)
IO_THREADS = 8


def _dataset(files: list[str], storage: Storage) -> pads.Dataset:
    fs = storage.arrow_fs(files[0])[0]
    return pads.dataset([storage.arrow_fs(f)[1] for f in files], filesystem=fs, format="parquet")


def table_base(table_uri: str, storage: Storage) -> str:
    """The folder relative ``uri`` values of a job's table resolve against: its manifest's folder
    (from the job's ``run.json``), else the table's own folder."""
    uri = normalize(table_uri).rstrip("/")
    out = uri[: -len("/results")] if uri.endswith("/results") else uri
    manifests = read_record(out, storage).get("manifest_files") or []
    return parent(manifests[0]) if manifests else out


def _uri(value: Any, base: str) -> str | None:
    if value is None or not str(value).strip():
        return None
    try:
        return resolve(str(value).strip(), base)
    except Exception:
        return None


def gallery_rows(
    sources: list[str], image_ids: set[str], storage: Storage
) -> dict[str, tuple[str | None, Any]]:
    """``image_id → (crop URI, person_id)`` for ``image_ids``, from the embeddings tables
    ``sources`` (an index's history); ids the tables no longer hold are left out."""
    found: dict[str, tuple[str | None, Any]] = {}
    for source in dict.fromkeys(sources):
        todo = image_ids - set(found)
        if not todo:
            break
        try:
            files = results_files(source, storage)
            if not files:
                continue
            data = _dataset(files, storage)
            cols = [c for c in ("image_id", "uri", "person_id") if c in data.schema.names]
            if "image_id" not in cols:
                continue
            rows = data.to_table(
                columns=cols, filter=pc.field("image_id").isin(pa.array(sorted(todo)))
            ).to_pylist()
            base = table_base(source, storage)
        except Exception as e:  # a table replaced or removed since the build: crops left out
            logger.warning("report: gallery table %s unreadable: %s", source, e)
            continue
        for r in rows:
            found.setdefault(r["image_id"], (_uri(r.get("uri"), base), r.get("person_id")))
    return found


def index_facts(info: Any) -> str:
    """The index's facts as a table (``info``: :class:`vbatch.operators.index.IndexInfo`)."""
    recall = info.tuned_recall
    pairs: list[tuple[str, Any]] = [
        ("index", info.uri),
        ("factory", info.factory),
        ("vectors", info.count),
        ("dimension", info.dim),
        ("bytes per vector (index file)", info.bytes_per_vector),
        ("index file (bytes)", info.index_bytes),
        ("tuned recall@10", "–" if recall is None else f"{recall:.3f}"),
        ("nprobe", info.nprobe),
        ("re-rank factor", info.rerank),
        ("metric", info.metric),
        ("model version", info.model_version),
        ("generation", info.generation),
        ("why this factory", info.plan_reason),
        ("updated", info.updated_at),
    ]
    history = [
        (h.get("generation"), h.get("operation"), h.get("source"), h.get("added"))
        for h in info.history
    ]
    return (
        "<h2>Gallery index</h2>"
        + page.kv_table((k, v) for k, v in pairs if v not in (None, ""))
        + (
            "<h3>History</h3>"
            + page.table(("generation", "operation", "source", "added"), history, numeric=(0, 3))
            if history
            else ""
        )
    )


def _framed(rgb: np.ndarray, colour: tuple[int, int, int], width: int = 4) -> np.ndarray:
    h, w = rgb.shape[:2]
    out = np.empty((h + 2 * width, w + 2 * width, 3), np.uint8)
    out[:] = colour
    out[width : width + h, width : width + w] = rgb
    return out


def _placeholder() -> np.ndarray:
    return np.full((CROP, CROP // 2, 3), 235, np.uint8)


def query_strips(
    queries: list[dict[str, Any]],
    gallery: dict[str, tuple[str | None, Any]],
    root: str,
    folder: str,
    storage: Storage,
) -> str:
    """One card per query: its crop, then its hits framed by person.

    Args:
        queries: ``query_id``, ``uri`` (resolved or None), ``person_id``, ``hits``: [(rank,
            image_id, score)] best first.
        gallery: :func:`gallery_rows` of the hits.
        root: the report folder; pictures go under ``root/<folder>/``.
    """
    crops = {q["uri"] for q in queries if q["uri"]}
    crops |= {gallery[i][0] for q in queries for _, i, _ in q["hits"] if i in gallery}
    crops.discard(None)

    def read(uri: str) -> tuple[str, np.ndarray | None]:
        try:
            return uri, read_rgb(storage.read_bytes(uri), CROP)
        except Exception:
            return uri, None

    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
        pictures = dict(pool.map(read, sorted(crops)))  # type: ignore[arg-type]

    cards = []
    for n, q in enumerate(queries):
        add = _Strip(storage, root, f"{folder}/{n:03d}")
        add(pictures.get(q["uri"]) if q["uri"] else None, QUERY_FRAME, "query")
        same = known = 0
        for rank, image_id, score in q["hits"]:
            uri, person = gallery.get(image_id, (None, None))
            if person is not None and q["person_id"] is not None:
                known += 1
                same += int(person == q["person_id"])
                colour = SAME if person == q["person_id"] else OTHER
            else:
                colour = UNKNOWN
            missing = "" if uri and pictures.get(uri) is not None else " (crop not found)"
            add(pictures.get(uri) if uri else None, colour, f"#{rank} {score:.3f}{missing}")
        pics = add.pictures
        person = (
            f" · person {page.esc(q['person_id'])}: {same} of {known} shown hits the same person"
            if q["person_id"] is not None and known
            else ""
        )
        cards.append(page.card(pics, f"<b>{page.esc(q['query_id'])}</b>{person}"))
    legend = (
        '<p class="muted">Frames: blue the query; green a hit of the same person, red another '
        "person, grey unknown (no <code>person_id</code> on one side).</p>"
    )
    return legend + "".join(cards)


class _Strip:
    """Writes one card's framed crops as ``<prefix>-NN.jpg`` under the report and lists them."""

    def __init__(self, storage: Storage, root: str, prefix: str) -> None:
        self.storage, self.root, self.prefix = storage, root, prefix
        self.pictures: list[tuple[str, str, int, int]] = []

    def __call__(self, rgb: np.ndarray | None, colour: tuple[int, int, int], caption: str) -> None:
        image = _framed(_placeholder() if rgb is None else rgb, colour)
        name = f"{self.prefix}-{len(self.pictures):02d}.jpg"
        self.storage.write_bytes(join(self.root, name), encode_jpeg(image), "image/jpeg")
        self.pictures.append((name, caption, int(image.shape[1]), int(image.shape[0])))


def _sample_ids(ids: list[str], n: int) -> list[str]:
    """The deterministic sample: the ``n`` ids with the smallest hash, in hash order."""
    return sorted(set(ids), key=id_key)[:n]


def search_section(
    files: list[str], record: dict[str, Any], root: str, storage: Storage, samples: int
) -> str:
    """The section of a ``reid search --out`` run's report: the index, and a sample of queries
    with their top hits."""
    config = record.get("config") or {}
    data = _dataset(files, storage)
    firsts = data.to_table(
        columns=["query_id"], filter=(pc.field("status") == "ok") & (pc.field("rank") == 1)
    )
    chosen = _sample_ids(
        [q for q in firsts.column("query_id").to_pylist() if q is not None],
        min(samples, MAX_QUERIES),
    )
    info = None
    try:
        from vbatch.operators.index import read_info

        info = read_info(config["index"], storage)
    except Exception as e:
        logger.warning("report: the index of this search is unreadable: %s", e)
    sections = [index_facts(info)] if info is not None else []
    if not chosen:
        return "".join(sections)
    cols = [
        c
        for c in ("query_id", "rank", "image_id", "score", "uri", "person_id")
        if c in data.schema.names
    ]
    rows = data.to_table(
        columns=cols,
        filter=pc.field("query_id").isin(pa.array(chosen)) & (pc.field("status") == "ok"),
    ).to_pylist()
    embed = config.get("embed") or {}
    if embed.get("manifest"):
        manifest = normalize(embed["manifest"])
        base = parent(manifest) if manifest.endswith(".parquet") else manifest
    elif config.get("embeddings"):
        base = table_base(config["embeddings"], storage)
    else:
        base = ""
    by_query: dict[str, dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: r["rank"]):
        q = by_query.setdefault(
            r["query_id"],
            {
                "query_id": r["query_id"],
                "uri": _uri(r.get("uri"), base),
                "person_id": r.get("person_id"),
                "hits": [],
            },
        )
        if len(q["hits"]) < HITS:
            q["hits"].append((r["rank"], r["image_id"], r["score"]))
    queries = [by_query[q] for q in chosen if q in by_query]
    sources = [h["source"] for h in info.history if h.get("source")] if info else []
    gallery = gallery_rows(sources, {i for q in queries for _, i, _ in q["hits"]}, storage)
    sections.append(
        f"<h2>Queries and their top {HITS} hits</h2>"
        f'<p class="muted">{len(queries)} of {firsts.num_rows:,} searched queries, a '
        "deterministic sample (the smallest hashes of the query ids).</p>"
        + query_strips(queries, gallery, root, "reid", storage)
    )
    return "".join(sections)


def build_index_report(index_uri: str, storage: Storage, samples: int) -> str:
    """``<index>/report/index.html`` after ``reid index``/``add``: the index's facts and a sample
    of gallery images searched against it (their own hit removed). Returns the page's URI."""
    from vbatch.operators.index import GalleryIndex, read_info
    from vbatch.operators.index.store import read_id_map

    t0 = time.perf_counter()
    index_uri = normalize(index_uri)
    info = read_info(index_uri, storage)
    root = join(index_uri, "report")
    if storage.exists(root):
        storage.delete(root, recursive=True)
    ids = read_id_map(info, storage).column("image_id").to_pylist()
    chosen = _sample_ids(ids, min(samples, MAX_QUERIES))
    sources = [h["source"] for h in info.history if h.get("source")]
    vectors: dict[str, np.ndarray] = {}
    for source in dict.fromkeys(sources):
        todo = sorted(set(chosen) - set(vectors))
        if not todo:
            break
        try:
            table = _dataset(results_files(source, storage), storage).to_table(
                columns=["image_id", "embedding"], filter=pc.field("image_id").isin(pa.array(todo))
            )
        except Exception as e:
            logger.warning("report: gallery table %s unreadable: %s", source, e)
            continue
        for image_id, vector in zip(
            table.column("image_id").to_pylist(), table.column("embedding").to_pylist(), strict=True
        ):
            if vector is not None:
                vectors.setdefault(image_id, np.asarray(vector, np.float32))
    sections = [
        f'<h1>vbatch report — reid gallery index</h1><p class="muted">{page.esc(index_uri)}</p>',
        index_facts(info),
    ]
    queries: list[dict[str, Any]] = []
    usable = [
        i for i in chosen if i in vectors and np.isfinite(vectors[i]).all() and vectors[i].any()
    ]
    if usable:
        gallery_index = GalleryIndex.open(index_uri, storage)
        scores, hits = gallery_index.search(np.stack([vectors[i] for i in usable]), k=HITS + 1)
        for qid, row_scores, row_ids in zip(usable, scores, hits, strict=True):
            own = [(s, i) for s, i in zip(row_scores, row_ids, strict=True) if i and i != qid]
            queries.append(
                {
                    "query_id": qid,
                    "uri": None,
                    "person_id": None,
                    "hits": [(r + 1, i, float(s)) for r, (s, i) in enumerate(own[:HITS])],
                }
            )
    gallery = gallery_rows(
        sources,
        {q["query_id"] for q in queries} | {i for q in queries for _, i, _ in q["hits"]},
        storage,
    )
    for q in queries:
        q["uri"], q["person_id"] = gallery.get(q["query_id"], (None, None))
    if queries:
        sections.append(
            f"<h2>Gallery images searched against the index (top {HITS}, itself left out)</h2>"
            f'<p class="muted">{len(queries)} of {info.count:,} gallery images, a deterministic '
            "sample (the smallest hashes of the image ids).</p>"
            + query_strips(queries, gallery, root, "reid", storage)
        )
    else:
        sections.append(
            '<p class="note">No sample: the embeddings tables the index was built from are gone '
            "or hold none of its ids.</p>"
        )
    sections.append(f'<p class="muted">Report built in {time.perf_counter() - t0:.1f} s.</p>')
    index = join(root, "index.html")
    html_bytes = page.document(f"vbatch report {index_uri}", sections).encode()
    storage.write_bytes(index, html_bytes, "text/html; charset=utf-8")
    return index
