"""The model stage: a callable class run by a Ray Data actor pool, one model per actor.

``__init__`` builds the model inside the actor from the model directory URI (never on the driver:
a model shipped from the driver is pickled through the object store for every actor); ``__call__``
runs one batch under ``torch.inference_mode``. Rows that already failed skip the network. If the
batched forward raises, the batch is retried one row at a time so that only the row that cannot be
run fails (and a CUDA out-of-memory on a big batch degrades instead of killing the job).

With ``--decode gpu`` some inputs are JPEG files rather than pixels: the actor decodes and resizes
them on its device first (:mod:`vbatch.operators.device_decode`); a file that does not decode
becomes that row's error.
"""

from __future__ import annotations

import logging
import os

import pyarrow as pa
import torch

from vbatch.models import Predictor, load_model
from vbatch.operators.columns import decode_array, encode_array, set_column
from vbatch.operators.device_decode import DeviceDecoder, is_encoded
from vbatch.operators.images import INPUT, OUTPUT
from vbatch.operators.manifest import ERROR
from vbatch.operators.storage import Storage, StorageOptions

logger = logging.getLogger(__name__)


def load_actor_model(
    task: str,
    model_dir: str,
    storage_options: StorageOptions,
    device: str | None = None,
    threads: int | None = None,
    model_options: dict | None = None,
) -> Predictor:
    """What every model actor does once in ``__init__``: threads, local model dir, strict load."""
    if threads:
        torch.set_num_threads(threads)
    local = Storage(storage_options).localize_dir(model_dir)
    predictor = load_model(task, local, device=device, **(model_options or {}))
    import ray

    logger.info(
        "actor pid %d on node %s: %s %s on %s",
        os.getpid(),
        ray.get_runtime_context().get_node_id() if ray.is_initialized() else "-",
        task,
        predictor.model_version,
        predictor.device,
    )
    return predictor


class ModelStage:
    """Ray Data actor: ``_vb_input`` → ``_vb_output`` and ``model_version``."""

    def __init__(
        self,
        task: str,
        model_dir: str,
        storage_options: StorageOptions,
        device: str | None = None,
        threads: int | None = None,
        model_options: dict | None = None,
    ) -> None:
        self.predictor = load_actor_model(
            task, model_dir, storage_options, device, threads, model_options
        )
        self._decoder: DeviceDecoder | None = None  # made on the first undecoded JPEG

    def _decode_files(self, arrays: list, errors: list, todo: list[int]) -> None:
        """Replace the JPEG files among ``arrays`` (rows ``todo``) by network inputs, in place; a
        file that does not decode sets its row's error and its array to ``None``."""
        files = [k for k, a in enumerate(arrays) if is_encoded(a)]
        if not files:
            return
        if self._decoder is None:
            self._decoder = DeviceDecoder(self.predictor.transforms, self.predictor.device)
        for k, result in zip(files, self._decoder([arrays[k] for k in files]), strict=True):
            if isinstance(result, str):
                errors[todo[k]], arrays[k] = result, None
            else:
                arrays[k] = result

    def _forward(self, arrays: list) -> list:
        with torch.inference_mode():
            return self.predictor.forward(arrays)

    def __call__(self, batch: pa.Table) -> pa.Table:
        errors = batch.column(ERROR).to_pylist()
        raw = batch.column(INPUT).to_pylist()
        todo = [i for i, e in enumerate(errors) if e is None and raw[i] is not None]
        outputs: list[bytes | None] = [None] * len(errors)
        if todo:
            arrays = [decode_array(raw[i]) for i in todo]
            self._decode_files(arrays, errors, todo)
            todo = [i for i, a in zip(todo, arrays, strict=True) if a is not None]
            arrays = [a for a in arrays if a is not None]
        if todo:
            try:
                results = self._forward(arrays)
            except Exception:
                logger.exception("batched forward failed; retrying row by row")
                results = []
                for i, arr in zip(todo, arrays, strict=True):
                    try:
                        results.extend(self._forward([arr]))
                    except Exception as e:
                        errors[i] = f"inference failed: {type(e).__name__}: {e}"
                        results.append(None)
            for i, out in zip(todo, results, strict=True):
                if out is not None:
                    outputs[i] = encode_array(out)
        batch = batch.drop_columns([INPUT])
        batch = set_column(batch, OUTPUT, pa.array(outputs, pa.large_binary()))
        version = pa.array([self.predictor.model_version] * batch.num_rows, pa.string())
        batch = set_column(batch, "model_version", version)
        return set_column(batch, ERROR, pa.array(errors, pa.string()))
