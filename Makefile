# Two commands on a fresh machine: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DATA := .cache/demo_imagenet
DEMO_RUN := runs/demo

.PHONY: setup demo test clean

# torch/torchvision: pip takes 2.14.1/0.29.1 from this machine's disk; pyproject admits them.
$(BIN)/resnet: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

setup: $(BIN)/resnet

demo: setup
	@start=$$(date +%s); \
	$(BIN)/resnet prepare demo --dst $(DEMO_DATA) && \
	rm -rf $(DEMO_RUN) && \
	$(BIN)/resnet fit --config configs/demo.yaml --trainer.enable_progress_bar false && \
	$(BIN)/resnet validate --config configs/demo.yaml --ckpt_path $(DEMO_RUN)/checkpoints/best.ckpt \
		--trainer.enable_progress_bar false && \
	echo "Demo done in $$(( $$(date +%s) - start )) s. Results: $(DEMO_RUN)/checkpoints/{best,last}.ckpt," \
		"$(DEMO_RUN)/logs/version_0/{curves.png,history.csv,metrics.csv,config.yaml}"

test: setup
	$(BIN)/python -m pytest -q --timeout 600

clean:
	rm -rf $(DEMO_RUN) .cache .pytest_cache
