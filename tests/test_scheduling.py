"""How ``make test`` splits the suite over its workers (``tests/conftest.py``)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import SPREAD_MODULES, scope_of


def test_a_module_is_one_unit_unless_it_spreads() -> None:
    parity = "tests/models/test_salient_parity.py::test_parity_with_modelscope[u2net]"
    assert scope_of(parity) == "tests/models/test_salient_parity.py"
    a, b = "tests/test_multinode.py::test_a", "tests/test_multinode.py::test_b"
    assert scope_of(a) == scope_of(b) == "tests/test_multinode.py"
    # "::" inside a parameter id does not cut the module short
    assert scope_of("tests/test_cli.py::test_x[a::b]") == "tests/test_cli.py"
    for case in ("segment-salient-local", "video-s3"):
        nodeid = f"tests/test_row_jobs.py::test_row_job_contract[{case}]"
        assert scope_of(nodeid) == nodeid


def test_every_spread_module_exists() -> None:
    here = Path(__file__).parent
    assert SPREAD_MODULES and all((here / name).is_file() for name in SPREAD_MODULES)
