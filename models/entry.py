"""What the pipeline needs to know about a model, declared once, next to the model's config.

Each model package ends its ``config.py`` with ``ENTRY = ModelEntry(...)`` (timm keeps
``default_cfgs`` beside each model); :mod:`vbatch.models.registry` collects them, and every other
place that used to keep its own per-model table (resource defaults in ``jobs.runtime``, metric
columns in ``schemas.images``, metric functions in ``operators.quality``, the report's visuals)
reads the entry instead. This module imports nothing heavy: the CLI builds its ``--help`` from the
registry without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass

#: what a model's rows carry (``schemas.images.OUTPUT_FIELDS``): an 8-bit mask PNG, an RGBA matte,
#: a float vector, or per-frame masks of a video
OUTPUTS = ("mask", "rgba", "embedding", "video-masks")
#: how a product is scored against a ground truth (``operators.quality``, ``schemas.images``)
METRIC_KINDS = ("saliency", "mask", "matte", "video-mask")
#: how the report draws a product over its image (``jobs.report.visuals``)
VISUALS = ("heatmap", "outline", "matte")
DEVICE_KINDS = ("cpu", "gpu")


@dataclass(frozen=True)
class ModelEntry:
    """Where a model lives, what it produces and what running it takes.

    Attributes:
        name: the registry key and ``--task`` value.
        module: the package that ``load_model`` imports on first use.
        output: one of :data:`OUTPUTS`.
        modelscope_id: the published model this one loads.
        summary: one line for ``--help``.
        required_files: files ModelScope's layout must hold, checked on the driver before any
            worker starts.
        checkpoint: the ``torch.save`` state dict among them (opened, not loaded, on the driver;
            its content hash is the ``model_version``).
        options: the job options the package's ``load()`` accepts, by name (``threads`` is the
            actor's share of the cores; the others are fields of the job's configuration); the
            jobs pass exactly these.
        transform_options: the job options ``load_transforms()`` accepts, by name.
        batch_cpu, batch_gpu: the default ``--batch-size`` per device kind (images, or windows
            for videos, per model call); the assumption behind each is at its declaration.
        actor_memory_gb: host memory reserved per model replica (weights, a default batch of
            activations and the framework; measured on CPU). Ray packs no more replicas onto a
            node than fit.
        metric_kind: how a product is scored against a manifest's ground truth (one of
            :data:`METRIC_KINDS`), ``None`` when it is not.
        visual: how the report draws a product (one of :data:`VISUALS`), ``None``: not drawn.
        default_precision: the ``--precision`` a job runs the model at unless told otherwise:
            ``"auto"`` (bf16 where the device runs it natively, ``models.precision``) where its
            measured deviation from fp32 stays within the bounds (docs/BENCHMARKS.md, "bf16 on
            CPU"), else ``"fp32"``. A model without ``precision`` among its options runs fp32.
    """

    name: str
    module: str
    output: str
    modelscope_id: str
    summary: str
    required_files: tuple[str, ...] = ()
    checkpoint: str | None = None
    options: tuple[str, ...] = ()
    transform_options: tuple[str, ...] = ()
    batch_cpu: int = 8
    batch_gpu: int = 8
    actor_memory_gb: float = 4.0
    metric_kind: str | None = None
    visual: str | None = None
    default_precision: str = "fp32"

    def __post_init__(self) -> None:
        for value, allowed, what in (
            (self.output, OUTPUTS, "output"),
            (self.metric_kind, (*METRIC_KINDS, None), "metric_kind"),
            (self.visual, (*VISUALS, None), "visual"),
        ):
            if value not in allowed:
                raise ValueError(f"{self.name}: {what} {value!r} is not one of {allowed}")
        if self.default_precision != "fp32" and "precision" not in self.options:
            raise ValueError(f"{self.name}: a default precision needs the precision option")
        if self.checkpoint is not None and self.checkpoint not in self.required_files:
            raise ValueError(f"{self.name}: the checkpoint must be one of the required files")

    def default_batch(self, device_kind: str) -> int:
        """The default batch on ``device_kind`` (``"cpu"`` or ``"gpu"``)."""
        if device_kind not in DEVICE_KINDS:
            raise ValueError(f"device kind must be one of {DEVICE_KINDS}, got {device_kind!r}")
        return self.batch_gpu if device_kind == "gpu" else self.batch_cpu

    @property
    def is_image_task(self) -> bool:
        """Run by ``vbatch segment`` (one product per image)."""
        return self.output in ("mask", "rgba")
