"""Manifest and results schemas: whole-manifest errors fail fast, row errors become rows."""

from __future__ import annotations

import pyarrow as pa
import pytest

from vbatch.operators.outputs import safe_name
from vbatch.schemas.images import (
    ManifestError,
    check_image_manifest_schema,
    image_results_schema,
    image_row_errors,
    validate_image_results,
)


def test_missing_column_names_column_and_file() -> None:
    with pytest.raises(
        ManifestError, match=r"manifest s3://b/m\.parquet: missing required column 'uri'"
    ):
        check_image_manifest_schema(
            pa.schema([("image_id", pa.string())]), "s3://b/m.parquet", "mask"
        )


def test_mistyped_and_clashing_columns() -> None:
    with pytest.raises(ManifestError, match="'image_id' must be string, found int64"):
        check_image_manifest_schema(
            pa.schema([("image_id", pa.int64()), ("uri", pa.string())]), "m", "mask"
        )
    with pytest.raises(ManifestError, match="status collide"):
        check_image_manifest_schema(
            pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("status", pa.string())]),
            "m",
            "mask",
        )


def test_passthrough_schema_keeps_types() -> None:
    schema = pa.schema(
        [
            ("image_id", pa.string()),
            ("uri", pa.string()),
            ("sku", pa.int64()),
            ("t", pa.timestamp("ms")),
        ]
    )
    assert check_image_manifest_schema(schema, "m", "mask").names == ["sku", "t"]


def test_row_errors_first_duplicate_wins() -> None:
    ids = ["a", None, "b", "a", " ", "c", "a"]
    uris = ["x", "y", "z", "w", "v", "", "u"]
    errors = image_row_errors(ids, uris)
    assert errors[0] is None and errors[2] is None
    assert errors[1] == "manifest row 1: image_id is null"
    assert "duplicate image_id 'a' (first at row 0" in errors[3]
    assert errors[4] == "manifest row 4: image_id is empty"
    assert errors[5] == "manifest row 5: uri is empty"
    assert "first at row 0" in errors[6]


def test_results_validation_catches_inconsistent_rows() -> None:
    schema = image_results_schema("mask")
    good = pa.Table.from_pylist(
        [
            {"image_id": "a", "status": "ok", "error": None},
            {"image_id": "b", "status": "error", "error": "x", "error_class": "decode"},
        ],
        schema=schema,
    )
    validate_image_results(good, "mask")
    unclassed = pa.Table.from_pylist(
        [{"image_id": "b", "status": "error", "error": "x"}], schema=schema
    )
    with pytest.raises(ValueError, match="row 0: error 'x' with error_class None"):
        validate_image_results(unclassed, "mask")
    bad = pa.Table.from_pylist([{"image_id": "a", "status": "ok", "error": "boom"}], schema=schema)
    with pytest.raises(ValueError, match="row 0"):
        validate_image_results(bad, "mask")
    with pytest.raises(ValueError, match="missing column 'mask_uri'"):
        validate_image_results(good.drop_columns(["mask_uri"]), "mask")


@pytest.mark.parametrize(
    "image_id", ["../../etc/passwd", "a/b", "..", ".", ".hidden", "x" * 400, "ü ß", "a%2Fb"]
)
def test_safe_name_never_escapes(image_id: str) -> None:
    name = safe_name(image_id)
    assert "/" not in name and "\\" not in name and not name.startswith(".") and len(name) <= 200


def test_safe_name_is_injective_on_tricky_ids() -> None:
    ids = ["a/b", "a%2Fb", "a_b", "A/b", ".a", "%2Ea"]
    assert len({safe_name(i) for i in ids}) == len(ids)
    assert safe_name("img_001.v2") == "img_001.v2"


def _row_errors_spec(ids, uris):
    """The rules in their plainest form, row by row with a dict of the ids seen."""
    first: dict = {}
    out = []
    for row, (image_id, uri) in enumerate(zip(ids, uris, strict=True)):
        if image_id is None:
            out.append(f"manifest row {row}: image_id is null")
        elif not image_id.strip():
            out.append(f"manifest row {row}: image_id is empty")
        elif image_id in first:
            out.append(
                f"manifest row {row}: duplicate image_id {image_id!r} (first at row "
                f"{first[image_id]}, which is processed)"
            )
        else:
            first[image_id] = row
            out.append(None if uri and uri.strip() else f"manifest row {row}: uri is empty")
    return out


def test_row_errors_match_the_rules() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    pool = [f"id{i}" for i in range(40)] + [None, "", " ", "\t"]
    ids = [pool[i] for i in rng.integers(0, len(pool), 500)]
    uris = [["u", "", None, " x "][i] for i in rng.integers(0, 4, 500)]
    assert image_row_errors(ids, uris) == _row_errors_spec(ids, uris)
