# Common commands. CPU machines: `pip install torch==2.13.0` first (the CPU wheel).
PY ?= python

.PHONY: install test test-gpu bench lint build-cuda ci clean

install:
	pip install -e ".[test,bench,dev]"

test:
	$(PY) -m pytest -q

test-gpu:
	$(PY) -m pytest -q -m gpu

bench:
	$(PY) -m prefkern bench

lint:
	ruff check .

build-cuda:
	PREFKERN_BUILD_CUDA=1 pip install -e . --no-build-isolation

ci:
	bash .ci/run

clean:
	rm -rf build *.egg-info prefkern/_C*.so .pytest_cache
