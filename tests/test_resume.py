"""Resume after a crash (``jobs.resume``): the rerun of the same command processes only the rows
the crashed run had not staged, and the published table has every manifest row exactly once.

A real driver killed mid-run, then the same command again, is the row-job contract's
(``tests/test_row_jobs.py``, every job on both stores); here, the pieces it rests on.

The job runs as its own process with ``VBATCH_FAULT=hang:<N>``: the batch holding manifest row N
blocks before the write stage, the rows before it are staged, and the test SIGKILLs the driver's
process group (the driver and the Ray it started), as a lost node or a cancelled job would.
Which rows the rerun processed is read from the results themselves: a resumed row keeps the
``processed_at`` of the crashed run.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from vbatch.jobs.config import key_fields
from vbatch.jobs.resume import drop_done, run_key
from vbatch.jobs.segment import ImageJobConfig
from vbatch.operators.manifest import ERROR, ROW, id_hashes


def test_drop_done_keeps_rows_not_staged() -> None:
    batch = pa.table(
        {
            "image_id": pa.array(["a", "b", "c", "a", None], pa.string()),
            ROW: pa.array([0, 1, 2, 3, 4], pa.int64()),
            ERROR: pa.array(
                [None, None, None, "manifest row 3: duplicate", "manifest row 4: null"]
            ),
        }
    )
    done_ids = np.sort(id_hashes(pa.array(["a", "c"])))
    kept = drop_done(batch, done_ids, np.array([4], np.int64))
    # "a" and "c" were staged; the duplicate of "a" (row 3) was not, the null id (row 4) was
    assert kept.column(ROW).to_pylist() == [1, 3]
    assert drop_done(batch, np.empty(0, np.uint64), np.empty(0, np.int64)).num_rows == 5


def test_run_key_ignores_pool_settings_only() -> None:
    config = ImageJobConfig("salient", "m", "d", "o", batch_size=4, actors=2)

    def key(cfg: ImageJobConfig, manifest: int = 10, model: str = "v1:aa") -> str:
        return run_key(key_fields(cfg), [["m", manifest, "t"]], [model])

    base = key(config)
    assert key(dataclasses.replace(config, batch_size=8, actors=1)) == base
    # placement and locations decide no row either: a retry with them added still resumes
    moved = dataclasses.replace(
        config, forward_s3_env=True, actor_resources={"gpu": 1}, model_dir="s3://b/d", out="x"
    )
    assert key(moved) == base
    assert key(dataclasses.replace(config, max_side=1000)) != base
    assert key(config, manifest=11) != base  # manifest changed
    assert key(config, model="v2:aa") != base  # weights rewritten


def test_every_config_field_has_a_role() -> None:
    """The run key, --reuse and the backfill pool derive from each field's role: a field
    without one fails here (and when its class is used)."""
    from vbatch.jobs.config import RESULT, check_roles, role
    from vbatch.jobs.reid_search import SearchJobConfig
    from vbatch.jobs.video import VideoConfig

    for cls in (ImageJobConfig, VideoConfig, SearchJobConfig):
        check_roles(cls)

    @dataclasses.dataclass(frozen=True)
    class Grown(ImageJobConfig):
        new_option: int = 3
        decided: int = role(RESULT, 1)

    with pytest.raises(TypeError, match="new_option"):
        check_roles(Grown)
