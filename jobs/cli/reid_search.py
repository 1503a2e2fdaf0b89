"""``vbatch reid search``: the top-k gallery images of query images.

With ``--out`` and ``--manifest`` or ``--embeddings`` it is a Ray Data job
(:mod:`vbatch.jobs.reid_search`); with ``--image`` (or ``--embeddings`` without ``--out``) it
searches in this process and prints the hits.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vbatch.jobs.cli import options
from vbatch.jobs.cli.command import storage_of
from vbatch.jobs.cli.segment import image_job_config

NAME = "reid search"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "search",
        help="top-k gallery images for query images",
        description=(
            "Embeds the queries with the same model (or takes --embeddings) and searches the index: "
            "query_id, rank, image_id, score, status, error, k rows per query and one error row per "
            "query that failed (unreadable image, invalid embedding, another model_version). With --out "
            "and --manifest or --embeddings it runs as a Ray Data job (embedding actor pool -> search "
            "actors that memory-map the gallery from each node's cache) and commits <out>/results/ "
            "(the queries' other columns pass through), run.json and _SUCCESS like `segment`; exit 3 "
            "above --max-error-rate. --image (and --embeddings without --out) search in this process "
            "and print the hits; exit 3 above --max-error-rate, 1 when every query failed. Queries "
            "(a table or --model-dir) of another model_version than the gallery's are refused."
        ),
    )
    p.set_defaults(command_module=sys.modules[__name__])
    p.add_argument(
        "--index", required=True, metavar="URI", help="index folder written by `reid index`"
    )
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--image", action="append", metavar="URI", help="query image (repeatable)")
    q.add_argument("--manifest", metavar="URI", help="manifest of query images (embedded on Ray)")
    q.add_argument(
        "--embeddings", metavar="URI", help="already embedded queries (`reid embed` output)"
    )
    p.add_argument(
        "--model-dir", metavar="URI", help="reid model directory (for --image / --manifest)"
    )
    p.add_argument(
        "--k",
        type=options.positive_int,
        default=10,
        metavar="K",
        help="hits per query, >= 1 (default 10)",
    )
    p.add_argument(
        "--out",
        metavar="URI",
        help="output folder of the batch job (--manifest, --embeddings); with --image a Parquet "
        "file or folder for the hits",
    )
    p.add_argument(
        "--nprobe",
        type=options.positive_int,
        metavar="N",
        help="IVF lists to visit (default: tuned)",
    )
    p.add_argument(
        "--rerank",
        type=options.non_negative_int,
        metavar="R",
        help="re-rank the top k x R with the full vectors kept beside the index; 0: off "
        "(default: the tuned factor of a gallery built with them)",
    )
    p.add_argument(
        "--search-actors",
        type=options.positive_int,
        default=1,
        metavar="N",
        help="search actors of the batch job (each maps the gallery once per node; default 1)",
    )
    p.add_argument("--limit", type=int, metavar="N", help="only the first N manifest rows")
    options.add_precision(p, ("reid",))
    p.add_argument(
        "--allow-model-mismatch",
        action="store_true",
        help="search even if the queries' model_version differs from the gallery's",
    )
    options.add_row_job(p)
    options.add_report_option(
        p, "with --out: <out>/report/index.html with N sample queries and their hits"
    )
    return p


def is_batch(args: argparse.Namespace) -> bool:
    """Whether the search runs as a Ray Data job (``--out`` with a table of queries)."""
    return bool(args.out and (args.manifest or args.embeddings))


def config(args: argparse.Namespace) -> Any:  # -> SearchJobConfig
    """The batch job's configuration (:func:`is_batch`)."""
    from vbatch.jobs.reid_search import SearchJobConfig

    if args.manifest and not args.model_dir:
        raise ValueError("--model-dir is needed to embed query images")
    return SearchJobConfig(
        index=args.index,
        out=args.out,
        embeddings=args.embeddings,
        embed=image_job_config(args, "reid") if args.manifest else None,
        k=args.k,
        nprobe=args.nprobe,
        rerank=args.rerank,
        search_actors=args.search_actors,
        allow_model_mismatch=args.allow_model_mismatch,
        **options.run_options(args),
    )


def run(args: argparse.Namespace, clock: Any) -> dict[str, Any]:
    if is_batch(args):
        from vbatch.jobs.reid_search import run_search_job

        job = run_search_job(config(args), clock)
        print(job.report())
        return job.record
    return search_here(args, clock)


def search_here(args: argparse.Namespace, clock: Any) -> dict[str, Any]:
    """Search in this process (``--image``, or ``--embeddings`` without ``--out``); print the hits."""
    from vbatch.jobs import reid
    from vbatch.jobs.publish import read_table
    from vbatch.jobs.summary import check_infrastructure, job_record
    from vbatch.operators.index import GalleryIndex

    if args.manifest:
        raise ValueError("--manifest runs as a batch job: give --out")
    storage = storage_of(args)
    index = GalleryIndex.open(args.index, storage)
    if args.embeddings:
        table = read_table(args.embeddings, storage)
        queries = reid.queries_from_table(table, index.info.dim, args.embeddings)
    elif not args.model_dir:
        raise ValueError("--model-dir is needed to embed query images")
    else:
        queries = reid.embed_images(args.image, args.model_dir, storage, precision=args.precision)
    reid.check_model_version(queries, index, args.allow_model_mismatch)
    failed = queries.failed
    if failed and len(failed) == len(queries.ids):
        first = "; ".join(f"{q}: {e}" for q, e in failed[:3])
        raise ValueError(f"all {len(failed)} queries failed, nothing to search ({first})")
    # failed queries are error rows: exit 3 above --max-error-rate, as for the batch job
    counts, limits = reid.search_counts(queries), options.limits_of(args)
    check_infrastructure(counts, limits, "queries")
    hits = reid.search_table(index, queries, args.k, args.nprobe, args.rerank)
    print(hits.to_pandas().to_string(index=False))
    print(f"queries: {len(queries.ids) - len(failed)} searched, {len(failed)} failed")
    for query_id, error in failed[:20]:
        print(f"  failed {query_id!r}: {error}")
    if len(failed) > 20:
        print(f"  … {len(failed) - 20} more failed queries (error rows of the table)")
    written = reid.write_parquet(hits, args.out, storage) if args.out else None
    if written:
        print(f"written: {written}")
    return job_record(
        NAME,
        clock,
        counts,
        limits,
        index=args.index,
        k=args.k,
        queries=len(queries.ids),
        failed=len(failed),
        hits=hits.num_rows,
        written=written,
    )
