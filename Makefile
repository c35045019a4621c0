# Two commands on a fresh machine: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DATA := .cache/demo_imagenet
DEMO_RUN := runs/demo
DEMO_EVAL := runs/demo_eval
GPU_CHECK_OUT ?= runs/gpu_check

.PHONY: setup slurm-packages demo test gpu-check clean

# torch/torchvision: pip takes 2.14.1/0.29.1 from this machine's disk; pyproject admits them.
# FFCV builds against system libraries: installed from Debian when missing (CI runs as root).
$(BIN)/resnet: pyproject.toml
	pkg-config --exists libturbojpeg opencv4 2>/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pkg-config libturbojpeg0-dev libopencv-dev; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,dali,ffcv]"
	touch $@

setup: $(BIN)/resnet

# The tests start a real one-node SLURM cluster (tests/slurm_cluster.py): Debian's daemons, nothing configured.
slurm-packages:
	command -v slurmctld >/dev/null && command -v munged >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge; }

# Two models trained on the demo set, each evaluated under the three ILSVRC protocols, then their ensemble.
demo: setup
	@start=$$(date +%s); set -e; \
	$(BIN)/resnet prepare demo --dst $(DEMO_DATA); \
	rm -rf $(DEMO_RUN) $(DEMO_RUN)_r34 $(DEMO_EVAL); \
	$(BIN)/resnet fit --config configs/demo.yaml --trainer.enable_progress_bar false; \
	$(BIN)/resnet fit --config configs/demo.yaml --config configs/demo_r34.yaml --trainer.enable_progress_bar false; \
	for run in demo demo_r34; do for protocol in center 10crop multiscale; do \
		$(BIN)/resnet evaluate --config configs/eval/demo.yaml --ckpt runs/$$run/checkpoints/best.ckpt \
			--protocol $$protocol --trainer.enable_progress_bar false --output $(DEMO_EVAL)/$${run}_$$protocol.pt; \
	done; done; \
	$(BIN)/resnet ensemble $(DEMO_EVAL)/demo_multiscale.pt $(DEMO_EVAL)/demo_r34_multiscale.pt \
		--output $(DEMO_EVAL)/ensemble.md; \
	echo "Demo done in $$(( $$(date +%s) - start )) s. Runs: $(DEMO_RUN)/, $(DEMO_RUN)_r34/ (checkpoints/, logs/version_0/);" \
		"evaluations and ensemble table: $(DEMO_EVAL)/"

# Two workers (pytest-xdist): the SLURM tests wait on daemons and timeouts while the other worker runs the rest.
test: setup slurm-packages
	$(BIN)/python -m pytest -q --timeout 600 -n 2 --dist load

# What this machine does with the project: GPU, versions, training-step ceilings, the full pipeline per loader,
# loaders alone, evaluation, Lightning's overhead, the GPU tests; $(GPU_CHECK_OUT)/node_report.{json,md}.
# ~6-8 min on one H100/H200; small sizes on a CPU (~1-2 min). Exit status 1 when a part failed.
gpu-check: setup
	$(BIN)/resnet bench node --output $(GPU_CHECK_OUT)

clean:
	rm -rf $(DEMO_RUN) $(DEMO_RUN)_r34 $(DEMO_EVAL) .cache .pytest_cache
