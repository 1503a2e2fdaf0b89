"""The ``vbatch`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
from typing import Any

from vbatch.jobs.failure import describe_failure
from vbatch.jobs.summary import EXIT_USAGE, add_run_arguments, limits_of, run_command
from vbatch.models import REGISTRY
from vbatch.operators.decode import DEFAULT_MAX_PIXELS
from vbatch.operators.images import DECODE_MODES
from vbatch.operators.storage import DEFAULT_RETRY_SECONDS

logger = logging.getLogger("vbatch")

_EPILOG = textwrap.dedent(
    """\
    Exit status: 0 finished (error rows at most --max-error-rate), 3 finished and published with
    more error rows, 1 failed as a whole (nothing new published), 2 usage error.
    URIs: local paths, file://… or s3://bucket/key. S3 credentials come from the standard AWS
    environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, …); the endpoint from
    --s3-endpoint or AWS_ENDPOINT_URL. Ray: local by default; --address or RAY_ADDRESS joins a cluster.
    """
)


class _Parser(argparse.ArgumentParser):
    """No abbreviated options: ``--model`` must not silently mean ``--model-dir``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)


def _common(p: argparse.ArgumentParser, ray: bool = True) -> None:
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


def _pool(
    p: argparse.ArgumentParser,
    batch_help: str = "images per model call (default: per model and device)",
) -> None:
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
        type=_resource,
        metavar="NAME=N",
        dest="actor_resources",
        help=(
            "a custom Ray resource each replica requests (repeatable), e.g. gpu_node=1: pins the "
            "model actors to the nodes started with it (ray start --resources)"
        ),
    )
    _forward_s3_env(g)


def _forward_s3_env(g: argparse._ActionsContainer) -> None:
    g.add_argument(
        "--forward-s3-env",
        action="store_true",
        help=(
            "pass the driver's AWS_* variables (credentials, region, AWS_ENDPOINT_URL) to the "
            "job's workers through Ray's runtime_env; off by default: workers use their own "
            "credentials (instance role, a Secret in the pod spec)"
        ),
    )


def _index_workers(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray workers")
    g.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help=(
            "encode and add the embeddings in N shards, each in its own Ray task, then merge "
            "them in one more task (the same index as one process builds, byte for byte); "
            "default 1: everything in this process, without Ray"
        ),
    )
    _forward_s3_env(g)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vbatch",
        description="Batch inference for computer-vision models on Ray Data.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(
        parser_class=_Parser, dest="command", metavar="COMMAND", required=True
    )

    tasks = ", ".join(
        f"{k} ({v.summary})" for k, v in REGISTRY.items() if v.output in ("mask", "rgba")
    )
    seg = sub.add_parser(
        "segment",
        help="one mask per image of a Parquet manifest",
        description=(
            "Run a segmentation model over an image manifest (Parquet: image_id, uri, any other columns "
            "pass through). Writes <out>/masks/<image_id>.png and <out>/results/ (a committed table: "
            "<out>/_LATEST names the generation folder results/<run id> holding its Parquet files) with one row per "
            f"manifest row (status ok|error, error_class). Tasks: {tasks}. A gt_mask_uri column "
            "(ground-truth masks) adds per-image quality metrics (gt_* columns; gt_error when a "
            "ground truth cannot be used). Ends by writing <out>/report/index.html."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    seg.add_argument(
        "--task",
        required=True,
        choices=[k for k, v in REGISTRY.items() if v.output in ("mask", "rgba")],
    )
    seg.add_argument(
        "--manifest", required=True, metavar="URI", help="Parquet file or folder of Parquet files"
    )
    seg.add_argument("--model-dir", required=True, metavar="URI", help="ModelScope model directory")
    seg.add_argument("--out", required=True, metavar="URI", help="output folder")
    seg.add_argument("--limit", type=int, metavar="N", help="only the first N manifest rows")
    seg.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help=f"refuse images with more pixels (decompression bombs; default {DEFAULT_MAX_PIXELS:,}, Pillow's limit)",
    )
    g = seg.add_argument_group("model options")
    g.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="shop-seg on GPU: autocast precision (default fp32; bf16 halves activation memory)",
    )
    g.add_argument(
        "--max-side",
        type=int,
        default=2000,
        metavar="PX",
        help="matting: longer images run downscaled to this long side, mattes come back at full size (default 2000)",
    )
    g.add_argument(
        "--background",
        metavar="COLOR|URI",
        help="matting: also write <out>/composites/<id>.jpg over this colour (#RRGGBB or r,g,b) or image",
    )
    g.add_argument(
        "--decode",
        choices=list(DECODE_MODES),
        default="exact",
        help="exact (default): the reference preprocessing, bit for bit; fast: JPEGs decoded at a reduced DCT scale, then the model's resize (approximate, a fraction of the CPU); gpu: JPEGs decoded and resized in the model actor, on its GPU (nvJPEG; on its CPU when it has none), within 1 grey level of exact on the CPU",
    )
    g.add_argument(
        "--mask-size",
        choices=["full", "model"],
        default="full",
        help="salient/shop-seg: full (default) writes masks at the image's size; model at the network's resolution (width/height in the results stay the original's)",
    )
    _reuse(seg)
    _pool(seg)
    _common(seg)
    add_run_arguments(seg)
    _report_option(seg)

    vid = sub.add_parser(
        "video",
        help="referring video object segmentation (MTTR): masks per video, query and frame",
        description=(
            "Segment the objects that text queries refer to in every frame of the videos of a Parquet "
            "manifest (video_id, uri, queries: list<string>, optional start_s/end_s), streamed window by "
            "window. Writes <out>/frames/<video_id>/<query_index>/<frame_index>.png and "
            "<out>/results/ (a committed table, see README) with one row per (video, query, frame) and "
            "error rows (a bad video, or a query longer than the text encoder's 512 tokens, fails "
            "alone). Rerunning the same command after a crash resumes it: the windows whose result "
            "rows the crashed run had staged are not decoded or inferred again (see README, Resume)."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    vid.add_argument("--manifest", required=True, metavar="URI", help="Parquet file or folder")
    vid.add_argument("--model-dir", required=True, metavar="URI", help="ModelScope model directory")
    vid.add_argument("--out", required=True, metavar="URI", help="output folder")
    vid.add_argument("--limit", type=int, metavar="N", help="only the first N manifest rows")
    vid.add_argument(
        "--render",
        action="store_true",
        help="also write <out>/renders/<video_id>.mp4 overlays (query texts drawn in ASCII: "
        "emoji as [their name])",
    )
    vid.add_argument(
        "--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="GPU autocast"
    )
    _pool(vid, batch_help="windows (of the model's window_size frames) per model call (default 1)")
    _common(vid)
    add_run_arguments(vid)
    _report_option(vid)

    mat = sub.add_parser(
        "matting", help="matting model tools (convert the TensorFlow graph to ONNX)"
    )
    mat_sub = mat.add_subparsers(
        parser_class=_Parser, dest="matting_command", metavar="COMMAND", required=True
    )
    conv = mat_sub.add_parser(
        "convert",
        help="convert tf_graph.pb to model.onnx once, checked against TensorFlow",
        description=(
            "Convert ModelScope's damo/cv_unet_image-matting TensorFlow graph (tf_graph.pb) to ONNX for the "
            "workers, run both on sample images and report the largest difference. Needs the convert extra: "
            "pip install 'vbatch[convert]' (TensorFlow is never needed on workers)."
        ),
    )
    conv.add_argument(
        "--model-dir", required=True, metavar="URI", help="folder holding tf_graph.pb"
    )
    conv.add_argument(
        "--out", metavar="URI", help="ONNX file to write (default: <model-dir>/model.onnx)"
    )
    conv.add_argument(
        "--check-image",
        action="append",
        metavar="URI",
        help="image to compare TF and ONNX on (repeatable)",
    )
    conv.add_argument(
        "--tolerance", type=int, metavar="N", help="largest accepted alpha difference (grey levels)"
    )
    conv.add_argument("--force", action="store_true", help="convert again even if up to date")
    _common(conv)

    reid = sub.add_parser(
        "reid",
        help="person re-ID: embed, index, add, search, eval",
        description="Person re-ID with PASS ViT-B/16 (damo/cv_passvitb_image-reid-person_market) and a FAISS gallery.",
    )
    rsub = reid.add_subparsers(
        parser_class=_Parser, dest="reid_command", metavar="COMMAND", required=True
    )
    emb = rsub.add_parser(
        "embed",
        help="L2-normalised 1536-d embeddings for every row of an image manifest",
        description=(
            "Writes <out>/results/*.parquet: image_id, status, error, embedding (1536 float32, L2-normalised), "
            "model_version and your columns (e.g. person_id, camera_id), one row per manifest row."
        ),
    )
    emb.add_argument("--manifest", required=True, metavar="URI")
    emb.add_argument("--model-dir", required=True, metavar="URI", help="ModelScope model directory")
    emb.add_argument("--out", required=True, metavar="URI")
    emb.add_argument("--limit", type=int, metavar="N")
    _reuse(emb)
    _pool(emb)
    _common(emb)
    add_run_arguments(emb)
    _report_option(emb)
    idx = rsub.add_parser(
        "index",
        help="build a FAISS gallery index from embeddings",
        description=(
            "Builds an inner-product FAISS index of the ok rows of an embeddings table, an id map "
            "(FAISS row -> image_id) and index.json. Without --factory, the index is chosen from the gallery "
            "size and --memory-budget as the FAISS guidelines recommend (flat for small galleries, IVF with a "
            "trained coarse quantizer; when flat vectors do not fit the budget, the largest code that does: "
            "SQ8, RaBitQ with 7 down to 2 bits per dimension, then PQ). Measured recall and sizes: "
            "docs/BENCHMARKS.md."
        ),
    )
    idx.add_argument(
        "--embeddings", required=True, metavar="URI", help="output of `reid embed` (folder or file)"
    )
    idx.add_argument("--out", required=True, metavar="URI", help="index folder")
    idx.add_argument(
        "--factory", metavar="STR", help="explicit FAISS index factory string, e.g. IVF4096,PQ96"
    )
    idx.add_argument(
        "--memory-budget",
        metavar="SIZE",
        help="e.g. 2GB: the index must fit (default: flat if it fits 4 GB)",
    )
    idx.add_argument(
        "--refine",
        choices=["auto", "on", "off"],
        default="auto",
        help="keep the full vectors beside the index (refine/*.npy, memory-mapped, outside the "
        "budget) and re-rank the top k x r with them; auto: on for an automatic plan with a "
        "compressed code (default auto)",
    )
    idx.add_argument(
        "--refine-dtype",
        choices=["float32", "float16"],
        default="float32",
        help="refinement vectors: float32 (exact re-ranking) or float16 (half the disk)",
    )
    _index_workers(idx)
    _common(idx)
    add_run_arguments(idx, rows=False)
    _report_option(idx, "<out>/report/index.html: the index and N sample gallery images searched")
    add = rsub.add_parser(
        "add", help="add a new day's embeddings to an existing index (no retraining)"
    )
    add.add_argument(
        "--index", required=True, metavar="URI", help="index folder written by `reid index`"
    )
    add.add_argument(
        "--embeddings",
        required=True,
        metavar="URI",
        help="the new embeddings (`reid embed` output); image_ids already indexed are skipped",
    )
    _index_workers(add)
    _common(add)
    add_run_arguments(add, rows=False)
    _report_option(add, "<index>/report/index.html: the index and N sample gallery images searched")
    srch = rsub.add_parser(
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
    srch.add_argument(
        "--index", required=True, metavar="URI", help="index folder written by `reid index`"
    )
    q = srch.add_mutually_exclusive_group(required=True)
    q.add_argument("--image", action="append", metavar="URI", help="query image (repeatable)")
    q.add_argument("--manifest", metavar="URI", help="manifest of query images (embedded on Ray)")
    q.add_argument(
        "--embeddings", metavar="URI", help="already embedded queries (`reid embed` output)"
    )
    srch.add_argument(
        "--model-dir", metavar="URI", help="reid model directory (for --image / --manifest)"
    )
    srch.add_argument(
        "--k", type=_positive_int, default=10, metavar="K", help="hits per query, >= 1 (default 10)"
    )
    srch.add_argument(
        "--out",
        metavar="URI",
        help="output folder of the batch job (--manifest, --embeddings); with --image a Parquet "
        "file or folder for the hits",
    )
    srch.add_argument(
        "--nprobe", type=_positive_int, metavar="N", help="IVF lists to visit (default: tuned)"
    )
    srch.add_argument(
        "--rerank",
        type=_non_negative_int,
        metavar="R",
        help="re-rank the top k x R with the full vectors kept beside the index; 0: off "
        "(default: the tuned factor of a gallery built with them)",
    )
    srch.add_argument(
        "--search-actors",
        type=_positive_int,
        default=1,
        metavar="N",
        help="search actors of the batch job (each maps the gallery once per node; default 1)",
    )
    srch.add_argument("--limit", type=int, metavar="N", help="only the first N manifest rows")
    srch.add_argument(
        "--allow-model-mismatch",
        action="store_true",
        help="search even if the queries' model_version differs from the gallery's",
    )
    _pool(srch)
    _common(srch)
    add_run_arguments(srch)
    _report_option(srch, "with --out: <out>/report/index.html with N sample queries and their hits")
    ev = rsub.add_parser(
        "eval",
        help="mAP and CMC (Market-1501 protocol)",
        description=(
            "mAP and CMC rank-1/5/10 of query embeddings against gallery embeddings; both tables need "
            "embedding, person_id (integers or strings of integers such as '0002') and camera_id; a status "
            "column is optional (rows not 'ok' are ignored). Same-identity same-camera gallery images are "
            "excluded per query; identity -1 is junk, 0 a distractor. Tables of different model_version, "
            "and ok rows with an invalid embedding, are refused."
        ),
    )
    ev.add_argument("--query", required=True, metavar="URI")
    ev.add_argument("--gallery", required=True, metavar="URI")
    ev.add_argument(
        "--json", action="store_true", help="print the metrics as one JSON object on stdout"
    )
    ev.add_argument(
        "--allow-model-mismatch",
        action="store_true",
        help="score even if query and gallery model_version differ",
    )
    _common(ev)
    add_run_arguments(ev, rows=False)

    bf = sub.add_parser(
        "backfill",
        help="run an image job over many date partitions in one Ray session",
        description=(
            "Run `segment` or `reid embed` once per date, in one Ray session: every {date} in the "
            "job's arguments (after --) becomes the partition's date (YYYY-MM-DD). Each partition is "
            "published atomically to its own --out with its own run.json and _SUCCESS; a rerun skips "
            "the partitions whose _SUCCESS records a finished run (exit 0 or 3) of the same "
            "configuration, and a partition that crashed resumes. The partitions to run go through one "
            "pipeline and one actor pool (actors start and load the model once); each partition is "
            "still counted, checked and published on its own. Exit status: the worst partition's "
            "(1 > 3 > 0)."
        ),
        epilog="example: vbatch backfill --dates 2026-10-01..2026-10-10 -- segment --task salient "
        "--manifest 's3://cat/{date}.parquet' --model-dir s3://models/salient --out 's3://cat/masks/{date}'",
    )
    bf.add_argument(
        "--dates",
        required=True,
        metavar="SPEC",
        help="FIRST..LAST (inclusive) or a comma-separated list of ISO dates",
    )
    bf.add_argument(
        "--force", action="store_true", help="also redo partitions that finished before"
    )
    bf.add_argument(
        "--separate",
        action="store_true",
        help="run the partitions one after another, each with its own actor pool (default: all "
        "through one pipeline and one actor pool)",
    )
    bf.add_argument(
        "--summary-json",
        metavar="PATH|-",
        help="write the backfill's summary (every partition's status) as JSON to PATH, or as the "
        "last line of stdout with -",
    )
    bf.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    bf.add_argument(
        "job",
        nargs=argparse.REMAINDER,
        metavar="-- JOB ARGS",
        help="the job command line: segment … or reid embed …, with {date} in --manifest and --out",
    )

    rep = sub.add_parser(
        "report",
        help="(re)build a run's visual QA report, <out>/report/index.html",
        description=(
            "Build <out>/report/ from what a finished job left on storage (its results table, "
            "run.json, products and inputs): the run at a glance, errors by class, a contact sheet "
            "of a deterministic sample, the images worth a look, distributions and, when the "
            "manifest had gt_mask_uri (gt_mask_dir for videos), quality metrics; for `reid search "
            "--out`, the gallery index and sample queries with their top hits. Given a `reid "
            "index` folder, the index's page (<index>/report/). One self-contained folder "
            "(index.html, thumbnails, plots) that works opened from disk or served from a bucket. "
            "Jobs write it at the end of every run; this rebuilds it (old runs, backfilled "
            "partitions) or compares two runs. Runs in this process (no Ray)."
        ),
    )
    rep.add_argument(
        "--out", required=True, metavar="URI", help="a finished job's --out, or an index folder"
    )
    rep.add_argument(
        "--report-samples",
        type=int,
        default=48,
        metavar="N",
        help="images in the contact sheet (default 48; re-ID queries: at most 24)",
    )
    rep.add_argument(
        "--compare",
        metavar="OTHER_OUT",
        help="another run of the same manifest (e.g. another model version): metric deltas and "
        "the images whose outputs changed most",
    )
    _common(rep, ray=False)

    env = sub.add_parser(
        "env",
        help="versions, GPUs, faiss and ONNX Runtime providers (for bug reports)",
        description=(
            "Print the versions of vbatch and the libraries it runs on, whether torch sees CUDA and "
            "which GPUs, faiss's GPU count, ONNX Runtime's providers and, with --address, the Ray "
            "cluster's nodes and resources."
        ),
    )
    env.add_argument("--address", metavar="ADDR", help="also describe this Ray cluster")
    env.add_argument("--json", action="store_true", help="print JSON instead of lines")
    env.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    demo = sub.add_parser(
        "demo",
        help="generate demo data and a random-weight model, run the job locally",
        description=(
            "Creates demo images, a Parquet manifest and model directories in ModelScope's layout with RANDOM "
            "weights (no weights can be downloaded here), runs the jobs on local Ray and prints where "
            "everything is. The masks show that the pipeline works, not what a trained model sees."
        ),
    )
    demo.add_argument(
        "--out", default="vbatch-demo", metavar="DIR", help="demo folder (default: ./vbatch-demo)"
    )
    demo.add_argument(
        "--images",
        type=int,
        default=24,
        metavar="N",
        help="number of generated images (default 24)",
    )
    _common(demo)
    return parser


def _image_job_config(args: argparse.Namespace, task: str):  # -> jobs.segment.ImageJobConfig
    """The image job's configuration from `segment` / `reid embed` arguments (options one lacks keep defaults)."""
    from vbatch.jobs.segment import ImageJobConfig

    extra = {
        k: getattr(args, k)
        for k in (
            "max_pixels",
            "max_side",
            "background",
            "precision",
            "decode",
            "mask_size",
            "reuse",
        )
        if hasattr(args, k)
    }
    return ImageJobConfig(task=task, **_job_arguments(args), **extra)


def _job_arguments(args: argparse.Namespace) -> dict:
    """The arguments every manifest → model → outputs job shares (segment, reid embed, video)."""
    names = ("manifest", "model_dir", "out", "limit", "s3_endpoint", "address")
    pool = ("batch_size", "actors", "gpus_per_actor", "threads_per_actor", "device")
    limits = limits_of(args)
    return {k: getattr(args, k) for k in names + pool} | {
        "forward_s3_env": args.forward_s3_env,
        "actor_resources": dict(args.actor_resources) if args.actor_resources else None,
        "max_error_rate": limits.max_error_rate,
        "max_infra_error_rate": limits.max_infra_error_rate,
    }


def _reuse(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--reuse",
        metavar="URI",
        help=(
            "an earlier run's --out (e.g. last night's, or this --out itself): rows whose image_id, "
            "uri and content fingerprint match an ok row there, run with the same model and options, "
            "are carried forward (result row copied, products copied server-side into --out) without "
            "being fetched, decoded or inferred. Fingerprint: the manifest's content_hash or etag "
            "column, else the object's ETag (S3) or size + mtime (local) from one listing per folder. "
            "Recorded in source_fingerprint for the next run; a folder with no finished run reuses "
            "nothing. See README, Nightly runs"
        ),
    )


def _resource(text: str) -> tuple[str, float]:
    """argparse type: ``NAME=N``, a custom Ray resource and its amount (> 0)."""
    name, sep, amount = text.partition("=")
    try:
        value = float(amount)
    except ValueError:
        value = 0.0
    if not sep or not name or value <= 0:
        raise argparse.ArgumentTypeError(f"expected NAME=N with N > 0, got {text!r}")
    return name, value


def _report_option(
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


def _int_at_least(least: int):
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


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _reid(args: argparse.Namespace, clock) -> dict:
    """Run a `reid` command; returns its summary (see jobs.summary.run_command)."""
    from vbatch.jobs import reid
    from vbatch.jobs.publish import read_table
    from vbatch.operators.storage import Storage, StorageOptions

    storage = Storage(StorageOptions(endpoint_url=args.s3_endpoint))
    if args.reid_command == "embed":
        summary = reid.run_embed(_image_job_config(args, "reid"), clock)
        print(summary.report())
        return summary.record
    if args.reid_command in ("index", "add"):
        from vbatch.operators.index import add_to_index, build_index

        if args.workers > 1:
            from vbatch.jobs.runtime import ensure_ray, refuse_local_paths_on_cluster

            ensure_ray(args.address, forward_s3_env=args.forward_s3_env)
            index_uri = args.out if args.reid_command == "index" else args.index
            refuse_local_paths_on_cluster(
                {
                    "--embeddings": args.embeddings,
                    "--out" if args.reid_command == "index" else "--index": index_uri,
                }
            )
        if args.reid_command == "index":
            info = build_index(
                args.embeddings,
                args.out,
                storage,
                factory=args.factory,
                memory_budget=args.memory_budget,
                refine=None if args.refine == "auto" else args.refine == "on",
                refine_dtype=args.refine_dtype,
                workers=args.workers,
            )
        else:
            info = add_to_index(args.index, args.embeddings, storage, workers=args.workers)
        print(info.to_json())
        return json.loads(info.to_json())
    if args.reid_command == "search" and args.out and (args.manifest or args.embeddings):
        from vbatch.jobs.reid_search import SearchJobConfig, run_search_job

        if args.manifest and not args.model_dir:
            raise ValueError("--model-dir is needed to embed query images")
        job = run_search_job(
            SearchJobConfig(
                index=args.index,
                out=args.out,
                embeddings=args.embeddings,
                embed=_image_job_config(args, "reid") if args.manifest else None,
                k=args.k,
                nprobe=args.nprobe,
                rerank=args.rerank,
                search_actors=args.search_actors,
                allow_model_mismatch=args.allow_model_mismatch,
                s3_endpoint=args.s3_endpoint,
                address=args.address,
                forward_s3_env=args.forward_s3_env,
                max_error_rate=args.max_error_rate,
                max_infra_error_rate=args.max_infra_error_rate,
            ),
            clock,
        )
        print(job.report())
        return job.record
    if args.reid_command == "search":
        from vbatch.jobs.summary import check_infrastructure, job_record
        from vbatch.operators.index import GalleryIndex

        if args.manifest:
            raise ValueError("--manifest runs as a batch job: give --out")
        index = GalleryIndex.open(args.index, storage)
        if args.embeddings:
            table = read_table(args.embeddings, storage)
            queries = reid.queries_from_table(table, index.info.dim, args.embeddings)
        elif not args.model_dir:
            raise ValueError("--model-dir is needed to embed query images")
        else:
            queries = reid.embed_images(args.image, args.model_dir, storage)
        reid.check_model_version(queries, index, args.allow_model_mismatch)
        failed = queries.failed
        if failed and len(failed) == len(queries.ids):
            first = "; ".join(f"{q}: {e}" for q, e in failed[:3])
            raise ValueError(f"all {len(failed)} queries failed, nothing to search ({first})")
        # failed queries are error rows: exit 3 above --max-error-rate, as for the batch job
        counts, limits = reid.search_counts(queries), limits_of(args)
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
            "reid search",
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
    if args.reid_command == "eval":
        import math

        from vbatch.operators.reid_eval import evaluate, read_embeddings

        result = evaluate(
            read_embeddings(args.query, storage),  # errors name the file and its row
            read_embeddings(args.gallery, storage),
            allow_model_mismatch=args.allow_model_mismatch,
        )
        # NaN (no query could be evaluated) is not JSON: null
        metrics = {
            k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in result.items()
            if k != "cmc"
        } | {"cmc": [None if math.isnan(v) else v for v in result["cmc"]]}
        if args.json:
            print(json.dumps(metrics))
            return metrics
        print(
            f"queries: {result['num_valid_query']} evaluated of {result['num_query']}\n"
            f"mAP     : {result['mAP']:.6f}\n"
            + "\n".join(
                f"{k:<8}: {result[k]:.6f}" for k in ("cmc@1", "cmc@5", "cmc@10") if k in result
            )
        )
        return {k: v for k, v in metrics.items() if k != "cmc"}
    raise ValueError(f"unknown reid command {args.reid_command!r}")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("botocore", "s3fs", "fsspec", "urllib3", "aiobotocore", "PIL", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


#: seconds between Ray Data's progress snapshots when stdout is not a terminal
NON_TTY_PROGRESS_SECONDS = 60


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Off a terminal (cron, CI) Ray Data logs an 11-line progress snapshot instead of drawing bars;
    # its default of one every 10 s floods the logs of a nightly job. Read at the first execution.
    os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", str(NON_TTY_PROGRESS_SECONDS))
    if getattr(args, "io_retry_seconds", None) is not None:
        # read by StorageOptions on the driver, which ships the value to every worker
        os.environ["VBATCH_IO_RETRY_SECONDS"] = str(args.io_retry_seconds)
    if args.command in ("segment", "video", "reid"):
        command = f"reid {args.reid_command}" if args.command == "reid" else args.command
        try:
            return run_command(command, args, lambda clock: _job(args, clock))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
    if args.command == "backfill":
        try:
            return _backfill(args)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
    try:
        if args.command == "matting":
            from vbatch.jobs.matting import run_convert
            from vbatch.operators.storage import Storage, StorageOptions

            storage = Storage(StorageOptions(endpoint_url=args.s3_endpoint))
            print(
                run_convert(
                    args.model_dir, storage, args.out, args.check_image, args.tolerance, args.force
                )
            )
            return 0
        if args.command == "report":
            from vbatch.jobs.report import build_report
            from vbatch.operators.storage import Storage, StorageOptions

            report = build_report(
                args.out,
                Storage(StorageOptions(endpoint_url=args.s3_endpoint)),
                samples=args.report_samples,
                compare=args.compare,
            )
            print(
                f"report: {report.index_uri} ({report.rows:,} rows; "
                f"{report.parquet_bytes / 1e6:.1f} MB of Parquet read, {report.rows_opened} rows "
                f"opened, {report.seconds:.1f} s)"
            )
            return 0
        if args.command == "env":
            from vbatch.jobs.env import collect_env, format_env

            info = collect_env(args.address)
            print(json.dumps(info, indent=2, default=str) if args.json else format_env(info))
            return 0
        if args.command == "demo":
            from vbatch.jobs.demo import run_demo

            return run_demo(args.out, num_images=args.images, address=args.address)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the whole job failed: one clear line, the traceback with -v
        if args.verbose:
            logger.exception("failed")
        print(f"vbatch {args.command}: error: {describe_failure(e)}", file=sys.stderr)
        return 1
    return EXIT_USAGE


def _backfill(args: argparse.Namespace) -> int:
    """``vbatch backfill``: the job per date in one session; exit status the worst partition's."""
    from dataclasses import asdict

    from vbatch.jobs.backfill import parse_dates, report, run_backfill
    from vbatch.jobs.summary import emit

    job = args.job[1:] if args.job[:1] == ["--"] else args.job
    parser = build_parser()
    if not job or job[0] not in ("segment", "reid") or (job[0] == "reid" and job[1:2] != ["embed"]):
        parser.error("backfill: give the job after --: segment … or reid embed …")
    try:
        dates = parse_dates(args.dates)
    except ValueError as e:
        parser.error(str(e))

    def config_of(a: argparse.Namespace) -> dict:
        return asdict(_image_job_config(a, "reid" if a.command == "reid" else a.task))

    def run_shared(parsed: list[argparse.Namespace], clocks: list) -> list[dict]:
        """The partitions through one pipeline and actor pool; their reports; their records."""
        from vbatch.jobs.segment import run_image_jobs
        from vbatch.jobs.summary import JobFailed, failed_record

        command = "reid embed" if parsed[0].command == "reid" else "segment"
        cfgs = [config_of_image(a) for a in parsed]
        try:
            results: list = run_image_jobs(cfgs, clocks, command)
        except PoolMismatch:
            raise
        except (
            Exception
        ) as e:  # the shared pipeline failed: every partition failed (staged rows stay)
            if args.verbose:
                logger.exception("failed")
            results = [e] * len(parsed)
        records = []
        for a, clock, result in zip(parsed, clocks, results, strict=True):
            if isinstance(result, Exception):
                print(
                    f"vbatch {command} ({a.out}): error: {describe_failure(result)}",
                    file=sys.stderr,
                )
                partial = result.record if isinstance(result, JobFailed) else None
                record = failed_record(command, clock, result, partial)
            else:
                print(result.report())
                record = result.record
                _write_report(a, record)
            records.append(record)
        return records

    def config_of_image(a: argparse.Namespace):
        return _image_job_config(a, "reid" if a.command == "reid" else a.task)

    from vbatch.jobs.segment import PoolMismatch

    try:
        summary = run_backfill(
            dates,
            job,
            parser.parse_args,
            _job,
            config_of,
            force=args.force,
            run_shared=None if args.separate else run_shared,
        )
    except Exception as e:  # before any partition ran (bad templates, no Ray)
        if args.verbose:
            logger.exception("failed")
        print(f"vbatch backfill: error: {describe_failure(e)}", file=sys.stderr)
        return 1
    print(report(summary))
    emit(summary, args.summary_json)
    return int(summary["exit_code"])


def _job(args: argparse.Namespace, clock) -> dict:
    """Run a job command (segment, video, reid …), print its report, write its visual report;
    returns its summary."""
    record = _run_job(args, clock)
    _write_report(args, record)
    return record


def _write_report(args: argparse.Namespace, record: dict) -> None:
    """``<out>/report/`` after a finished job (``--report-samples`` > 0); a failure is logged as
    a warning and never changes the job's exit status."""
    samples = getattr(args, "report_samples", 0)
    index = None
    if getattr(args, "command", None) == "reid" and args.reid_command in ("index", "add"):
        index = args.out if args.reid_command == "index" else args.index
    if samples <= 0 or not (record.get("out") or index):
        return
    try:
        from vbatch.jobs.report import build_report
        from vbatch.operators.storage import Storage, StorageOptions

        info = build_report(
            index or record["out"],
            Storage(StorageOptions(endpoint_url=args.s3_endpoint)),
            samples=samples,
        )
        # logged (stderr), not printed: stdout stays the job's report and --summary-json -
        logger.info("report: %s", info.index_uri)
    except Exception as e:
        logger.warning("the run's report could not be written: %s: %s", type(e).__name__, e)


def _run_job(args: argparse.Namespace, clock) -> dict:
    if args.command == "segment":
        from vbatch.jobs.segment import run_image_job

        summary = run_image_job(_image_job_config(args, args.task), clock)
        print(summary.report())
        return summary.record
    if args.command == "video":
        from vbatch.jobs.video import VideoConfig, run_video

        cfg = VideoConfig(render=args.render, precision=args.precision, **_job_arguments(args))
        video = run_video(cfg, clock)
        print(video.report())
        return video.record
    return _reid(args, clock)


if __name__ == "__main__":
    sys.exit(main())
