"""What each field of a job's configuration is for, declared once, and what follows from it.

Every field of a job configuration (:class:`RunOptions` and the configs that extend it) carries a
*role* in its ``dataclasses.field`` metadata. The role alone decides where the field counts:

=============  ==============  ===============  =====================  ==========================
role           run key         ``--reuse``      one value per shared   e.g.
               (resume)        compares it      actor pool (backfill)
=============  ==============  ===============  =====================  ==========================
``result``     yes             yes              yes                    ``--task``, ``--precision``
``selection``  yes             no               no                     ``--limit``
``model``      by content      by content       yes                    ``--model-dir``
``input``      by content      no               no                     ``--manifest``
``output``     no              no               no                     ``--out``, ``--reuse``
``placement``  no              no               yes                    ``--batch-size``, ``--address``
``limits``     no              no               no                     ``--max-error-rate``
=============  ==============  ===============  =====================  ==========================

"By content": the value is a location; what enters the run key, and what reuse compares, is the
content found there (the manifest files' fingerprints, the model's identity), never the string.
A field without a role is refused when its class is checked (:func:`check_roles`, run by the
tests over every config), so a new option cannot silently miss the run key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vbatch.jobs.limits import DEFAULT_MAX_ERROR_RATE, DEFAULT_MAX_INFRA_ERROR_RATE

RESULT = "result"
SELECTION = "selection"
MODEL = "model"
INPUT = "input"
OUTPUT = "output"
PLACEMENT = "placement"
LIMITS = "limits"

#: role → (in the run key, compared by --reuse, one value per shared pool); "content": the value's
#: content counts, by the caller's fingerprint, not the value itself
USES: dict[str, tuple[bool | str, bool | str, bool]] = {
    RESULT: (True, True, True),
    SELECTION: (True, False, False),
    MODEL: ("content", "content", True),
    INPUT: ("content", False, False),
    OUTPUT: (False, False, False),
    PLACEMENT: (False, False, True),
    LIMITS: (False, False, False),
}


def role(r: str, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field with role ``r`` (one of :data:`USES`)."""
    if r not in USES:
        raise ValueError(f"unknown role {r!r}; known: {sorted(USES)}")
    return dataclasses.field(default=default, metadata={"role": r}, **kwargs)


def role_of(f: dataclasses.Field) -> str:
    return f.metadata.get("role", "")


def check_roles(cls: type) -> None:
    """Raise ``TypeError`` naming every field of dataclass ``cls`` without a known role."""
    missing = [f.name for f in dataclasses.fields(cls) if role_of(f) not in USES]
    if missing:
        raise TypeError(
            f"{cls.__name__}: fields without a role (vbatch.jobs.config.role): {missing}"
        )


def _values(cfg: Any, use: int, *wanted: bool | str) -> dict[str, Any]:
    check_roles(type(cfg))
    return {
        f.name: getattr(cfg, f.name)
        for f in sorted(dataclasses.fields(cfg), key=lambda f: f.name)
        if USES[role_of(f)][use] in wanted
    }


def key_fields(cfg: Any) -> dict[str, Any]:
    """The fields whose values enter the run key (``result`` and ``selection``), by name."""
    return _values(cfg, 0, True)


def reuse_fields(cfg: Any) -> dict[str, Any]:
    """The fields ``--reuse`` compares with the earlier run's (``result``), by name."""
    return _values(cfg, 1, True)


def pool_fields(cfg: Any) -> dict[str, Any]:
    """The fields every job sharing one actor pool must agree on, by name."""
    return _values(cfg, 2, True)


def content_fields(cfg: Any) -> dict[str, str]:
    """The fields that enter the run key by their content (``model``, ``input``): name → role."""
    check_roles(type(cfg))
    return {f.name: role_of(f) for f in dataclasses.fields(cfg) if USES[role_of(f)][0] == "content"}


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """Where and how a row job runs, and the limits of its exit status: the options every row job
    (``segment``, ``reid embed``, ``reid search --manifest``, ``video``) shares. Keyword-only, so
    that each job's own fields keep their positions."""

    #: model replicas' batch (``None``: the model's default for the device, ModelEntry)
    batch_size: int | None = role(PLACEMENT, None)
    actors: int | None = role(PLACEMENT, None)
    gpus_per_actor: float | None = role(PLACEMENT, None)
    threads_per_actor: int | None = role(PLACEMENT, None)
    #: "auto" (GPUs when the cluster has or can get them), "cpu" or "cuda"
    device: str = role(PLACEMENT, "auto")
    s3_endpoint: str | None = role(PLACEMENT, None)
    address: str | None = role(PLACEMENT, None)
    #: pass the driver's AWS_* variables to the job's workers (runtime_env); off: never silent
    forward_s3_env: bool = role(PLACEMENT, False)
    #: custom Ray resources each model actor requests, e.g. {"gpu_node": 1}: pins the actors to
    #: the nodes that carry them
    actor_resources: dict[str, float] | None = role(PLACEMENT, None)  # noqa: RUF009 (a field)
    #: also commit the result rows to this Iceberg table, NAMESPACE.TABLE (jobs.lakehouse)
    table: str | None = role(OUTPUT, None)
    #: the pyiceberg catalog of --table (~/.pyiceberg.yaml or PYICEBERG_CATALOG__<NAME>__…)
    catalog: str = role(OUTPUT, "default")
    #: take over --out's lease even when its holder looks alive (jobs.lease)
    break_lease: bool = role(PLACEMENT, False)
    #: exit 3 above this fraction of error rows (jobs.summary)
    max_error_rate: float = role(LIMITS, DEFAULT_MAX_ERROR_RATE)
    #: fail, publishing nothing, above this fraction of infrastructure error rows
    max_infra_error_rate: float = role(LIMITS, DEFAULT_MAX_INFRA_ERROR_RATE)
