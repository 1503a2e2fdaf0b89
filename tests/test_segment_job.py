"""The `segment` job end to end on the shared Ray instance, on local paths and on the S3 server.

One manifest holds every kind of bad input the job must survive next to good images; the tests
check the results table row by row, the written masks against the Python API, and re-runs.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vbatch.jobs.cli import main
from vbatch.jobs.demo_data import encode, product_image
from vbatch.jobs.publish import (
    FAULT_ENV,
    POINTER,
    SUCCESS,
    InjectedFault,
    read_table,
    results_files,
)
from vbatch.jobs.segment import ImageJobConfig, run_image_job
from vbatch.models import load_model
from vbatch.models.checkpoint import file_version
from vbatch.operators.decode import decode_image
from vbatch.operators.outputs import safe_name
from vbatch.operators.storage import Storage, join
from vbatch.schemas.images import ManifestError, validate_image_results


def _exif_rotated(seed: int) -> bytes:
    pil = Image.fromarray(product_image(seed, (90, 40)))
    exif = pil.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    pil.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def _png16(seed: int) -> bytes:
    rgb = product_image(seed, (50, 30)).astype(np.uint16) * 257
    return cv2.imencode(".png", rgb[..., ::-1])[1].tobytes()


# (image_id, file name or None, file bytes or None, expected status, error fragment)
def _cases() -> list[tuple[str | None, str | None, bytes | None, str, str | None]]:
    big = io.BytesIO()
    Image.new("L", (3000, 3000)).save(big, "PNG")
    return [
        ("good-jpeg", "good.jpg", encode(product_image(0, (120, 80))), "ok", None),
        ("good-png", "good.png", encode(product_image(1, (70, 90)), "PNG"), "ok", None),
        ("grey-jpeg", "grey.jpg", encode(product_image(2, (64, 48))[..., 0]), "ok", None),
        ("png-16bit", "deep.png", _png16(3), "ok", None),
        ("exif-rotated", "rot.jpg", _exif_rotated(4), "ok", None),
        (
            "rgba-png",
            "rgba.png",
            encode(
                np.dstack([product_image(5, (40, 40)), np.full((40, 40), 128, np.uint8)]), "PNG"
            ),
            "ok",
            None,
        ),
        ("../../escape/attempt", "esc.jpg", encode(product_image(6, (33, 21))), "ok", None),
        (
            "corrupt",
            "corrupt.jpg",
            encode(product_image(7, (64, 64)))[:200],
            "error",
            "corrupt or truncated",
        ),
        ("zero-bytes", "empty.jpg", b"", "error", "empty file (0 bytes)"),
        ("missing", "not-there.jpg", None, "error", "object not found"),
        (
            "text-as-jpg",
            "notes.jpg",
            b"this is a text file\n",
            "error",
            "not a recognised image format",
        ),
        ("huge", "huge.png", big.getvalue(), "error", "exceeds the cap of 5,000,000"),
        (
            "good-jpeg",
            "dup.jpg",
            encode(product_image(8, (64, 64))),
            "error",
            "duplicate image_id 'good-jpeg'",
        ),
        (None, "null-id.jpg", encode(product_image(9, (64, 64))), "error", "image_id is null"),
        ("empty-uri", None, None, "error", "uri is empty"),
    ]


def _write_inputs(storage: Storage, root: str) -> tuple[str, list]:
    cases = _cases()
    rows = []
    for i, (image_id, name, data, *_rest) in enumerate(cases):
        if name is not None and data is not None:
            storage.write_bytes(join(root, "imgs", name), data)
        rows.append(
            {
                "image_id": image_id,
                "uri": f"imgs/{name}" if name else "",
                "shelf": i,
                "tag": [f"t{i}"],
            }
        )
    table = pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [
                ("image_id", pa.string()),
                ("uri", pa.string()),
                ("shelf", pa.int64()),
                ("tag", pa.list_(pa.string())),
            ]
        ),
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(join(root, "manifest.parquet"), buf.getvalue())
    return join(root, "manifest.parquet"), cases


def _read_results(storage: Storage, out: str) -> pa.Table:
    return read_table(out, storage)  # the committed table, as every reader finds it


#: the error class of each error case, by a fragment of its message
ERROR_CLASSES = {
    "corrupt or truncated": "decode",
    "empty file (0 bytes)": "decode",
    "object not found": "not_found",
    "not a recognised image format": "decode",
    "exceeds the cap of 5,000,000": "too_large",
    "duplicate image_id 'good-jpeg'": "manifest",
    "image_id is null": "manifest",
    "uri is empty": "manifest",
}


WEIGHTS = {"salient": "pytorch_model.pt", "shop-seg": "pytorch_model.bin"}


def _check(
    storage: Storage,
    out: str,
    cases: list,
    model_dir: Path,
    task: str = "salient",
    tolerance: tuple[int, float] = (1, 0.02),
) -> None:
    table = _read_results(storage, out)
    validate_image_results(table, "mask")
    assert table.num_rows == len(cases)  # every manifest row exactly once
    rows = sorted(table.to_pylist(), key=lambda r: r["shelf"])
    assert [r["shelf"] for r in rows] == list(
        range(len(cases))
    )  # passthrough intact, none lost or doubled
    predictor = load_model(task, model_dir, device="cpu")
    # a fresh run's products are in its own folder, products/<run id>/
    run_id = storage.read_bytes(join(out, POINTER)).decode().strip().split("/")[-1]
    assert {r["model_version"] for r in rows} == {file_version(model_dir / WEIGHTS[task])}
    for row, (image_id, _name, data, status, fragment) in zip(rows, _cases(), strict=True):
        assert row["image_id"] == image_id
        assert row["tag"] == [f"t{row['shelf']}"]
        assert row["task"] == task
        assert row["status"] == status, (image_id, row["error"])
        if status == "error":
            assert fragment in row["error"], row["error"]
            assert row["error_class"] == ERROR_CLASSES[fragment], row["error"]
            assert row["mask_uri"] is None
            continue
        assert row["error"] is None and row["error_class"] is None
        image = decode_image(data)
        assert (row["height"], row["width"]) == image.shape[:2]
        assert row["mask_uri"] == join(
            out, "products", run_id, "masks", safe_name(image_id) + ".png"
        )
        mask = cv2.imdecode(
            np.frombuffer(storage.read_bytes(row["mask_uri"]), np.uint8), cv2.IMREAD_UNCHANGED
        )
        assert mask.dtype == np.uint8 and mask.shape == image.shape[:2]
        # the pipeline's mask is what the Python API gives for the same image; batch composition and
        # thread count move float sums by ~1e-7, which the reference's uint8 truncation can turn
        # into one grey level on a few pixels
        diff = np.abs(mask.astype(int) - predictor.predict([image])[0].astype(int))
        assert diff.max() <= tolerance[0] and diff.mean() < tolerance[1], (
            image_id,
            diff.max(),
            diff.mean(),
        )


def test_segment_local_paths(ray_session, tmp_path: Path, salient_dir: Path, capsys) -> None:
    storage = Storage()
    manifest, cases = _write_inputs(storage, str(tmp_path / "in"))
    out = str(tmp_path / "out")
    argv = ["segment", "--task", "salient", "--manifest", manifest, "--model-dir", str(salient_dir)]
    argv += ["--out", out, "--batch-size", "3", "--max-pixels", "5000000", "--summary-json", "-"]
    # 8 of 15 rows are bad: over the default --max-error-rate of 1 %, published, exit 3
    assert main(argv) == 3
    stdout = capsys.readouterr().out.strip().splitlines()
    record = json.loads(stdout[-1])  # the last line is the summary
    assert (record["exit_code"], record["status"], record["rows"]) == (3, "too_many_errors", 15)
    assert record["by_status"] == {"ok": 7, "error": 8}
    assert record["by_error_class"] == {"decode": 3, "not_found": 1, "too_large": 1, "manifest": 3}
    assert record["model_version"] == file_version(salient_dir / WEIGHTS["salient"])
    assert record["command"] == "segment" and record["task"] == "salient"
    assert record["versions"]["ray"] and record["started_at"] <= record["ended_at"]
    # run.json and _SUCCESS hold the same summary (run.json also the configuration)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert {
        k: v
        for k, v in run.items()
        if k not in ("config", "manifest_files", "model_identity", "run_key")
    } == record
    assert json.loads((tmp_path / "out" / SUCCESS).read_text()) == run
    assert (tmp_path / "out" / POINTER).read_text().strip() == f"results/{record['run_id']}"

    # (Ray's raylet may print a warning on stdout before the report)
    report = stdout[next(i for i, line in enumerate(stdout) if line.startswith("salient: ")) : -1]
    assert report[0].startswith(f"salient: {len(cases)} rows — 7 ok, 8 error")
    assert report[1] == f"results: {join(out, 'results')}"
    assert report[2] == "errors by class: decode 3, manifest 3, not_found 1, too_large 1"
    shown = [line for line in report if line.startswith("  error ")]
    assert len(shown) == 5 and report[-1].endswith(
        f"{8 - len(shown)} more error rows (see the results table)"
    )
    _check(storage, out, cases, salient_dir)
    # the escaping id stayed inside the run's masks/
    assert not (tmp_path / "escape").exists()
    masks = tmp_path / "out" / "products" / record["run_id"] / "masks"
    assert sorted(p.name for p in masks.iterdir()) == sorted(
        safe_name(c[0]) + ".png" for c in cases if c[3] == "ok"
    )


def test_segment_decode_gpu_without_a_gpu(ray_session, tmp_path: Path, salient_dir: Path) -> None:
    """``--decode gpu`` where the actors have no GPU: they decode the JPEGs on their CPU. The same
    rows, statuses and errors as exact mode; the masks within a few grey levels of the Python API's
    (the resize is torch's, within one grey level of Pillow's on the network input)."""
    storage = Storage()
    manifest, cases = _write_inputs(storage, str(tmp_path / "in"))
    out = str(tmp_path / "out")
    argv = ["segment", "--task", "salient", "--manifest", manifest, "--model-dir", str(salient_dir)]
    argv += ["--out", out, "--batch-size", "3", "--max-pixels", "5000000", "--decode", "gpu"]
    assert main(argv) == 3  # 8 of 15 rows are bad, as in exact mode
    _check(storage, out, cases, salient_dir, tolerance=(8, 0.5))


def test_segment_on_s3_and_rerun_replaces(ray_session, s3_server, salient_dir: Path) -> None:
    storage = s3_server.storage()
    bucket = s3_server.new_bucket()
    manifest, cases = _write_inputs(storage, join(bucket, "in"))
    model_uri = join(bucket, "models", "salient")
    for f in salient_dir.iterdir():
        storage.put_file(f, join(model_uri, f.name))
    out = join(bucket, "out")
    cfg = ImageJobConfig(
        "salient",
        manifest,
        model_uri,
        out,
        batch_size=4,
        max_pixels=5_000_000,
        s3_endpoint=s3_server.endpoint,
    )
    run_image_job(cfg)
    _check(storage, out, cases, salient_dir)
    first_files = results_files(out, storage)
    # a rerun crashed after copying its generation, before the commit: the first table stands
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAULT_ENV, "publish:after-copy")
        with pytest.raises(InjectedFault):
            run_image_job(cfg)
    _check(storage, out, cases, salient_dir)
    assert results_files(out, storage) == first_files
    assert not storage.exists(join(out, SUCCESS))
    summary = run_image_job(cfg)  # a repeated run replaces the results instead of adding to them
    _check(storage, out, cases, salient_dir)
    # the first run's products are gone with its generation: 7 masks, all the new run's
    masks = storage.list_files(join(out, "products"))
    assert len(masks) == 7 and all(f"/products/{summary.record['run_id']}/" in m for m in masks)
    assert not set(first_files) & set(results_files(out, storage))
    # one generation left, no staged files, the run marker back
    parts = storage.list_files(join(out, "results"), suffix=".parquet")
    assert set(parts) == set(results_files(out, storage))
    assert not storage.list_files(join(out, ".staging"), suffix=".parquet")
    assert json.loads(storage.read_bytes(join(out, SUCCESS)))["run_id"] == summary.record["run_id"]


def test_limit_and_folder_manifest(ray_session, tmp_path: Path, salient_dir: Path) -> None:
    storage = Storage()
    folder = tmp_path / "manifest"
    folder.mkdir()
    imgs = tmp_path / "manifest" / "imgs"
    for part in range(2):  # two files, read in name order; relative uris resolve against the folder
        ids = [f"p{part}-{i}" for i in range(3)]
        for i in ids:
            storage.write_bytes(
                str(imgs / f"{i}.jpg"), encode(product_image(hash(i) % 100, (48, 40)))
            )
        pq.write_table(
            pa.table({"image_id": ids, "uri": [f"imgs/{i}.jpg" for i in ids]}),
            folder / f"part-{part}.parquet",
        )
    out = tmp_path / "out"
    cfg = ImageJobConfig("salient", str(folder), str(salient_dir), str(out), limit=4)
    # the first run is killed right after its commit: its table is complete and found, the run
    # marker is not there yet, and the rerun replaces the table
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAULT_ENV, "publish:after-pointer")
        with pytest.raises(InjectedFault):
            run_image_job(cfg)
    assert _read_results(storage, str(out)).num_rows == 4
    assert not (out / SUCCESS).exists()
    summary = run_image_job(cfg)
    assert (out / SUCCESS).exists() and len(list((out / "results").iterdir())) == 1
    table = _read_results(storage, str(out))
    assert summary.ok == 4 and sorted(table.column("image_id").to_pylist()) == [
        "p0-0",
        "p0-1",
        "p0-2",
        "p1-0",
    ]


def test_manifest_missing_column_fails_fast(ray_session, tmp_path: Path, salient_dir: Path) -> None:
    pq.write_table(pa.table({"image_id": ["a"], "url": ["x.jpg"]}), tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match=r"m\.parquet: missing required column 'uri'"):
        run_image_job(
            ImageJobConfig(
                "salient", str(tmp_path / "m.parquet"), str(salient_dir), str(tmp_path / "o")
            )
        )
    with pytest.raises(ManifestError, match="not found"):
        run_image_job(
            ImageJobConfig(
                "salient", str(tmp_path / "nope.parquet"), str(salient_dir), str(tmp_path / "o")
            )
        )


def test_shop_seg_on_s3(ray_session, s3_server, tmp_path: Path) -> None:
    from vbatch.models.shop_seg import TINY
    from vbatch.models.shop_seg.modeldir import write_random_model_dir

    model_dir = write_random_model_dir(tmp_path / "shop-seg", config=TINY)
    storage = s3_server.storage()
    bucket = s3_server.new_bucket()
    manifest, cases = _write_inputs(storage, join(bucket, "in"))
    model_uri = join(bucket, "models", "shop-seg")
    for f in model_dir.iterdir():
        storage.put_file(f, join(model_uri, f.name))
    out = join(bucket, "out")
    summary = run_image_job(
        ImageJobConfig(
            "shop-seg",
            manifest,
            model_uri,
            out,
            batch_size=3,
            max_pixels=5_000_000,
            s3_endpoint=s3_server.endpoint,
            # its default is auto (bf16 on this CPU): the comparison with the API is at fp32
            precision="fp32",
        )
    )
    assert (summary.ok, summary.error) == (7, 8)
    _check(storage, out, cases, model_dir, task="shop-seg")
    for row in _read_results(storage, out).to_pylist():
        if row["status"] == "ok":  # binary masks
            mask = cv2.imdecode(
                np.frombuffer(storage.read_bytes(row["mask_uri"]), np.uint8), cv2.IMREAD_UNCHANGED
            )
            assert set(np.unique(mask)) <= {0, 255}
