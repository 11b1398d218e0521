"""The short fuzz run of every untrusted-file parser (tests/fuzz/fuzz.py), a few seconds each: no
exception other than specontext's typed errors, no hang, no runaway memory. The long run (10 minutes
per target) is ``python tests/fuzz/fuzz.py all --seconds 600``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

FUZZ = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz", "fuzz.py")
TARGETS = ("gguf", "gguf_tokenizer", "safetensors", "config", "head", "onnx_head", "batch", "profile")


@pytest.mark.parametrize("target", TARGETS)
def test_short_fuzz_run_finds_nothing(target, tmp_path):
    if target == "onnx_head":
        pytest.importorskip("onnx")
    if target.startswith("gguf"):
        pytest.importorskip("gguf")
    out = tmp_path / "fuzz.json"
    proc = subprocess.run([sys.executable, FUZZ, target, "--seconds", "3", "--work", str(tmp_path / "work"),
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())["results"][0]
    assert result["findings"] == []
    assert result["engine"] == "random" or result["executions"] > 0


def test_fuzz_lists_every_target():
    proc = subprocess.run([sys.executable, FUZZ, "--list"], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == list(TARGETS)
