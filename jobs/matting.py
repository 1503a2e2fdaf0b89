"""``vbatch matting convert``: ModelScope's TensorFlow matting graph → ONNX, checked against TensorFlow.

Runs once per model directory, on a machine with the ``convert`` extra (TensorFlow, tf2onnx);
workers only ever load the ONNX file. A model directory on S3 is converted locally and the ONNX
file (with ``onnx_meta.json``) is uploaded next to ``tf_graph.pb``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from vbatch.operators.storage import Storage, is_remote, join, parent


def run_convert(
    model_dir: str,
    storage: Storage,
    out: str | None = None,
    check_images: list[str] | None = None,
    tolerance: int | None = None,
    force: bool = False,
) -> str:
    """Convert and check; returns the report's summary. Raises ``ConversionError`` on failure."""
    from vbatch.models.matting.convert import DEFAULT_TOLERANCE, convert_graph

    local_dir = storage.localize_dir(model_dir)
    images = None
    if check_images:
        tmp = Path(tempfile.mkdtemp(prefix="vbatch-check-"))
        images = [
            storage.get_file(uri, tmp / f"{i}-{Path(uri).name}")
            for i, uri in enumerate(check_images)
        ]
    target = out or join(model_dir, "model.onnx")
    local_out = (
        Path(target)
        if not is_remote(target)
        else Path(tempfile.mkdtemp(prefix="vbatch-onnx-")) / "model.onnx"
    )
    report = convert_graph(
        local_dir,
        local_out,
        images,
        tolerance=DEFAULT_TOLERANCE if tolerance is None else tolerance,
        force=force,
    )
    if is_remote(target):
        storage.put_file(local_out, target)
        meta = local_out.with_name("onnx_meta.json")
        if meta.exists():
            storage.put_file(meta, join(parent(target), "onnx_meta.json"))
    return f"{report.summary()}\nwritten: {target}"
