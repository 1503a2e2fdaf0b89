"""``ray job submit … -- vbatch segment …`` against a ``ray start --head`` cluster, as the README says.

The head runs in its own process group (``ray start --block``) with its own temp dir and ports, and
is stopped by signalling that group: ``ray stop`` would stop every Ray instance on the machine.
Every port it opens is its own, the dashboard agent's included: Ray's default for that one is a
fixed 52365, which the test session's own Ray (``ray_session``) or another Ray on the machine
already holds, and a head whose agent cannot bind it starts without the agent's HTTP server, which
is where the job server sends the job; the submission then fails. ``ray job submit`` needs Ray's job
server, part of the dashboard (``ray[default]``, in the ``dev`` extra); without its packages the
test is skipped, naming the missing one.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vbatch.jobs.demo_data import encode, product_image
from vbatch.jobs.publish import read_table
from vbatch.operators.storage import Storage

#: Ray, though not the session's: a `ray start` head of its own, in a subprocess (not the fast tier)
pytestmark = pytest.mark.ray

RAY = [sys.executable, "-m", "ray.scripts.scripts"]
START_ATTEMPTS = 3
#: the job (a 6-image segment run on a 2-CPU head) takes under a minute on a quiet 2-core machine
SUBMIT_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job_server_missing() -> str | None:
    try:
        import ray.dashboard.optional_deps  # noqa: F401
    except ImportError as e:
        return str(e)
    return None


@pytest.mark.skipif(
    _job_server_missing() is not None,
    reason=(
        "`ray job submit` needs Ray's job server, part of the dashboard (pip install 'ray[default]'); "
        f"this environment has ray[data] only: `ray start --head --include-dashboard true` fails "
        f"with 'Cannot include dashboard with missing packages' ({_job_server_missing()})"
    ),
)
def test_ray_job_submit_segment(tmp_path: Path) -> None:
    from vbatch.models.salient.config import SENET_TINY
    from vbatch.models.salient.modeldir import write_random_model_dir

    model_dir = write_random_model_dir(tmp_path / "salient", SENET_TINY, norm_size=(32, 32))
    ids = [f"img-{i}" for i in range(6)]
    (tmp_path / "imgs").mkdir()
    for i, image_id in enumerate(ids):
        (tmp_path / "imgs" / f"{image_id}.jpg").write_bytes(encode(product_image(i, (40, 32))))
    buf = io.BytesIO()
    pq.write_table(pa.table({"image_id": ids, "uri": [f"imgs/{i}.jpg" for i in ids]}), buf)
    (tmp_path / "manifest.parquet").write_bytes(buf.getvalue())
    working_dir = tmp_path / "wd"
    working_dir.mkdir()
    (working_dir / "README.txt").write_text("the job's working directory\n")

    env = {
        **os.environ,
        # `vbatch` on the job's PATH (the head runs the entrypoint with its own environment)
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        # a machine with ~/.ray/auth_token starts clusters with token authentication; say so
        # explicitly, so that `ray start`, the job client and the job's driver all agree
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token"),
        "RAY_ADDRESS": "",
        # Ray waits 60 s for its dashboard (the job server) by default: too short on a loaded
        # 2-core machine ("Failed to start the dashboard")
        "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300",
    }
    head, url, temp = None, "", ""
    try:
        # Ray gives a starting node a fixed 30 s to register: a loaded machine may miss it
        for _attempt in range(START_ATTEMPTS):
            head, url, temp, failure = _start_head(env, tmp_path / f"head-{_attempt}.log")
            if not failure:
                break
            _stop(head, temp)
            head = None
        else:
            pytest.fail(f"the Ray head did not start: {failure[-3000:]}")
        out_dir = tmp_path / "out"
        command = [
            *RAY, "job", "submit", "--address", url, "--working-dir", str(working_dir), "--",
            "vbatch", "segment", "--task", "salient",
            "--manifest", str(tmp_path / "manifest.parquet"),
            "--model-dir", str(model_dir), "--out", str(out_dir), "--batch-size", "2",
            "--report-samples", "0",
        ]  # fmt: skip
        # the job server gives the head's agent 10 s to be known (Ray's WAIT_AVAILABLE_AGENT_TIMEOUT,
        # fixed) and otherwise answers "No available agent to submit job, please try again later"
        # without creating the job: a loaded machine's agent may register later, so try again
        deadline = time.monotonic() + SUBMIT_TIMEOUT_S
        while True:
            try:
                submit = subprocess.run(
                    command, env=env, capture_output=True, text=True, timeout=SUBMIT_TIMEOUT_S
                )
            except subprocess.TimeoutExpired as e:
                pytest.fail(
                    f"`ray job submit` still running after {SUBMIT_TIMEOUT_S} s; its output:\n"
                    f"{_text(e.stdout)[-3000:]}{_text(e.stderr)[-3000:]}\n{_ray_logs(temp)}"
                )
            retry = "No available agent to submit job" in submit.stdout + submit.stderr
            if submit.returncode == 0 or not retry or time.monotonic() > deadline:
                break
            time.sleep(5)
        log = submit.stdout + submit.stderr
        assert submit.returncode == 0, f"{log[-6000:]}\n{_ray_logs(temp)}"
        assert "succeeded" in log
        table = read_table(str(out_dir), Storage())
        assert sorted(table.column("image_id").to_pylist()) == ids
        assert set(table.column("status").to_pylist()) == {"ok"}
    finally:
        if head is not None:
            _stop(head, temp)


def _start_head(env: dict, log_path: Path) -> tuple[subprocess.Popen, str, str, str]:
    """(process, dashboard URL, temp dir, failure output or "") of a ``ray start --head --block``
    in its own process group."""
    port, dashboard, agent = _free_port(), _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="vbrj-", dir="/tmp")  # short: Ray's socket paths have a limit
    start = [
        *RAY, "start", "--head", "--block", f"--port={port}",
        f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
        "--include-dashboard=true", "--num-cpus=2", f"--temp-dir={temp}",
        # Ray's fixed defaults (10001, 52365) may be held by another Ray on the machine
        f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={agent}",
        # the default is 30 % of the machine's memory, next to the test session's own Ray
        "--object-store-memory=300000000",
        "--disable-usage-stats",
    ]  # fmt: skip
    # RAY_TMPDIR too: nothing of this cluster lands in /tmp/ray, where a plain ray.init() of
    # another process would find its address (ray_current_cluster) and join it
    env = {**env, "RAY_TMPDIR": temp}
    with open(log_path, "wb") as log:  # a file, not a pipe: --block keeps writing to it
        head = subprocess.Popen(
            start, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 600
    while True:
        try:
            # the job agent (which runs the job) listening first, then the dashboard answering
            socket.create_connection(("127.0.0.1", agent), timeout=5).close()
            urllib.request.urlopen(f"{url}/api/version", timeout=5).read()
            return head, url, temp, ""
        except urllib.error.HTTPError:
            # it answers: with token authentication (RAY_AUTH_MODE=token) a request without the
            # token gets 401, which `ray job submit` sends
            return head, url, temp, ""
        except Exception:
            if head.poll() is not None:
                return head, url, temp, log_path.read_text(errors="replace") or "exited"
            if time.monotonic() > deadline:
                return head, url, temp, "no answer from the dashboard in 600 s"
            time.sleep(1)


def _text(out: str | bytes | None) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else out or ""


def _ray_logs(temp: str, chars: int = 2000) -> str:
    """The end of the head's logs that say why a job did not run: the dashboard (job server),
    its agent (the job's supervisor), the raylet and the job's driver."""
    logs = Path(temp, "session_latest", "logs")
    if not logs.is_dir():
        return f"(no Ray logs under {temp})"
    names = ["dashboard.log", "dashboard_agent.log", "raylet.out"]
    picked = [logs / n for n in names if (logs / n).exists()]
    picked += sorted(logs.glob("job-driver-*.log"))
    return "\n".join(f"== {p.name}:\n{p.read_text(errors='replace')[-chars:]}" for p in picked)


def _stop(head: subprocess.Popen, temp: str) -> None:
    """Stop the head's own process group: this cluster and nothing else on the machine (``ray
    stop`` would stop every Ray instance on it)."""
    try:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
    except ProcessLookupError:
        pass
    shutil.rmtree(temp, ignore_errors=True)
