"""The `gpu_tests` part of `resnet bench node`: the project's own `pytest -m gpu`, run from the checkout in a
process group of its own, bounded in time, its outcome (counts, failing test ids) read from pytest's JUnit XML."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import torch

from train.node_parts import REPO, Skipped, installed, measure_row


def _junit_counts(xml: Path) -> dict:
    """passed / failed / errors / skipped counts and the ids (tests/x.py::name) of failing tests, from pytest's
    JUnit XML."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failed_tests": []}
    for case in ElementTree.parse(xml).getroot().iter("testcase"):
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        key = {"failure": "failed", "error": "errors", "skipped": "skipped"}.get(outcome, "passed")
        counts[key] += 1
        if key in ("failed", "errors"):
            module = case.get("classname", "").replace(".", "/")
            counts["failed_tests"].append(f"{module}.py::{case.get('name')}")
    return counts


def _run_pytest_gpu(xml: Path, timeout_s: int) -> int:
    """`python -m pytest -m gpu` from the checkout's root in its own process group (killed whole on timeout:
    the tests start `resnet` processes of their own); its output goes to this command's."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"`pytest -m gpu` did not finish in {timeout_s} s (option --gpu_tests_timeout_s)") from None
    finally:  # also on Ctrl-C or a signal: no test process left running on the GPU
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def gpu_tests_row(enabled: bool, timeout_s: int, output: Path) -> dict:
    """The GPU tests (`pytest -m gpu`) when a CUDA GPU is present: counts and failing test ids; their JUnit XML
    is kept in `output`/gpu_tests.xml. No images_per_sec."""
    config = {"command": "python -m pytest -m gpu -q -p no:cacheprovider", "timeout_s": timeout_s}

    def measure() -> dict:
        if not enabled:
            raise Skipped("--gpu_tests false")
        if not torch.cuda.is_available():
            raise Skipped("no CUDA GPU")
        if not (REPO / "tests").is_dir():
            raise Skipped(f"{REPO / 'tests'} not found: the GPU tests run from a checkout")
        if not installed("pytest"):
            raise Skipped("pytest not installed (pip install -e '.[test]')")
        xml = output.resolve() / "gpu_tests.xml"  # pytest runs from the checkout's root
        xml.unlink(missing_ok=True)
        code = _run_pytest_gpu(xml, timeout_s)
        if not xml.is_file():
            raise RuntimeError(f"pytest exited {code} without a report (collection error?)")
        counts = {**_junit_counts(xml), "junit_xml": str(xml), "pytest_exit_code": code}
        bad = counts["failed"] + counts["errors"]
        if bad or code not in (0, 5):  # 5: no test collected (no GPU test in this checkout)
            failing = ", ".join(counts["failed_tests"])
            counts.update(status="failed", reason=f"{bad} GPU tests failed (pytest exit {code}): {failing}")
        return counts

    return measure_row("gpu_tests", "pytest -m gpu", config, measure, limit_s=timeout_s + 120)
