# Two commands from a fresh clone: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-foundation test-foundation-slow lint bench clean

$(STAMP): setup.cfg setup.py MANIFEST.in pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,dask,survival]"
	touch $(STAMP)

# Foundation-model presets held to their official architectures (timm, transformers 5, and
# transformers 4 for Phikon-v2 in a side folder). Its own venv: the CUDA build of torch from the
# package index (about 3 GB; it runs on CPU), because a CPU-only torch wheel from a local wheel
# folder does not import with torchvision's wheel. Built once, without the local pip settings.
FVENV := .venv-foundation
FPY := $(FVENV)/bin/python
FSTAMP := $(FVENV)/.installed
FTF4 := $(FVENV)/transformers4
FPIP := env -u PIP_FIND_LINKS PIP_CONFIG_FILE=$(CURDIR)/$(FVENV)/pip.conf $(FPY) -m pip

$(FSTAMP): setup.cfg setup.py MANIFEST.in pyproject.toml constraints.txt constraints-foundation.txt constraints-transformers4.txt
	test -x $(FPY) || $(PYTHON) -m venv $(FVENV)
	: > $(FVENV)/pip.conf
	$(FPIP) install -q --upgrade pip
	$(FPIP) install -q -c constraints.txt -c constraints-foundation.txt -e ".[dev,foundation]"
	rm -rf $(FTF4)
	$(FPIP) install -q --no-deps --target $(FTF4) -r constraints-transformers4.txt
	touch $(FSTAMP)

# Every timm/transformers test: keys and shapes of all presets on the meta device, the ViT-L presets'
# embeddings against their official construction, Phikon-v2 with transformers 5 and then 4.
test-foundation: $(FSTAMP)
	$(FPY) -m pytest -q -m "not slow" tests/test_foundation.py tests/test_foundation_official.py tests/test_model_encoders.py
	PYTHONPATH=$(FTF4) $(FPY) -m pytest -q -m "not slow" tests/test_foundation_official.py -k phikon

# The billion-weight presets' forward passes, one preset per process (each under ~15 GB of memory).
GIANT_PRESETS := uni2_h virchow virchow2 h_optimus_0 h_optimus_1 gigapath
test-foundation-slow: $(FSTAMP)
	for name in $(GIANT_PRESETS); do \
	  $(FPY) -m pytest -q "tests/test_foundation_official.py::test_giant_preset_file_gives_the_official_embedding[$$name]" \
	    || exit 1; done

demo: $(STAMP)
	$(VENV)/bin/ipspath demo -o demo_out

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow; rc=$$?; [ $$rc -eq 5 ] && exit 0 || exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check ips_path tiling cli tests bench

clean:
	rm -rf $(VENV) $(FVENV) *.egg-info .pytest_cache
