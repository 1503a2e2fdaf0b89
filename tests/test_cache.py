"""The node-local caches (model directories, videos) and their refusal of unsafe object keys."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vbatch.operators.cache import (
    UnsafeKeyError,
    check_key,
    evict_videos,
    localize_dir,
    localize_video,
)
from vbatch.operators.storage import Storage, join


class ListingFS:
    """An object store that lists whatever keys it is given (S3 accepts ``..`` in keys; the test
    server normalises them away, so the listing is made up here)."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects
        self.downloads: list[str] = []

    def find(self, path: str, detail: bool = False) -> dict:
        return {
            k: {"size": len(v), "ETag": f'"{hash(v)}"', "type": "file"}
            for k, v in self.objects.items()
        }

    def info(self, path: str) -> dict:
        return {"size": len(self.objects[path]), "ETag": '"1"', "type": "file"}

    def get_file(self, key: str, local: str) -> None:
        self.downloads.append(key)
        Path(local).write_bytes(self.objects[key])


class ListingStorage(Storage):
    def __init__(self, fs: ListingFS) -> None:
        super().__init__()
        self.listing = fs

    def fs(self, uri: str):  # type: ignore[override]
        return self.listing, uri.split("://", 1)[1]


def test_model_dir_is_downloaded_once_and_again_when_changed(tmp_path: Path) -> None:
    fs = ListingFS({"b/m/config.json": b"{}", "b/m/sub/weights.pt": b"w" * 10})
    storage = ListingStorage(fs)
    local = localize_dir(storage, "s3://b/m", tmp_path)
    assert (local / "sub" / "weights.pt").read_bytes() == b"w" * 10
    assert (local / "config.json").read_bytes() == b"{}" and local.parent == tmp_path / "model-dirs"
    assert localize_dir(storage, "s3://b/m", tmp_path) == local and len(fs.downloads) == 2
    assert storage.localize_dir("s3://b/m", tmp_path) == local  # the Storage method delegates
    fs.objects["b/m/config.json"] = b'{"v": 2}'
    assert localize_dir(storage, "s3://b/m", tmp_path) != local
    assert [p.name for p in (tmp_path / "model-dirs").iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("b/m/../../evil.pth", "'..' segment"),
        ("b/m/sub/../../../../evil.pth", "'..' segment"),
        ("b/m/..", "'..' segment"),
        ("b/m//evil.pth", "an absolute path"),
        ("b/m/sub//evil.pth", "empty segment"),
        ("b/m/./evil.pth", "'.' segment"),
        ("b/m/sub/", "empty segment"),  # not a folder marker: it has bytes
        ("b/other/evil.pth", "not under 'b/m/'"),
    ],
)
def test_model_dir_refuses_keys_that_leave_the_folder(
    tmp_path: Path, key: str, problem: str
) -> None:
    fs = ListingFS({"b/m/config.json": b"{}", key: b"import os  # would run at start-up"})
    with pytest.raises(UnsafeKeyError, match=problem) as err:
        localize_dir(ListingStorage(fs), "s3://b/m", tmp_path / "cache")
    assert repr(key.split("b/m/", 1)[-1]) in str(err.value) or repr(key) in str(err.value)
    assert "model directory s3://b/m" in str(err.value)
    assert fs.downloads == []  # refused before anything is written
    assert not list(tmp_path.rglob("evil.pth"))
    assert not list((tmp_path / "cache").rglob("*"))  # not even an empty staging folder


def test_model_dir_skips_folder_markers(tmp_path: Path) -> None:
    fs = ListingFS({"b/m/config.json": b"{}", "b/m/sub/": b""})  # 0-byte "sub/", as consoles make
    local = localize_dir(ListingStorage(fs), "s3://b/m", tmp_path)
    assert sorted(p.name for p in local.iterdir()) == ["config.json"]


def test_check_key_accepts_ordinary_keys() -> None:
    for key in ("config.json", "a/b/c.pt", "..a/b..", "a/.hidden", "a b/c"):
        check_key(key, "x")


def test_video_cache_refuses_unsafe_keys(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("VBATCH_CACHE", str(tmp_path))
    fs = ListingFS({"b/v/../../x.mp4": b"v", "b/v//x.mp4": b"v", "b/v/x.mp4": b"v"})
    storage = ListingStorage(fs)
    for uri in ("s3://b/v/../../x.mp4", "s3://b/v//x.mp4"):
        with pytest.raises(UnsafeKeyError, match=r"video s3://b/v/.*refusing object key"):
            localize_video(storage, uri)
    assert fs.downloads == []
    assert Path(localize_video(storage, "s3://b/v/x.mp4")).read_bytes() == b"v"


def test_model_dir_on_the_s3_server(s3_server, tmp_path: Path) -> None:
    storage = s3_server.storage()
    bucket = s3_server.new_bucket()
    storage.write_bytes(join(bucket, "m", "config.json"), b"{}")
    storage.write_bytes(join(bucket, "m", "sub", "w.pt"), b"w")
    local = localize_dir(storage, join(bucket, "m"), tmp_path)
    assert sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()) == [
        "config.json",
        "sub/w.pt",
    ]
    with pytest.raises(FileNotFoundError, match="not found or empty"):
        localize_dir(storage, join(bucket, "nothing"), tmp_path)


# -- the per-node video cache (LRU) ------------------------------------------------------------
def test_video_cache_evicts_least_recently_used_outside_the_grace_period(tmp_path: Path) -> None:
    now = os.path.getmtime(tmp_path)
    files = []
    for i, age in enumerate([4000, 3000, 2000, 10]):  # seconds since last use; the last is recent
        f = tmp_path / f"v{i}.mp4"
        f.write_bytes(b"x" * 100)
        os.utime(f, (now - age, now - age))
        files.append(f)
    (tmp_path / ".v9.mp4.partial").write_bytes(b"x" * 1000)  # a download in progress: never counted
    assert evict_videos(tmp_path, 250, grace_s=600) == files[:2]
    assert [f.exists() for f in files] == [False, False, True, True]
    # over the bound again, but the only other file was used within the grace period: kept
    assert evict_videos(tmp_path, 50, grace_s=600) == [files[2]]
    assert files[3].exists() and (tmp_path / ".v9.mp4.partial").exists()
    assert evict_videos(tmp_path, 50, grace_s=0) == [files[3]]


def test_localize_video_caches_s3_objects_within_the_bound(
    s3_server, tmp_path, monkeypatch
) -> None:
    storage = s3_server.storage()
    bucket = s3_server.new_bucket()
    uris = [join(bucket, f"v{i}.mp4") for i in range(3)]
    for i, uri in enumerate(uris):
        storage.write_bytes(uri, bytes([i]) * 1000)
    monkeypatch.setenv("VBATCH_CACHE", str(tmp_path))
    monkeypatch.setenv("VBATCH_VIDEO_CACHE_GB", str(2500 / 1e9))  # room for two of them
    monkeypatch.setattr("vbatch.operators.cache.EVICTION_GRACE_S", 0.0)
    first = localize_video(storage, uris[0])
    assert localize_video(storage, uris[0]) == first  # a hit: no second download
    paths = [localize_video(storage, uri) for uri in uris[1:]]
    cached = sorted(p.name for p in (tmp_path / "videos").iterdir())
    assert cached == sorted(os.path.basename(p) for p in paths)  # the least recently used went
    assert Path(paths[1]).read_bytes() == bytes([2]) * 1000
    assert Path(localize_video(storage, uris[0])).read_bytes() == bytes([0]) * 1000  # fetched again
    storage.write_bytes(join(bucket, "v-new.mp4"), b"y")
    monkeypatch.setenv("VBATCH_VIDEO_CACHE_GB", "lots")
    with pytest.raises(ValueError, match="VBATCH_VIDEO_CACHE_GB"):
        localize_video(storage, join(bucket, "v-new.mp4"))
