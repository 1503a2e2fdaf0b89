"""A damaged index is reported with the file and what is wrong with it (issue 17 item 9)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.index_data import clustered, write_embeddings
from vbatch.operators import index as fi
from vbatch.operators.storage import Storage


@pytest.fixture
def built(tmp_path) -> tuple[Path, fi.IndexInfo]:
    x, _ = clustered(10, 5, 16, seed=4)
    write_embeddings(tmp_path / "emb", x)
    info = fi.build_index(str(tmp_path / "emb"), str(tmp_path / "index"), Storage())
    return tmp_path / "index", info


def _edit_manifest(index: Path, **changes) -> None:
    data = json.loads((index / "index.json").read_text())
    for key, value in changes.items():
        if value is ...:
            data.pop(key)
        else:
            data[key] = value
    (index / "index.json").write_text(json.dumps(data))


def test_truncated_index_file_names_the_file(built):
    index, info = built
    path = index / info.index_file
    assert info.index_bytes == path.stat().st_size
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError) as err:
        fi.GalleryIndex.open(str(index), Storage())
    assert str(path) in str(err.value) and "truncated (100 bytes" in str(err.value)
    # a manifest written before index_bytes was kept: faiss' error, named and explained
    _edit_manifest(index, index_bytes=...)
    with pytest.raises(ValueError) as err:
        fi.GalleryIndex.open(str(index), Storage())
    text = str(err.value)
    assert str(path) in text and "truncated or not a faiss index file" in text
    assert "vbatch-index-" not in text  # never the local temporary copy


def test_malformed_manifest_names_the_file(built):
    index, _ = built
    (index / "index.json").write_text('{"factory": "Flat", ')
    with pytest.raises(ValueError, match=r"index\.json: not valid JSON") as err:
        fi.GalleryIndex.open(str(index), Storage())
    assert str(index / "index.json") in str(err.value)
    (index / "index.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        fi.read_info(str(index), Storage())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"metric": "cosine"}, "unknown metric 'cosine'"),
        ({"nprobe": -3}, "nprobe must be an integer >= 1 or null, got -3"),
        ({"nprobe": 0}, "nprobe must be"),
        ({"dim": "16"}, "dim must be a positive integer"),
        ({"count": -1}, "count must be"),
        ({"index_file": "../../elsewhere.faiss"}, "is not index-NNNNN.faiss"),
        ({"id_parts": ["/etc/passwd"]}, "are not a list of ids/part-NNNNN"),
        ({"factory": ...}, r"missing field\(s\) \['factory'\]"),
    ],
)
def test_impossible_manifest_values_are_refused(built, changes, message):
    index, _ = built
    _edit_manifest(index, **changes)
    with pytest.raises(ValueError, match=message) as err:
        fi.GalleryIndex.open(str(index), Storage())
    assert "index.json" in str(err.value)


def test_damaged_id_map_names_the_part(built):
    index, info = built
    part = index / info.id_parts[0]
    part.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="unreadable id map part") as err:
        fi.GalleryIndex.open(str(index), Storage())
    assert str(part) in str(err.value)
