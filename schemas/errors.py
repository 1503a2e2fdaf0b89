"""Error classes of result rows, as data: which stage refused a row, and whether the row or the
infrastructure is to blame.

Every error row carries a message that starts with a known prefix (written by ``operators/``).
:func:`classify_errors` maps messages to a short class with Arrow compute, so a job can count
millions of error rows without turning them into Python strings.

``infrastructure`` is the class a rerun can fix: the storage layer ends a read or write whose
retries ran out with ``storage unavailable after N retries: …`` (possibly wrapped by the stage that
called it, e.g. ``cannot read s3://…: OSError: storage unavailable …``). Every other class is
about the row's data and fails the same way again.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

INFRASTRUCTURE = "infrastructure"
#: an error message that matches no known prefix
OTHER = "other"

#: the storage layer's retried-out error, at the start or after a stage's ``…: Type: `` wrapper
INFRASTRUCTURE_PATTERN = r"(?:^|: )storage unavailable\b"

#: (class, message prefixes), tried in order after the infrastructure pattern
DATA_ERROR_CLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("manifest", ("manifest row ", "query is ")),
    ("not_found", ("object not found:", "is a folder, not a file:")),
    ("access_denied", ("access denied reading ",)),
    ("unsupported_uri", ("unsupported URI scheme",)),
    ("fetch", ("cannot read ",)),
    ("too_large", ("image too large:",)),
    (
        "decode",
        (
            "empty file",
            "not a recognised image format",
            "corrupt or truncated image",
            "cannot decode",
            "preprocess failed:",
            "decoded ",  # video: fewer frames than probed
            "the video has no frames",
        ),
    ),
    ("model", ("inference failed:",)),
    ("write", ("postprocess/write failed:", "write failed:")),
    ("internal", ("internal error:",)),
)

ERROR_CLASSES: tuple[str, ...] = (
    INFRASTRUCTURE,
    *(name for name, _ in DATA_ERROR_CLASSES),
    OTHER,
)

#: per-window and per-query prefixes of video error rows, stripped before matching
_LOCATION_PREFIX = r"^(?:frames \d+-\d+|query \d+): "


def classify_errors(errors: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """The error class of each message; null where the message is null (an ``ok`` row).

    Args:
        errors: string messages, one per result row.

    Returns:
        A string array of the same length holding one of :data:`ERROR_CLASSES` or null.
    """
    errors = errors.cast(pa.string())
    if len(errors) == 0:
        return errors
    bare = pc.replace_substring_regex(errors, _LOCATION_PREFIX, "")
    conditions = [pc.match_substring_regex(errors, INFRASTRUCTURE_PATTERN)]
    for _, prefixes in DATA_ERROR_CLASSES:
        hit = pc.starts_with(bare, prefixes[0])
        for prefix in prefixes[1:]:
            hit = pc.or_(hit, pc.starts_with(bare, prefix))
        conditions.append(hit)
    conditions.append(pc.is_valid(errors))
    cases = pc.make_struct(*conditions, field_names=[str(i) for i in range(len(conditions))])
    return pc.case_when(cases, *ERROR_CLASSES)


def classify_error(message: str | None) -> str | None:
    """:func:`classify_errors` for one message."""
    return classify_errors(pa.array([message], pa.string()))[0].as_py()
