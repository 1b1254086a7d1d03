# fairkernels: the two commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.fairkernels-installed

.PHONY: venv install test demo bench fuzz million ctest clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first (the CPU build that lies on disk), then the rest, then the package itself built
# against that torch (no build isolation: torch must never be a build requirement).
$(STAMP): $(PY) setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h csrc/*.h)
	$(PIP) install torch==2.13.0
	$(PIP) install triton==3.7.1 numpy ninja
	$(PIP) install --no-build-isolation -e '.[test,plot]'
	touch $(STAMP)

venv install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -x tests

demo: $(STAMP)
	$(PY) python/demo.py

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

fuzz: $(STAMP)
	FAIRKERNELS_FUZZ_EXAMPLES=10000 FAIRKERNELS_FUZZ_TRITON_EXAMPLES=$${FAIRKERNELS_FUZZ_TRITON_EXAMPLES:-100} \
		$(PY) -m pytest -q tests/test_fuzz.py -p no:randomly -s

million: $(STAMP)
	$(PY) python/million_points.py

# C++ users: the same csrc/ built with CMake against libtorch, plus its ctest.
ctest: $(STAMP)
	cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" -DCMAKE_BUILD_TYPE=Release
	cmake --build build/cmake -j 2
	cd build/cmake && ctest --output-on-failure

clean:
	rm -rf build dist *.egg-info fairkernels/*.so
