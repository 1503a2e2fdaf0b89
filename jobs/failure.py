"""A job that fails as a whole is reported in one line: its cause, not Ray's wrapping of it.

An error raised in an actor's constructor (a checkpoint that does not fit, say) reaches the driver
as ``ActorDiedError`` or ``RayTaskError`` text around the remote traceback, with ANSI colours, and
the real cause 30–50 lines further down. :func:`describe_failure` digs it out; ``-v`` still prints
the whole traceback.
"""

from __future__ import annotations

import re

from vbatch.operators.redact import redact_uri

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# "module.Name: message" or "NameError: message" at the start of a traceback's last lines
_EXC_LINE = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception|Exit|Interrupt)): (.+)$")
# wrappers whose own text is not the cause
_WRAPPERS = {
    "RayTaskError",
    "RayActorError",
    "ActorDiedError",
    "ActorUnschedulableError",
    "UserCodeException",
    "RayError",
    "TaskExecutionError",
}


def _strip(text: str) -> str:
    return _ANSI.sub("", text)


def _is_wrapper(e: BaseException) -> bool:
    return any(
        c.__name__ in _WRAPPERS or c.__name__.startswith("RayTaskError") for c in type(e).__mro__
    )


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in out and len(out) < 16:
        out.append(cur)
        nxt = getattr(cur, "cause", None)  # RayTaskError keeps the remote exception here
        if not isinstance(nxt, BaseException):
            nxt = cur.__cause__ or cur.__context__
        cur = nxt
    return out


def describe_failure(e: BaseException) -> str:
    """One line naming the cause of a failed job.

    Args:
        e: what the job raised on the driver.

    Returns:
        ``"CheckpointError: checkpoint … does not fit …"``-style text without ANSI codes, with
        the credentials of any signed URL in it redacted.
    """
    return redact_uri(_describe(e))


def _describe(e: BaseException) -> str:
    chain = _chain(e)
    own = [x for x in chain if not _is_wrapper(x)]
    if own:
        cause = own[-1] if _is_wrapper(chain[0]) else own[0]
        text = _strip(str(cause)).strip()
        if text and not _is_ray_text(text):
            first = text.splitlines()[0]
            return f"{type(cause).__name__}: {first}"
    # only Ray's text is left: the remote traceback is inside it, last exception line last
    for x in chain:
        lines = [ln.strip() for ln in _strip(str(x)).splitlines()]
        found = [m for m in map(_EXC_LINE.match, lines) if m and m.group(1) not in _WRAPPERS]
        if found:
            return f"{found[-1].group(1)}: {found[-1].group(2)}"
    text = _strip(str(e)).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _is_ray_text(text: str) -> bool:
    return "Traceback (most recent call last)" in text or "ray::" in text
