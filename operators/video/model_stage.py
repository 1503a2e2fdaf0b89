"""Stage 3, model (actor pool): one forward per window for all of a video's runnable queries."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from vbatch.models.rvos.transforms import preprocess_frames, select_trajectory
from vbatch.operators.columns import decode_array, encode_array, set_column
from vbatch.operators.inference import load_actor_model
from vbatch.operators.manifest import ERROR
from vbatch.operators.storage import StorageOptions
from vbatch.operators.video.columns import (
    FRAMES,
    INPUT_H,
    INPUT_W,
    LOGITS,
    OWN_START,
    OWN_STOP,
    QUERY_ERRORS,
    START,
)
from vbatch.operators.video.queries import valid_queries

logger = logging.getLogger(__name__)


class WindowModelStage:
    """Ray Data actor: ``_vb_frames`` → ``_vb_logits`` (owned frames only) and ``model_version``."""

    def __init__(
        self,
        model_dir: str,
        storage_options: StorageOptions,
        device: str | None = None,
        threads: int | None = None,
        model_options: dict | None = None,
    ) -> None:
        self.predictor = load_actor_model(
            "rvos", model_dir, storage_options, device, threads, model_options
        )

    def window_logits(self, frames: np.ndarray, queries: Sequence[str]) -> torch.Tensor:
        """What :meth:`RVOSPredictor.predict_window` computes, stopped before the upsampling.

        Args:
            frames: (T, h, w, 3) uint8, already at the network's input size.
            queries: B texts, all run in one forward (the backbone runs once for all of them).

        Returns: (B, T, h/4, w/4) float32 mask logits of the chosen query slots.
        """
        clip = preprocess_frames(frames)  # resize is the identity here: frames are already sized
        out = self.predictor.run_network(clip, queries)  # type: ignore[attr-defined]  # RvosPredictor
        logits, _ = select_trajectory(out["pred_is_referred"], out["pred_masks"])
        return logits.float().cpu()

    def __call__(self, batch: pa.Table) -> pa.Table:
        errors = batch.column(ERROR).to_pylist()
        raw = batch.column(FRAMES).to_pylist()
        rows = batch.select(["queries", QUERY_ERRORS, START, OWN_START, OWN_STOP]).to_pylist()
        logits: list[bytes | None] = [None] * batch.num_rows
        in_h: list[int | None] = [None] * batch.num_rows
        in_w: list[int | None] = [None] * batch.num_rows
        for i, r in enumerate(rows):
            if errors[i] is not None or raw[i] is None:
                continue
            try:
                frames = decode_array(raw[i])
                queries = [q for _, q in valid_queries(r["queries"], r[QUERY_ERRORS])]
                with torch.inference_mode():
                    out = self.window_logits(frames, queries)
                a, b = r[OWN_START] - r[START], r[OWN_STOP] - r[START]
                logits[i] = encode_array(out[:, a:b].numpy())
                in_h[i], in_w[i] = frames.shape[1:3]
            except Exception as e:  # this window fails; the video's other windows go on
                logger.exception("window forward failed")
                errors[i] = (
                    f"frames {r[OWN_START]}-{r[OWN_STOP] - 1}: inference failed: "
                    f"{type(e).__name__}: {e}"
                )
        batch = batch.drop_columns([FRAMES])
        batch = set_column(batch, LOGITS, pa.array(logits, pa.large_binary()))
        batch = set_column(batch, INPUT_H, pa.array(in_h, pa.int32()))
        batch = set_column(batch, INPUT_W, pa.array(in_w, pa.int32()))
        version = pa.array([self.predictor.model_version] * batch.num_rows, pa.string())
        batch = set_column(batch, "model_version", version)
        return set_column(batch, ERROR, pa.array(errors, pa.string()))
