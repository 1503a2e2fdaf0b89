"""The matting predictor and :func:`load`: ``model.onnx`` in an ONNX Runtime session.

Reference: ModelScope ``modelscope/pipelines/cv/image_matting_pipeline.py``: one image per session
run, at its own size (see :mod:`vbatch.models.matting.model`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from vbatch.models.base import Predictor, resolve_device
from vbatch.models.matting.config import MATTING
from vbatch.models.matting.model import (
    ORT_DTYPES,
    ModelDirError,
    convert_command,
    providers_for,
    resolve_onnx,
    session_options,
)
from vbatch.models.matting.transforms import MattingTransforms

logger = logging.getLogger(__name__)


class MattingPredictor(Predictor):
    """``model.onnx`` in an ONNX Runtime session; one image per session run."""

    name = "matting"
    transforms: MattingTransforms

    def __init__(
        self,
        onnx_path: Path,
        model_version: str,
        device: torch.device,
        threads: int | None = None,
        max_side: int = MATTING.max_side,
    ) -> None:
        try:
            self.session = ort.InferenceSession(
                str(onnx_path),
                sess_options=session_options(threads),
                providers=providers_for(device),
            )
        except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/... types
            raise ModelDirError(
                f"cannot load {onnx_path} with ONNX Runtime ({e}); re-create it with "
                f"{convert_command(onnx_path.parent)} --force"
            ) from e
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelDirError(
                f"{onnx_path}: expected one input image and one RGBA output, found inputs "
                f"{[i.name for i in inputs]} and outputs {[o.name for o in outputs]}"
            )
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        # The real graph's placeholder dtype is whatever ModelScope froze (its pipeline feeds
        # float64 and lets the session cast); feed the dtype the converted graph declares.
        self.input_dtype = ORT_DTYPES.get(inputs[0].type)
        if self.input_dtype is None or outputs[0].type != "tensor(uint8)":
            raise ModelDirError(
                f"{onnx_path}: expected a float image input and a uint8 RGBA output, found "
                f"{inputs[0].type} -> {outputs[0].type}"
            )
        used = self.session.get_providers()[0]
        self.device = (
            torch.device("cuda", device.index or 0)
            if used == "CUDAExecutionProvider"
            else torch.device("cpu")
        )
        self.model_version = model_version
        self.transforms = MattingTransforms(max_side=max_side)
        logger.info(
            "matting %s on %s (%s), version %s", onnx_path, self.device, used, model_version
        )

    def forward(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run the graph on each image.

        Args:
            inputs: preprocessed images, each (h, w, 3) uint8 RGB (any size; see
                :meth:`MattingTransforms.preprocess`).

        Returns:
            One (h, w, 4) uint8 RGBA per input, as the graph returns it.
        """
        outputs = []
        for image in inputs:
            if image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"matting expects (H, W, 3) RGB images, got shape {image.shape}")
            feed = np.ascontiguousarray(image, dtype=self.input_dtype)
            (rgba,) = self.session.run([self.output_name], {self.input_name: feed})
            if rgba.shape != (*image.shape[:2], 4):
                raise RuntimeError(
                    f"matting graph returned shape {rgba.shape} for an image of shape {image.shape}"
                )
            outputs.append(rgba)
        return outputs

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """End to end: (H, W, 3) uint8 RGB images → (H, W, 4) uint8 RGBA at the original size.

        Unlike the base class, the original image goes to ``postprocess`` so that a cut-out of a
        downscaled image keeps its full-resolution RGB.
        """
        if not images:
            return []
        outputs = self.forward([self.transforms.preprocess(im) for im in images])
        return [
            self.transforms.postprocess(o, im.shape[:2], image=im)
            for o, im in zip(outputs, images, strict=True)
        ]


def load_transforms(model_dir: Path, *, max_side: int = MATTING.max_side) -> MattingTransforms:
    """CPU pre/post-processing; needs nothing from ``model_dir`` (the graph takes any size).

    ``max_side`` must equal the one given to :func:`load` for the same job.
    """
    return MattingTransforms(max_side=max_side)


def load(
    model_dir: Path,
    device: str | torch.device | None = None,
    *,
    threads: int | None = None,
    max_side: int = MATTING.max_side,
) -> MattingPredictor:
    """Load a converted matting model directory.

    Args:
        model_dir: see :func:`resolve_onnx`.
        device: ``"cuda"``/``"cuda:N"`` uses ONNX Runtime's CUDA provider when installed
            (onnxruntime-gpu), else the CPU; ``None`` picks CUDA when torch sees a GPU.
        threads: intra-op threads of the session (per actor).
        max_side: images with a longer side are matted downscaled to it.

    Returns:
        A :class:`MattingPredictor`.
    """
    onnx_path, version = resolve_onnx(Path(model_dir))
    return MattingPredictor(
        onnx_path, version, resolve_device(device), threads=threads, max_side=max_side
    )
