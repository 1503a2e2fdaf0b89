"""Provenance and file layout of the matting model directory.

The network is ModelScope's frozen TensorFlow graph, run as ONNX: there is no architecture to
configure, so :class:`MattingFiles` holds only where things are and the pipeline's working range.
The ``TINY`` twin of the other packages is the demo graph of :mod:`vbatch.models.matting.modeldir`.
"""

from __future__ import annotations

from dataclasses import dataclass

from vbatch.models.entry import ModelEntry


@dataclass(frozen=True)
class MattingFiles:
    """Provenance and file layout of the matting model directory (no architecture: it is a graph)."""

    modelscope_id: str = "damo/cv_unet_image-matting"
    #: ModelScope's ``ModelFile.TF_GRAPH_FILE``
    graph_file: str = "tf_graph.pb"
    #: written next to the graph by ``vbatch matting convert``
    onnx_file: str = "model.onnx"
    meta_file: str = "onnx_meta.json"
    #: tensor names in the TensorFlow graph (the pipeline's feed and fetch)
    input_tensor: str = "input_image:0"
    output_tensor: str = "output_png:0"
    #: long side above which images are matted downscaled (the model card's working range)
    max_side: int = 2000


MATTING = MattingFiles()
#: the names every vbatch model package's config declares (the "weights" are the converted graph)
MODELSCOPE_ID, WEIGHTS_FILE = MATTING.modelscope_id, MATTING.onnx_file


#: what the pipeline needs to know about this model (vbatch.models.registry collects it)
ENTRY = ModelEntry(
    name="matting",
    module="vbatch.models.matting",
    output="rgba",
    modelscope_id=MODELSCOPE_ID,
    summary="portrait matting (ModelScope's TensorFlow graph, run by ONNX Runtime)",
    # ONNX Runtime has its own thread pool: it gets the actor's share of the cores
    options=("threads", "max_side"),
    transform_options=("max_side",),
    # the graph takes one image at a time; the batch only amortises Ray's per-call overhead
    batch_cpu=4,
    batch_gpu=8,
    actor_memory_gb=2.0,
    metric_kind="matte",
    visual="matte",
)
