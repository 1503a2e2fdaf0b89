"""``vbatch matting convert``: ModelScope's matting graph to ONNX, once, checked against TensorFlow."""

from __future__ import annotations

import argparse
import sys

from vbatch.jobs.cli import options
from vbatch.jobs.cli.command import storage_of

NAME = "matting convert"
JOB = False


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    mat = sub.add_parser(
        "matting", help="matting model tools (convert the TensorFlow graph to ONNX)"
    )
    mat_sub = mat.add_subparsers(
        parser_class=options.Parser, dest="matting_command", metavar="COMMAND", required=True
    )
    p = mat_sub.add_parser(
        "convert",
        help="convert tf_graph.pb to model.onnx once, checked against TensorFlow",
        description=(
            "Convert ModelScope's damo/cv_unet_image-matting TensorFlow graph (tf_graph.pb) to ONNX for the "
            "workers, run both on sample images and report the largest difference. Needs the convert extra: "
            "pip install 'vbatch[convert]' (TensorFlow is never needed on workers)."
        ),
    )
    p.set_defaults(command_module=sys.modules[__name__])
    p.add_argument("--model-dir", required=True, metavar="URI", help="folder holding tf_graph.pb")
    p.add_argument(
        "--out", metavar="URI", help="ONNX file to write (default: <model-dir>/model.onnx)"
    )
    p.add_argument(
        "--check-image",
        action="append",
        metavar="URI",
        help="image to compare TF and ONNX on (repeatable)",
    )
    p.add_argument(
        "--tolerance", type=int, metavar="N", help="largest accepted alpha difference (grey levels)"
    )
    p.add_argument("--force", action="store_true", help="convert again even if up to date")
    options.add_common(p)
    return mat


def config(args: argparse.Namespace) -> dict:
    """The keyword arguments of :func:`vbatch.jobs.matting.run_convert` (but the storage)."""
    return {
        "out": args.out,
        "check_images": args.check_image,
        "tolerance": args.tolerance,
        "force": args.force,
    }


def run(args: argparse.Namespace) -> int:
    from vbatch.jobs.matting import run_convert

    print(run_convert(args.model_dir, storage_of(args), **config(args)))
    return 0
