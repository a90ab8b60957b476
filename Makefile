# The two set-up commands of the README: `make demo` (the main job) and `make test`.
# Each creates the virtual environment if needed, installs streamcl with its dependencies,
# and makes sure Fashion-MNIST is on disk.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.streamcl-installed
PYTEST_ARGS ?=

.PHONY: demo test data bench docs clean

demo: $(STAMP) data
	$(PY) -m streamcl demo --out runs/demo

test: $(STAMP) data
	@$(PY) -m pytest -q -n auto $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure"; fi; exit $$rc

bench: $(STAMP) data
	$(PY) benchmarks/overhead.py

# the generated parts of docs/config.md (from the config schema) and docs/methods.md (recipes, plugins)
docs: $(STAMP)
	$(PY) -m streamcl.docs

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Fashion-MNIST: already found (explicit root, $$STREAMCL_DATA, Debian's location)? Else Debian's
# package (offline-friendly), else torchvision's download; if all fail the loader says what to do.
data: $(STAMP)
	@$(PY) -c "from streamcl.datasets import fashion_mnist; fashion_mnist(download=False)" >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist || true; \
	  fi; \
	  $(PY) -c "from streamcl.datasets import fashion_mnist; fashion_mnist(); print('Fashion-MNIST ready')"; }

clean:
	rm -rf $(VENV) runs build *.egg-info
