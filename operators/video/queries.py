"""Which of a video's text queries can run: the manifest's rules plus the text encoder's limit.

All queries of a video share one forward per window, so one query the encoder cannot take would
fail every other query of that video (RoBERTa has 512 positions; a longer query indexes past its
position table). Queries are therefore checked once, on the driver, before any window runs: a query
that is null, empty or too long becomes an error row of its own, and the others run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from vbatch.schemas.videos import query_errors

#: a model's check of runnable queries: one problem (or ``None``) per query
QueryCheck = Callable[[Sequence[str]], list[str | None]]


def rvos_query_check(model_dir: Path) -> QueryCheck:
    """The token-length check of MTTR's text encoder, from a local model directory.

    Args:
        model_dir: the local model directory (its ``transformer_cfg_dir`` tokenizer and config).

    Returns:
        A function giving, per query, ``"query has N tokens; the text encoder takes at most M"`` or
        ``None``. Counted on the normalised query, as the predictor tokenises it.
    """
    from vbatch.models.rvos.config import TEXT_DIR, read_text_config
    from vbatch.models.rvos.text import load_tokenizer, max_query_tokens, normalize_query

    text_dir = Path(model_dir) / TEXT_DIR
    tokenizer = load_tokenizer(text_dir)
    limit = max_query_tokens(read_text_config(text_dir))

    def check(queries: Sequence[str]) -> list[str | None]:
        # A byte-level BPE token covers at least one UTF-8 byte, plus <s> and </s>: only a query of
        # more than limit - 2 bytes can be too long, and only those are tokenised (a manifest of
        # 100k ordinary queries costs nothing here).
        texts = [normalize_query(q) for q in queries]
        suspects = sorted({t for t in texts if len(t.encode()) > limit - 2})
        counts = (
            dict(zip(suspects, (len(i) for i in tokenizer(suspects)["input_ids"]), strict=True))
            if suspects  # (the tokenizer fails on an empty batch)
            else {}
        )
        return [
            None
            if (n := counts.get(t, 0)) <= limit
            else f"query has {n} tokens; the text encoder takes at most {limit} (shorten it)"
            for t in texts
        ]

    return check


def all_query_errors(
    queries: Sequence[Sequence[str | None] | None], check: QueryCheck | None = None
) -> list[list[str | None]]:
    """Per video, per query: why it cannot run (``None`` when it can).

    Args:
        queries: every video's query list, in manifest order.
        check: the model's check (e.g. :func:`rvos_query_check`), run on the queries the
            manifest's rules (:func:`vbatch.schemas.videos.query_errors`) let through.

    Returns:
        One list per video, as long as its query list.
    """
    errors = [query_errors(qs) for qs in queries]
    if check is None:
        return errors
    todo = [
        (v, i, q)
        for v, qs in enumerate(queries)
        for i, q in enumerate(qs or [])
        if errors[v][i] is None and q is not None
    ]
    for (v, i, _), problem in zip(todo, check([q for _, _, q in todo]), strict=True):
        errors[v][i] = problem
    return errors


def valid_queries(
    queries: Sequence[str | None] | None, errors: Sequence[str | None] | None
) -> list[tuple[int, str]]:
    """(index in the manifest's list, text) of the queries that can run.

    Args:
        queries: one video's queries. errors: their problems (:func:`all_query_errors`), ``None``
            for a row without them (a video that failed before its queries were checked).
    """
    errors = query_errors(queries) if errors is None else errors
    return [
        (i, q)
        for i, (q, e) in enumerate(zip(queries or [], errors, strict=True))
        if e is None and q is not None
    ]
