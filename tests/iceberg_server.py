"""The tests' Iceberg catalog: the REST catalog of the session's SeaweedFS (``s3_server``).

``weed server -s3 -s3.port.iceberg=PORT`` serves an Iceberg REST catalog whose warehouses are
*table buckets*; ``weed server`` has no flag to create one, so :func:`iceberg_catalog` creates it
through the S3 Tables API (boto3's ``s3tables`` client against the S3 port). The catalog takes
pyiceberg's OAuth2 client credentials (``credential=KEY:SECRET``, tokens from
``/v1/oauth/tokens``), checked against the admin identity ``weed`` took from
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (tests/conftest.py). It does not hand clients its
S3 endpoint, so the properties name it.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.services import missing_service

#: the catalog name the tests configure (``PYICEBERG_CATALOG__VBTEST__…``)
CATALOG = "vbtest"


def catalog_env(name: str, properties: dict[str, str]) -> dict[str, str]:
    """pyiceberg's environment variables for catalog ``name``: ``.`` becomes ``__`` and ``-``
    becomes ``_`` (``s3.access-key-id`` -> ``PYICEBERG_CATALOG__NAME__S3__ACCESS_KEY_ID``)."""
    prefix = f"PYICEBERG_CATALOG__{name.upper()}__"
    return {
        prefix + k.replace(".", "__").replace("-", "_").upper(): v for k, v in properties.items()
    }


@dataclass(frozen=True)
class IcebergCatalog:
    """A configured catalog: its name (set in the environment) and its pyiceberg properties."""

    name: str
    properties: dict[str, str]

    def load(self):
        from pyiceberg.catalog import load_catalog

        return load_catalog(self.name, **self.properties)


def _wait_for_catalog(uri: str, properties: dict[str, str], timeout: float = 60) -> None:
    """Poll the catalog's token endpoint until it answers (it starts with the S3 gateway)."""
    user, secret = properties["credential"].split(":", 1)
    body = f"grant_type=client_credentials&client_id={user}&client_secret={secret}".encode()
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/v1/oauth/tokens", data=body, timeout=5) as r:
                json.load(r)
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            if time.monotonic() > deadline:
                pytest.fail(f"the Iceberg REST catalog at {uri} did not answer: {e}")
            time.sleep(0.3)


@pytest.fixture(scope="session")
def iceberg_catalog(s3_server) -> Iterator[IcebergCatalog]:
    """A table bucket on the session's SeaweedFS, configured as pyiceberg catalog ``vbtest``
    through ``PYICEBERG_CATALOG__VBTEST__*`` (for this process and its children)."""
    try:
        import pyiceberg  # noqa: F401
    except ImportError:
        missing_service("pyiceberg is not installed: pip install -e '.[iceberg]'")
    import boto3

    warehouse = f"vbatch-{uuid.uuid4().hex[:8]}"
    boto3.client("s3tables", endpoint_url=s3_server.endpoint).create_table_bucket(name=warehouse)
    uri = s3_server.iceberg_endpoint
    properties = {
        "type": "rest",
        "uri": uri,
        "warehouse": f"s3://{warehouse}",
        "credential": f"{os.environ['AWS_ACCESS_KEY_ID']}:{os.environ['AWS_SECRET_ACCESS_KEY']}",
        "oauth2-server-uri": f"{uri}/v1/oauth/tokens",
        "s3.endpoint": s3_server.endpoint,
        "s3.access-key-id": os.environ["AWS_ACCESS_KEY_ID"],
        "s3.secret-access-key": os.environ["AWS_SECRET_ACCESS_KEY"],
        "s3.region": os.environ["AWS_DEFAULT_REGION"],
    }
    _wait_for_catalog(uri, properties)
    env = catalog_env(CATALOG, properties)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield IcebergCatalog(CATALOG, properties)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
