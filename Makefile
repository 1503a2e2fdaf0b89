# Two commands set up a fresh machine (README): `make demo` and `make test`.
# uv (from PyPI) makes the installs fast; torch from PyPI is the CUDA build, which also runs on CPU.
PYTHON ?= python3
VENV ?= .venv
ORACLE_VENV ?= .venv-oracle
UV := $(VENV)/bin/uv
# the project's packages (vbatch.<name>)
PACKAGES := jobs operators models schemas
# Every install is compiled to bytecode: this machine's environment sets PYTHONDONTWRITEBYTECODE, so
# without it each new process (a Ray worker, a job's model actor, an oracle reference run) compiled
# torch, timm and transformers from source as it imported them: 10-15 s of CPU a process, 3-4 s with it.
export UV_COMPILE_BYTECODE := 1

.PHONY: demo test test-fast test-multinode lint bench oracle clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q uv
	$(UV) pip install --python $(VENV)/bin/python -e '.[cpu,dev]'
	$(VENV)/bin/python -m compileall -q $(PACKAGES)
	touch $@

# The tests also convert TensorFlow graphs (the `convert` extra; workers never need TensorFlow) and
# write Iceberg tables (the `iceberg` extra).
$(VENV)/.installed-test: $(VENV)/.installed
	$(UV) pip install --python $(VENV)/bin/python -e '.[cpu,dev,convert,iceberg]'
	touch $@

$(ORACLE_VENV)/.installed: tests/oracle/requirements.txt tests/oracle/requirements-nodeps.txt | $(VENV)/.installed
	$(UV) venv -q --allow-existing --python $(PYTHON) $(ORACLE_VENV)
	$(UV) pip install --python $(ORACLE_VENV)/bin/python -r tests/oracle/requirements.txt
	$(UV) pip install --python $(ORACLE_VENV)/bin/python --no-deps -r tests/oracle/requirements-nodeps.txt
	touch $@

oracle: $(ORACLE_VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/vbatch demo

# Two workers (pytest-xdist), each with its own Ray and S3 server; a module runs whole on one worker
# unless tests/conftest.py spreads it (TEST_WORKERS=0: one process, as a debugger wants).
TEST_WORKERS ?= 2
test: $(VENV)/.installed-test $(ORACLE_VENV)/.installed
	VBATCH_ORACLE_PYTHON=$(abspath $(ORACLE_VENV))/bin/python $(VENV)/bin/python -m pytest \
		-n $(TEST_WORKERS) --dist loadscope $(PYTEST_ARGS)

# The inner loop: unit and contract tests of pure code, no Ray, no S3 server, no oracle, no browser,
# no full-size model (docs/TESTING.md). Starting Ray fails a test here (VBATCH_TEST_TIER=fast).
FAST_TIER = not (ray or s3 or parity or browser or multinode or slow)
test-fast: $(VENV)/.installed-test
	VBATCH_TEST_TIER=fast $(VENV)/bin/python -m pytest -m "$(FAST_TIER)" \
		-n $(TEST_WORKERS) --dist loadscope $(PYTEST_ARGS)

# The cluster tests alone (`make test` runs them too): the multi-node Ray cluster (a head, CPU
# nodes, a model node; segment, reid search, video, a node killed mid-run) and `ray job submit`.
test-multinode: $(VENV)/.installed-test
	$(VENV)/bin/python -m pytest tests/test_multinode.py tests/test_job_submit.py $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@# mypy reads files, not the install's import hook: it checks a link tree that spells vbatch.*
	rm -rf build/typecheck && mkdir -p build/typecheck/vbatch
	for p in $(PACKAGES); do ln -s ../../../$$p build/typecheck/vbatch/$$p; done
	cd build/typecheck && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml \
		-p vbatch.jobs -p vbatch.operators -p vbatch.models -p vbatch.schemas

bench: $(VENV)/.installed
	$(VENV)/bin/python bench/bench_segment.py

clean:
	rm -rf $(VENV) $(ORACLE_VENV) vbatch-demo
