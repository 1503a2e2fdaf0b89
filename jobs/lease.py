"""One writer per ``--out``: a lease object that a run creates before it writes anything.

Two runs on one ``--out`` (a backfill overlapping the nightly run, a retry started while the
first attempt still runs) would delete each other's staging and generations. So a run first
creates ``<out>/_LEASE`` with a create-only write (``O_EXCL`` locally, ``If-None-Match: *`` on S3:
of two runs exactly one succeeds), holding its run id, host, process and start time, and keeps it
fresh with a heartbeat (a rewrite every :data:`HEARTBEAT_SECONDS`). A second run finds the lease
and exits 1 at once, naming the holder.

A lease whose holder died stays behind. It is taken over automatically when it is provably
stale: its holder ran on this host and its process is gone, or its heartbeat is older than
:data:`STALE_SECONDS` (ten heartbeats missed: a live driver renews every minute, and a store
unreachable for that long fails the run anyway). ``--break-lease`` takes over any lease, for an
operator who knows its holder is dead. Before it commits, a run checks that the lease is still
its own: a run that lost its lease (it stalled past the stale time and another took over)
publishes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from vbatch.jobs.summary import JobFailed, utc_iso
from vbatch.operators.storage import Storage, is_remote, join

logger = logging.getLogger(__name__)

LEASE = "_LEASE"
#: seconds between heartbeats (rewrites of the lease)
HEARTBEAT_SECONDS = 60.0
#: a lease without a heartbeat for this long belongs to a dead run (``VBATCH_LEASE_STALE_SECONDS``)
STALE_SECONDS = 600.0


def stale_seconds() -> float:
    return float(os.environ.get("VBATCH_LEASE_STALE_SECONDS", STALE_SECONDS))


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: what a refused run prints."""

    run_id: str
    command: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float

    def describe(self) -> str:
        age = time.time() - self.heartbeat_at
        return (
            f"run {self.run_id} ({self.command}) on {self.host}, pid {self.pid}, since "
            f"{utc_iso(self.started_at)}, last heartbeat {age:.0f} s ago"
        )


class LeaseHeld(JobFailed):
    """Another run holds the ``--out``'s lease (exit 1, nothing written)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class Lease:
    """The lease of one ``--out`` for one run; a context manager (acquire, heartbeat, release).

    Args:
        out: the job's ``--out``.
        storage: reaches it.
        run_id: this run's id.
        command: this run's command (for the holder's description).
        break_lease: take over a lease even when its holder looks alive (``--break-lease``).
    """

    def __init__(
        self, out: str, storage: Storage, run_id: str, command: str, break_lease: bool = False
    ) -> None:
        self.uri = join(out, LEASE)
        self.out, self.storage, self.break_lease = out, storage, break_lease
        now = time.time()
        self.holder = Holder(run_id, command, socket.gethostname(), os.getpid(), now, now)
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the lease object ------------------------------------------------------------------------
    def _data(self) -> bytes:
        beat = Holder(**{**asdict(self.holder), "heartbeat_at": time.time()})
        return json.dumps(asdict(beat), indent=1).encode()

    def read(self) -> Holder | None:
        """The lease's holder; ``None`` without a lease. A lease that cannot be parsed (a local
        file being written) reads as a holder that beat when the object was last modified."""
        try:
            data = self.storage.read_bytes(self.uri)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            return Holder(**json.loads(data))
        except (ValueError, TypeError):
            try:
                info = self.storage.info(self.uri)
                stamp = info.get("LastModified") or info.get("mtime") or time.time()
                beat = stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp)
            except FileNotFoundError:
                return None
            return Holder("unknown", "unknown", "unknown", -1, beat, beat)

    def _stale(self, holder: Holder) -> str | None:
        """Why ``holder`` is dead, or ``None`` when it may be alive."""
        if holder.host == self.holder.host and holder.pid > 0 and not _alive(holder.pid):
            return f"its process {holder.pid} on this host is gone"
        age = time.time() - holder.heartbeat_at
        if age > stale_seconds():
            return f"no heartbeat for {age:.0f} s (> {stale_seconds():.0f} s)"
        return None

    # -- acquire, keep, check, release -----------------------------------------------------------
    def acquire(self) -> None:
        """Create the lease, or take over a dead run's; raise :class:`LeaseHeld` otherwise."""
        if self.storage.create(self.uri, self._data()):
            return
        holder = self.read()
        if holder is not None and holder.run_id == self.holder.run_id:
            return  # our own create, retried after its first attempt landed
        if holder is None:  # released between our create and our read: try once more
            if self.storage.create(self.uri, self._data()):
                return
            holder = self.read()
            if holder is None:
                raise LeaseHeld(f"{self.out}: its lease changes hands too fast to take")
        why = "--break-lease" if self.break_lease else self._stale(holder)
        if why is None:
            raise LeaseHeld(
                f"{self.out} is being written by {holder.describe()}: one run per --out at a "
                f"time. If that run is dead, rerun with --break-lease (a lease without a heartbeat "
                f"for {stale_seconds():.0f} s is taken over without it)."
            )
        logger.warning("%s: taking over the lease of %s (%s)", self.out, holder.describe(), why)
        self.storage.write_bytes(self.uri, self._data())
        # two runs taking over at once: the last write wins, the other finds out here
        time.sleep(0 if not is_remote(self.uri) else 1.0)
        now = self.read()
        if now is None or now.run_id != self.holder.run_id:
            raise LeaseHeld(f"{self.out}: another run took the lease over at the same time")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                holder = self.read()
                if holder is None or holder.run_id != self.holder.run_id:
                    self.lost = holder.describe() if holder else "nobody (the lease was deleted)"
                    logger.error("%s: lost the lease to %s", self.out, self.lost)
                    return
                self.storage.write_bytes(self.uri, self._data())
            except Exception as e:  # the store may be down for a while: the next beat retries
                logger.warning("%s: lease heartbeat failed: %s", self.out, e)

    def check(self) -> None:
        """Before committing: raise ``JobFailed`` when the lease is no longer this run's."""
        holder = self.read()
        if self.lost is not None or holder is None or holder.run_id != self.holder.run_id:
            who = self.lost or (holder.describe() if holder else "nobody")
            raise JobFailed(
                f"{self.out}: this run lost its lease to {who} (it stalled past "
                f"{stale_seconds():.0f} s); nothing was published"
            )

    def release(self) -> None:
        """Delete the lease if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            holder = self.read()
            if holder is not None and holder.run_id == self.holder.run_id:
                self.storage.delete(self.uri)
        except Exception as e:  # a lease left behind is taken over once stale
            logger.warning("%s: could not release the lease: %s", self.out, e)

    def __enter__(self) -> Lease:
        self.acquire()
        self._thread = threading.Thread(target=self._beat, name="vbatch-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
