"""``vbatch reid search --out``: batch search of many queries as a Ray Data job.

Stages (Ray Data, streaming)::

    --manifest: read manifest → fetch → decode + preprocess → reid model (actor pool) → embedding
    --embeddings: read the embeddings table (Parquet, on the workers)
    → search (actor pool: each actor opens the gallery memory-mapped from its node's cache)
    → hits Parquet: query_id, rank, image_id, score, status, error (+ the queries' own columns)

Nothing passes through the driver's disk or memory but counts: the results are staged and
committed as a generation of ``<out>/results/`` with ``run.json`` and ``_SUCCESS``, like the image
jobs (:mod:`vbatch.jobs.publish`). Every query comes out exactly once: ``k`` hit rows (fewer when
the gallery is smaller) or one error row (it failed to embed, its embedding is invalid, or it
comes from another model version). The pattern is Ray Data's batch-inference examples with a
second, stateful actor pool (``release/nightly_tests/dataset/image_embedding_from_uris``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray

from vbatch.jobs.config import INPUT, MODEL, OUTPUT, PLACEMENT, RESULT, RunOptions, role
from vbatch.jobs.finish import Outcome, Tail, finish
from vbatch.jobs.image_pipeline import (
    ImageJobConfig,
    fault_stage,
    model_stages,
    output_options,
    prepare_image_job,
    write_stage,
)
from vbatch.jobs.lakehouse import check_table, table_step, target_of
from vbatch.jobs.lease import Lease
from vbatch.jobs.limits import Limits
from vbatch.jobs.publish import read_files, stage
from vbatch.jobs.runtime import ensure_ray, refuse_local_paths_on_cluster, releases_actors
from vbatch.jobs.summary import Counts, JobFailed, RunClock, count_rows
from vbatch.models import check_model_dir, model_version
from vbatch.models.registry import weights_version
from vbatch.operators.index import IndexInfo, read_info
from vbatch.operators.index.gallery import check_search_options
from vbatch.operators.index.search_stage import HIT_FIELDS, SEARCH_BATCH_ROWS, SearchStage
from vbatch.operators.lakehouse.catalog import OUT
from vbatch.operators.manifest import read_parquet_files
from vbatch.operators.storage import Storage, StorageOptions, join, normalize
from vbatch.operators.tables import results_files

logger = logging.getLogger(__name__)

#: logical CPUs a search actor reserves (see run_search_job)
SEARCH_ACTOR_CPUS = 0


@dataclass(frozen=True)
class SearchJobConfig(RunOptions):
    """The batch search job. Each field declares its role (:mod:`vbatch.jobs.config`).

    Attributes:
        index: the gallery index folder (``reid index``).
        out: output folder (``<out>/results/`` generations, ``run.json``, ``_SUCCESS``).
        embeddings: an embeddings table (``reid embed`` output) of the queries, or
        embed: the image job configuration that embeds a query manifest (task ``reid``).
        k: hits per query.
        nprobe, rerank: search parameters (default: the index manifest's tuned values).
        search_actors: search actors (each maps the gallery once; one per node suffices for
            page-cache sharing, more add CPU).
        search_batch_rows: queries per search call.
        allow_model_mismatch: search queries of another model version than the gallery's.
        cache_root: node cache folder for the gallery files (default ``$VBATCH_CACHE`` or
            ``~/.cache/vbatch`` on each worker).
        search_threads: faiss threads per search actor (default: the node's cores).
    """

    index: str = role(MODEL)
    out: str = role(OUTPUT)
    embeddings: str | None = role(INPUT, None)
    embed: ImageJobConfig | None = role(INPUT, None)
    k: int = role(RESULT, 10)
    nprobe: int | None = role(RESULT, None)
    rerank: int | None = role(RESULT, None)
    search_actors: int = role(PLACEMENT, 1)
    search_batch_rows: int = role(PLACEMENT, SEARCH_BATCH_ROWS)
    allow_model_mismatch: bool = role(RESULT, False)
    cache_root: str | None = role(PLACEMENT, None)
    search_threads: int | None = role(PLACEMENT, None)


def _embedded_queries(cfg: ImageJobConfig, storage: Storage) -> tuple[ray.data.Dataset, int]:
    """The embedding stages of the image job (:func:`vbatch.jobs.segment.run_image_job`, which
    also stages, resumes and publishes: none of that is wanted here) over a query manifest."""
    p = prepare_image_job(cfg, storage)
    ds = fault_stage(p, model_stages(p, cfg, p.ds))
    return write_stage(p, ds, output_options(p, cfg, cfg.out)), p.info.num_rows


def _check_model_dir_version(model_dir: str, info: IndexInfo, storage: Storage) -> None:
    """Refuse, before anything is embedded, a model whose version differs from the gallery's
    (every query would only come back as an error row). The version is the weights file's
    content hash, computed without loading the model."""
    local = storage.localize_dir(model_dir)
    check_model_dir("reid", local)  # a wrong folder is named as such, not as a missing hash
    version = model_version("reid", local)
    if info.model_version is not None and version != weights_version(info.model_version):
        raise ValueError(
            f"the model at {model_dir} is model_version {version!r}, the gallery at {info.uri} "
            f"holds {info.model_version!r}: embeddings of different models are not comparable "
            "(--allow-model-mismatch to search anyway)"
        )


def _embeddings_table(uri: str, storage: Storage, cfg: SearchJobConfig) -> tuple[Any, int]:
    """The queries of an embeddings table, read by Ray's workers; refuses a table of another
    model version up front (one column read on the driver)."""
    files = results_files(uri, storage)
    if not files:
        raise FileNotFoundError(f"no Parquet files under {uri}")
    fs, _ = storage.arrow_fs(files[0])
    table = pads.dataset([storage.arrow_fs(f)[1] for f in files], filesystem=fs, format="parquet")
    rows = table.count_rows()
    if "embedding" not in table.schema.names or "image_id" not in table.schema.names:
        raise ValueError(f"{uri}: query embeddings need image_id and embedding columns")
    if "model_version" in table.schema.names and not cfg.allow_model_mismatch:
        found = table.to_table(columns=["model_version"]).column("model_version")
        versions = set(pc.unique(found.drop_null()).to_pylist())
        gallery = read_info(cfg.index, storage).model_version
        if (
            gallery is not None
            and versions
            and {weights_version(v) for v in versions} != {weights_version(gallery)}
        ):
            raise ValueError(
                f"queries come from model_version {sorted(versions)}, the gallery at {cfg.index} "
                f"from {gallery!r}: embeddings of different models are not comparable "
                "(--allow-model-mismatch to search anyway)"
            )
    ds = read_parquet_files([storage.arrow_fs(f)[1] for f in files], fs)
    return ds, rows


@dataclass
class SearchJobSummary:
    queries: int
    failed: int
    hits: int
    seconds: float
    results_uri: str
    sample_errors: list[tuple[str | None, str]]
    record: dict[str, Any]

    @property
    def exit_code(self) -> int:
        return int(self.record.get("exit_code", 0))

    def report(self) -> str:
        rate = self.queries / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"reid search: {self.queries} queries — {self.queries - self.failed} searched, "
            f"{self.failed} failed — {self.hits} hit rows — {self.seconds:.1f} s, "
            f"{rate:.1f} queries/s",
            f"results: {self.results_uri}",
        ]
        lines += [f"  failed {q!r}: {e}" for q, e in self.sample_errors]
        if self.failed > len(self.sample_errors):
            lines.append(f"  … {self.failed - len(self.sample_errors)} more failed queries")
        return "\n".join(lines)


@releases_actors
def run_search_job(cfg: SearchJobConfig, clock: RunClock | None = None) -> SearchJobSummary:
    """Search every query of ``cfg.embeddings`` or ``cfg.embed.manifest`` on Ray.

    Raises:
        Exception: on problems with the job as a whole (no index, no queries, a table of another
            model version, more infrastructure errors than allowed); never on single queries.
    """
    clock = clock or RunClock()
    if (cfg.embeddings is None) == (cfg.embed is None):
        raise ValueError("give the queries as embeddings or as a manifest to embed, not both")
    storage = Storage(StorageOptions(endpoint_url=cfg.s3_endpoint))
    out = normalize(cfg.out)
    ensure_ray(cfg.address, forward_s3_env=cfg.forward_s3_env)
    refuse_local_paths_on_cluster(
        {
            "--index": cfg.index,
            "--out": cfg.out,
            "--embeddings": cfg.embeddings,
            "--manifest": cfg.embed.manifest if cfg.embed else None,
            "--model-dir": cfg.embed.model_dir if cfg.embed else None,
        }
    )
    info = read_info(cfg.index, storage)  # a missing or damaged index fails here, in seconds
    # here, not once per search actor inside Ray's task errors
    check_search_options(info, cfg.k, cfg.nprobe, cfg.rerank)
    target = target_of(cfg.table, cfg.catalog)
    check_table(target, "reid search", pa.schema(HIT_FIELDS))  # before any work
    if cfg.embed is not None and not cfg.allow_model_mismatch:
        # before the lease too: a refused run leaves no trace under --out
        _check_model_dir_version(cfg.embed.model_dir, info, storage)
    with Lease(out, storage, clock.run_id, "reid search", cfg.break_lease) as lease:
        ds, expected = _search_stages(cfg, storage, info)
        staged = stage(ds, out, storage, clock.run_id)
        return _finish(cfg, storage, out, info, expected, clock, staged, lease)


def _search_stages(
    cfg: SearchJobConfig, storage: Storage, info: IndexInfo
) -> tuple[ray.data.Dataset, int]:
    """The queries (embedded by the image pipeline, or read) → the search actors; the dataset
    of hit rows and how many queries it has."""
    if cfg.embed is not None:
        ds, expected = _embedded_queries(cfg.embed, storage)
    else:
        assert cfg.embeddings is not None
        ds, expected = _embeddings_table(cfg.embeddings, storage, cfg)
    ds = ds.map_batches(
        SearchStage,
        fn_constructor_kwargs={
            "index_uri": cfg.index,
            "storage_options": storage.options,
            "k": cfg.k,
            "nprobe": cfg.nprobe,
            "rerank": cfg.rerank,
            "allow_model_mismatch": cfg.allow_model_mismatch,
            "cache_root": cfg.cache_root,
            "threads": cfg.search_threads,
        },
        compute=ray.data.ActorPoolStrategy(size=cfg.search_actors),
        batch_size=cfg.search_batch_rows,
        batch_format="pyarrow",
        # faiss' OpenMP threads use the node's cores whatever Ray reserves. Reserving none keeps a
        # 2-CPU node able to run the embedding actor (1 CPU) and the fetch/decode/write tasks
        # (1 CPU each) next to it: with half a CPU reserved the tasks found 0.5 free and the job
        # stalled (seen in the full suite)
        num_cpus=SEARCH_ACTOR_CPUS,
        udf_modifying_row_count=True,
    )
    return ds, expected


def _finish(
    cfg: SearchJobConfig,
    storage: Storage,
    out: str,
    info: IndexInfo,
    expected: int,
    clock: RunClock,
    staged: list[str],
    lease: Lease,
) -> SearchJobSummary:
    """Count the hit rows (one per query: its first hit or its error), publish, record."""

    def account(staged: list[str]) -> Outcome:
        columns = ["query_id", "rank", "status", "error", "error_class"]
        table = read_files(staged, storage, columns) if staged else None
        if table is not None:
            # one row per query: its first hit or its error row
            first = pc.or_kleene(
                pc.equal(table.column("rank"), 1), pc.not_equal(table.column("status"), "ok")
            )
            counts = count_rows(table.filter(pc.fill_null(first, False)), "query_id")
        else:
            counts = Counts(0, {}, {}, [])
        if counts.rows != expected:
            raise JobFailed(
                f"accounting error: {expected} queries but the results hold {counts.rows} "
                "(an empty gallery has no hits to return)"
            )
        return Outcome(counts, table.num_rows if table is not None else 0, table)

    def facts(outcome: Outcome, generation: str) -> dict[str, Any]:
        seconds = clock.seconds()
        return {
            "index": cfg.index,
            "index_generation": info.generation,
            "k": cfg.k,
            "hits": outcome.rows,
            "queries_per_second": outcome.counts.rows / seconds if seconds > 0 else 0.0,
            "out": out,
            "results_uri": join(out, "results"),
            "generation": generation,
        }

    tail = Tail(
        command="reid search",
        out=out,
        storage=storage,
        limits=Limits(cfg.max_error_rate, cfg.max_infra_error_rate),
        what="queries",
        account=account,
        facts=facts,
        run_extra={"config": asdict(cfg)},
        commit={"index": cfg.index, "index_generation": info.generation},
        lease=lease,
        table=table_step(
            cfg.table,
            cfg.catalog,
            "reid search",
            storage,
            clock,
            lambda outcome: {
                "vbatch.index": cfg.index,
                "vbatch.index-generation": info.generation or "",
                OUT: out,
                "vbatch.queries": outcome.counts.rows,
                "vbatch.hits": outcome.rows,
            },
        ),
    )
    record, outcome = finish(tail, clock, staged)
    counts = outcome.counts
    return SearchJobSummary(
        queries=counts.rows,
        failed=counts.errors,
        hits=outcome.rows,
        seconds=record["seconds"],
        results_uri=record["results_uri"],
        sample_errors=counts.sample_errors,
        record=record,
    )
