"""Generated demo data: product-photo-like images and their Parquet manifest.

Images are smooth backgrounds with an object (ellipse or box with a gradient and a shadow) and a
little noise, so resizes behave as on photos (pure noise exaggerates resampling differences). The
same generator feeds ``vbatch demo``, the tests and the benchmarks.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter

#: sizes (width, height) cycled through: landscape, portrait, square, panorama, small
SIZES = [(640, 480), (480, 640), (512, 512), (1024, 300), (333, 500), (800, 600), (256, 192)]


def product_image(seed: int, size: tuple[int, int] = (640, 480)) -> np.ndarray:
    """One (H, W, 3) uint8 RGB "product photo"."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(150, 250, 3), rng.uniform(90, 200, 3)
    t = (xx / max(w - 1, 1) * rng.uniform(0.2, 0.8) + yy / max(h - 1, 1) * rng.uniform(0.2, 0.8))[
        ..., None
    ]
    bg = c0 * (1 - t / 1.6) + c1 * (t / 1.6)
    img = Image.fromarray(bg.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    cx, cy = w * rng.uniform(0.35, 0.65), h * rng.uniform(0.35, 0.65)
    rx, ry = w * rng.uniform(0.15, 0.3), h * rng.uniform(0.15, 0.3)
    color = tuple(int(v) for v in rng.integers(10, 140, 3))
    box = [cx - rx, cy - ry, cx + rx, cy + ry]
    shadow = Image.new("L", img.size, 0)
    ImageDraw.Draw(shadow).ellipse([b + 12 for b in box], fill=90)
    img.paste((40, 40, 40), mask=shadow.filter(ImageFilter.GaussianBlur(8)))
    if seed % 2:
        draw.ellipse(box, fill=color)
    else:
        draw.rounded_rectangle(box, radius=int(min(rx, ry) * 0.3), fill=color)
    hl = tuple(min(255, c + 80) for c in color)
    draw.ellipse([cx - rx * 0.4, cy - ry * 0.6, cx - rx * 0.1, cy - ry * 0.3], fill=hl)
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(1.2)), dtype=np.float32)
    arr += rng.normal(0, 3, arr.shape)
    return arr.clip(0, 255).astype(np.uint8)


def person_crop(seed: int, identity: int, size: tuple[int, int] = (128, 256)) -> np.ndarray:
    """A pedestrian-crop-like (H, W, 3) image whose colours depend on ``identity``."""
    rng = np.random.default_rng(seed)
    ident = np.random.default_rng(10_000 + identity)
    w, h = size
    top, bottom, skin = (
        ident.integers(0, 255, 3),
        ident.integers(0, 255, 3),
        np.array([200, 160, 130]),
    )
    img = Image.fromarray(np.full((h, w, 3), rng.integers(60, 200), np.uint8))
    d = ImageDraw.Draw(img)
    d.ellipse([w * 0.35, h * 0.03, w * 0.65, h * 0.18], fill=tuple(int(v) for v in skin))
    d.rectangle([w * 0.25, h * 0.18, w * 0.75, h * 0.55], fill=tuple(int(v) for v in top))
    d.rectangle([w * 0.3, h * 0.55, w * 0.7, h * 0.97], fill=tuple(int(v) for v in bottom))
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float32) + rng.normal(
        0, 4, (h, w, 3)
    )
    return arr.clip(0, 255).astype(np.uint8)


def encode(image: np.ndarray, fmt: str = "JPEG", **save: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, fmt, **save)
    return buf.getvalue()


def write_demo_images(folder: str | Path, n: int, bad: bool = True) -> pa.Table:
    """Write ``n`` generated images under ``folder/images`` and ``folder/manifest.parquet``.

    With ``bad``, the manifest also lists a corrupt file and a missing one, to show the error rows.
    ``uri`` values are relative to the manifest's folder. Returns the manifest.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    ids, uris, skus = [], [], []
    for i in range(n):
        name = f"product-{i:04d}.jpg"
        (folder / "images" / name).write_bytes(
            encode(product_image(i, SIZES[i % len(SIZES)]), quality=92)
        )
        ids.append(f"product-{i:04d}")
        uris.append(f"images/{name}")
        skus.append(f"SKU-{1000 + i}")
    if bad:
        (folder / "images" / "corrupt.jpg").write_bytes(
            b"\xff\xd8\xff\xe0 this is not really a JPEG"
        )
        ids += ["corrupt-file", "missing-file"]
        uris += ["images/corrupt.jpg", "images/does-not-exist.jpg"]
        skus += ["SKU-BAD-1", "SKU-BAD-2"]
    table = pa.table({"image_id": ids, "uri": uris, "sku": skus})
    pq.write_table(table, folder / "manifest.parquet")
    return table


def write_demo_clip(
    path: str | Path, seconds: float = 3.0, fps: int = 24, size: tuple[int, int] = (160, 120)
) -> Path:
    """An mp4v clip of a red ball rolling left to right and a green box sliding down, on grass."""
    import cv2

    w, h = size
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))  # type: ignore[attr-defined]
    if not writer.isOpened():
        raise RuntimeError("cv2.VideoWriter (mp4v) could not be opened")
    rng = np.random.default_rng(0)
    bg = np.clip(np.array([40, 120, 50]) + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(
        np.uint8
    )  # BGR grass
    frames = int(seconds * fps)
    for t in range(frames):
        frame = bg.copy()
        cv2.circle(frame, (int(10 + (w - 20) * t / frames), h // 2), h // 6, (30, 30, 220), -1)
        y = int((h - 30) * t / frames)
        cv2.rectangle(frame, (w // 4, y), (w // 4 + 25, y + 25), (40, 200, 40), -1)
        writer.write(frame)
    writer.release()
    return path
