"""The option groups the commands share, and the argument types.

Every command module builds its parser from these, so that an option means the same thing, with
the same help and default, wherever it appears. Nothing here imports a framework: ``vbatch
--help`` answers at once.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable
from typing import Any

from vbatch.jobs.limits import DEFAULT_MAX_ERROR_RATE, DEFAULT_MAX_INFRA_ERROR_RATE, Limits
from vbatch.operators.defaults import DEFAULT_RETRY_SECONDS

EPILOG = textwrap.dedent(
    """\
    Exit status: 0 finished (error rows at most --max-error-rate), 3 finished and published with
    more error rows, 1 failed as a whole (nothing new published), 2 usage error.
    URIs: local paths, file://… or s3://bucket/key. S3 credentials come from the standard AWS
    environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, …); the endpoint from
    --s3-endpoint or AWS_ENDPOINT_URL. Ray: local by default; --address or RAY_ADDRESS joins a cluster.
    """
)


class Parser(argparse.ArgumentParser):
    """No abbreviated options: ``--model`` must not silently mean ``--model-dir``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)


def add_job_parser(
    sub: argparse._SubParsersAction, name: str, help: str, description: str, **kwargs: Any
) -> argparse.ArgumentParser:
    """A job command's parser: its description kept as written, the exit-status epilog."""
    return sub.add_parser(
        name,
        help=help,
        description=description,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kwargs,
    )


# -- argument types --------------------------------------------------------------------------------
def int_at_least(least: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``least``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {least}, got {text!r}"
            ) from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def resource(text: str) -> tuple[str, float]:
    """argparse type: ``NAME=N``, a custom Ray resource and its amount (> 0)."""
    name, sep, amount = text.partition("=")
    try:
        value = float(amount)
    except ValueError:
        value = 0.0
    if not sep or not name or value <= 0:
        raise argparse.ArgumentTypeError(f"expected NAME=N with N > 0, got {text!r}")
    return name, value


# -- option groups ---------------------------------------------------------------------------------
def add_common(p: argparse.ArgumentParser, ray: bool = True) -> None:
    """--s3-endpoint, --io-retry-seconds, --address (``ray``: commands that run on Ray), -v."""
    p.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="S3-compatible endpoint (default: AWS_ENDPOINT_URL or AWS)",
    )
    p.add_argument(
        "--io-retry-seconds",
        type=float,
        metavar="S",
        help=(
            "retry transient storage errors (connection, timeout, 5xx, throttling) for up to S "
            f"seconds per operation before a row is failed as an infrastructure error "
            f"(default: VBATCH_IO_RETRY_SECONDS or {DEFAULT_RETRY_SECONDS:g})"
        ),
    )
    if ray:
        p.add_argument(
            "--address",
            metavar="ADDR",
            help="Ray cluster to join (default: RAY_ADDRESS, else local Ray)",
        )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def add_pool(
    p: argparse.ArgumentParser,
    batch_help: str = "images per model call (default: per model and device)",
) -> None:
    """The model stage's actor pool: batch, replicas, GPUs, device, threads, placement."""
    g = p.add_argument_group("actor pool (defaults depend on the hardware; see README)")
    g.add_argument("--batch-size", type=int, metavar="N", help=batch_help)
    g.add_argument(
        "--actors",
        type=int,
        metavar="N",
        help="model replicas at most (default: one per GPU the cluster can have, else 1)",
    )
    g.add_argument(
        "--gpus-per-actor",
        type=float,
        metavar="G",
        help="GPUs per replica (default: 1 on a GPU device, else 0)",
    )
    g.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help=(
            "auto: GPUs when the cluster has them or its autoscaler can start them, else CPU; "
            "cuda: GPU actors even before a GPU node is up (default auto)"
        ),
    )
    g.add_argument(
        "--threads-per-actor",
        type=int,
        metavar="N",
        help="torch threads per replica (default: cores / actors on CPU)",
    )
    g.add_argument(
        "--actor-resource",
        action="append",
        type=resource,
        metavar="NAME=N",
        dest="actor_resources",
        help=(
            "a custom Ray resource each replica requests (repeatable), e.g. gpu_node=1: pins the "
            "model actors to the nodes started with it (ray start --resources)"
        ),
    )
    add_forward_s3_env(g)


def add_forward_s3_env(g: argparse._ActionsContainer) -> None:
    g.add_argument(
        "--forward-s3-env",
        action="store_true",
        help=(
            "pass the driver's AWS_* variables (credentials, region, AWS_ENDPOINT_URL) to the "
            "job's workers through Ray's runtime_env; off by default: workers use their own "
            "credentials (instance role, a Secret in the pod spec)"
        ),
    )


def add_index_workers(p: argparse.ArgumentParser) -> None:
    """``--workers`` of ``reid index|add`` (and ``--forward-s3-env`` for them)."""
    g = p.add_argument_group("Ray workers")
    g.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        metavar="N",
        help=(
            "encode and add the embeddings in N shards, each in its own Ray task, then merge "
            "them in one more task (the same index as one process builds, byte for byte); "
            "default 1: everything in this process, without Ray"
        ),
    )
    add_forward_s3_env(g)


def add_precision(g: argparse._ActionsContainer, models: tuple[str, ...]) -> None:
    """``--precision`` of a job that runs ``models``; its default is each model's own."""
    from vbatch.models.precision import PRECISION_CHOICES
    from vbatch.models.registry import REGISTRY

    defaults = ", ".join(
        f"{m} {REGISTRY[m].default_precision if 'precision' in REGISTRY[m].options else 'fp32 only'}"
        for m in models
    )
    g.add_argument(
        "--precision",
        choices=list(PRECISION_CHOICES),
        metavar="{" + ",".join(PRECISION_CHOICES) + "}",
        help="the model's numeric precision on CPU and GPU: fp32 (the reference's, bit for bit "
        "what parity is proven at), bf16, fp16 (GPU only), or auto: bf16 where the device runs "
        "it natively (CPUs with AMX or AVX512-BF16, CUDA compute capability >= 8.0), else fp32. "
        f"Default per model: {defaults} (docs/BENCHMARKS.md, 'bf16 on CPU'). What was chosen "
        "and why is in the summary; rows record it in model_version (e.g. <hash>+bf16)",
    )


def add_reuse(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--reuse",
        metavar="URI",
        help=(
            "an earlier run's --out (e.g. last night's, or this --out itself), or an Iceberg table "
            "as iceberg:NAMESPACE.TABLE (its current snapshot, in --catalog): rows whose image_id, "
            "uri and content fingerprint match an ok row there, run with the same model and options, "
            "are carried forward (result row copied, products copied server-side into --out) without "
            "being fetched, decoded or inferred. Fingerprint: the manifest's content_hash or etag "
            "column, else the object's ETag (S3) or size + mtime (local) from one listing per folder. "
            "Recorded in source_fingerprint for the next run; a folder with no finished run reuses "
            "nothing. See README, Nightly runs"
        ),
    )


def add_report_option(
    p: argparse.ArgumentParser, what: str = "<out>/report/index.html with N sample images"
) -> None:
    p.add_argument(
        "--report-samples",
        type=int,
        default=48,
        metavar="N",
        help=f"write {what} at the end (default 48, at most 24 for re-ID; 0: no report). A "
        "report that fails is a warning, never a failed job",
    )


def add_run_arguments(p: argparse.ArgumentParser, rows: bool = True) -> None:
    """``--summary-json`` (every job command) and, for row jobs, the error-rate limits."""
    g = p.add_argument_group("run summary and exit status (0 ok, 1 failed, 3 too many error rows)")
    g.add_argument(
        "--summary-json",
        metavar="PATH|-",
        help="write the run's summary as JSON to PATH (local or s3://), or as the last line of "
        "stdout with -",
    )
    if not rows:
        return
    g.add_argument(
        "--max-error-rate",
        type=float,
        default=DEFAULT_MAX_ERROR_RATE,
        metavar="F",
        help=f"exit 3 when more than this fraction of rows are error rows (default {DEFAULT_MAX_ERROR_RATE})",
    )
    g.add_argument(
        "--max-infra-error-rate",
        type=float,
        default=DEFAULT_MAX_INFRA_ERROR_RATE,
        metavar="F",
        help="fail (exit 1, publish nothing) when more than this fraction of rows hit "
        f"infrastructure errors (default {DEFAULT_MAX_INFRA_ERROR_RATE})",
    )


def add_row_job(p: argparse.ArgumentParser, batch_help: str | None = None) -> None:
    """What every row job (``segment``, ``video``, ``reid embed``, ``reid search``) takes besides
    its own options: the actor pool, the common options, the run summary and limits, the lease."""
    if batch_help is None:
        add_pool(p)
    else:
        add_pool(p, batch_help=batch_help)
    add_common(p)
    add_run_arguments(p)
    g = p.add_argument_group(
        "lakehouse (pip install 'vbatch[iceberg]'; README, Writing to Iceberg)"
    )
    g.add_argument(
        "--table",
        metavar="NAMESPACE.TABLE",
        help="also commit the result rows to this Apache Iceberg table, upserted by the job's key "
        "(image_id; video_id, query_index, frame_index; query_id, rank), one snapshot per run "
        "whose properties record the run; created on first use. Products stay under --out",
    )
    g.add_argument(
        "--catalog",
        default="default",
        metavar="NAME",
        help="the pyiceberg catalog of --table, configured as pyiceberg does: ~/.pyiceberg.yaml "
        "or PYICEBERG_CATALOG__<NAME>__<KEY> variables (default: default)",
    )
    p.add_argument(
        "--break-lease",
        action="store_true",
        help="take over --out from another run that holds its lease (<out>/_LEASE) and is known "
        "to be dead; a lease whose run died on this host, or with no heartbeat for 10 minutes, "
        "is taken over without it. One run per --out at a time: a second run exits 1",
    )


# -- from arguments to configurations -------------------------------------------------------------
def limits_of(args: argparse.Namespace) -> Limits:
    return Limits(
        getattr(args, "max_error_rate", DEFAULT_MAX_ERROR_RATE),
        getattr(args, "max_infra_error_rate", DEFAULT_MAX_INFRA_ERROR_RATE),
    )


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The fields of :class:`vbatch.jobs.config.RunOptions` (placement, pool, error limits) from
    a row job's arguments."""
    limits = limits_of(args)
    pool = ("batch_size", "actors", "gpus_per_actor", "threads_per_actor", "device")
    return {k: getattr(args, k) for k in ("s3_endpoint", "address", *pool)} | {
        "forward_s3_env": args.forward_s3_env,
        "break_lease": args.break_lease,
        "table": args.table,
        "catalog": args.catalog,
        "actor_resources": dict(args.actor_resources) if args.actor_resources else None,
        "max_error_rate": limits.max_error_rate,
        "max_infra_error_rate": limits.max_infra_error_rate,
    }


def job_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments every manifest → model → outputs job shares (segment, reid embed, video):
    its inputs and output, and :func:`run_options`."""
    names = ("manifest", "model_dir", "out", "limit")
    return {k: getattr(args, k) for k in names} | run_options(args)
