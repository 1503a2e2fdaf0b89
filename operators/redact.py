"""Credentials out of every echoed URI: signed URLs carry their secret in the query string.

A presigned S3 URL (``X-Amz-Signature``, ``X-Amz-Credential``, ``X-Amz-Security-Token``), a
CloudFront signed URL (``Signature``, ``Policy``, ``Key-Pair-Id``), an Azure SAS (``sig``), a GCS
signed URL (``X-Goog-Signature``, ``X-Goog-Credential``) or a URL with ``user:password@`` lets
whoever reads it fetch the object until it expires. Error texts, logs, ``run.json``, the summary
on stdout (which Airflow keeps in XCom) and the report reach more people than the manifest does,
so every place that echoes a URI, or an exception text that may hold one, passes it through
:func:`redact_uri`. The results table's ``uri`` column keeps the manifest's value: it is the
user's own data, and the key a reader joins on.

Only the value is replaced (``X-Amz-Signature=REDACTED``): the text still says which kind of
credential the URL carried, and ``X-Amz-Expires``/``X-Amz-Date`` (not secret, often the reason a
signed URL fails) stay readable.
"""

from __future__ import annotations

import re
from typing import Any

#: what a secret is replaced with
MASK = "REDACTED"

#: query parameters whose value is a secret, or names the key that signed the URL (compared
#: case-insensitively)
SECRET_PARAMS = (
    # AWS SigV4 presigned URLs; AWSAccessKeyId/Signature: SigV2 and CloudFront
    "X-Amz-Signature",
    "X-Amz-Credential",
    "X-Amz-Security-Token",
    "AWSAccessKeyId",
    "Signature",
    # CloudFront signed URLs (a custom policy is signed, Key-Pair-Id names the signing key)
    "Policy",
    "Key-Pair-Id",
    # Google Cloud Storage signed URLs (V4 and V2)
    "X-Goog-Signature",
    "X-Goog-Credential",
    "GoogleAccessId",
    # Azure SAS
    "sig",
    # OAuth and API keys in URLs
    "token",
    "access_token",
    "id_token",
    "refresh_token",
    "client_secret",
    "api_key",
    "apikey",
    "key",
    "password",
    "secret",
)

_NAMES = "|".join(re.escape(n) for n in sorted(SECRET_PARAMS, key=len, reverse=True))
# what ends a value: the next parameter (also percent-encoded, inside another URL's query), the
# fragment, and whatever quotes or brackets a URL inside a message (``url='…'``, ``URL('…')``,
# ``<…>``, JSON); none of them occurs in a hex, base64 or percent-encoded secret
_END = r"&#\s\"'<>`\\()\[\]{},;|"
_PARAM = re.compile(
    # a parameter starts after ``?``, ``&`` or ``;``, percent-encoded (``%3F``, ``%26``) when the
    # URL is itself a parameter, or HTML-escaped (``&amp;``)
    rf"(?P<lead>(?:[?&;]|%3F|%26)(?:amp;)?(?:{_NAMES})(?:=|%3D))"
    # a ``:`` or ``.`` right before a space or the end punctuates the message around the URL
    rf"(?P<value>(?:(?!%26)[^{_END}])*?)(?=%26|[{_END}]|[:.](?:\s|$)|$)",
    re.IGNORECASE,
)
# ``scheme://user:password@host``: the password (the user name stays)
_USERINFO = re.compile(
    r"(?P<lead>\b[a-z][a-z0-9+.\-]*://[^\s/?#@:\"'<>]*:)(?P<value>[^\s/?#@\"'<>]*)(?=@)",
    re.IGNORECASE,
)


def redact_uri(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by :data:`MASK`.

    Works on a bare URI and on any message that quotes URLs (an exception text, a log line, JSON):
    the value of each query parameter named in :data:`SECRET_PARAMS` and the password of a
    ``user:password@`` URL are replaced; everything else is left as it was.

    Args:
        text: a URI or free text.

    Returns:
        The redacted text (``text`` itself when it holds nothing to redact).
    """
    if "=" not in text and "@" not in text:  # the common case: nothing that could hold a secret
        return text
    text = _PARAM.sub(lambda m: m.group("lead") + MASK, text)
    return _USERINFO.sub(lambda m: m.group("lead") + MASK, text)


def redact_value(value: Any) -> Any:
    """A copy of a JSON-like value (dicts, lists, tuples, strings) with every string redacted by
    :func:`redact_uri`; other values unchanged. For records that echo exception texts and URIs
    (the run summary).

    Args:
        value: e.g. a run record.

    Returns:
        The same structure, redacted.
    """
    if isinstance(value, str):
        return redact_uri(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(v) for v in value)
    return value
