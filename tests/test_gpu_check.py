"""bench_edge/gpu_check.sh, the first GPU run, checked here in its CPU mode: every part runs and writes its
JSON, the results fit what a device call brings back, and a short budget skips parts instead of failing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench_edge", "gpu_check.sh")


def run_check(out, budget: int):
    env = {**os.environ, "DEVICE": "cpu", "OUT": str(out), "BUDGET": str(budget), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def parts(out) -> dict:
    with open(out / "summary.json", encoding="utf-8") as f:
        return {p["part"]: p["status"] for p in json.load(f)["parts"]}


def test_cpu_mode_runs_every_part(tmp_path):
    out = tmp_path / "out"
    proc = run_check(out, 600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert parts(out) == {name: "ok" for name in ("packages", "build", "kernels_in_library", "cuda_tests", "kernel",
                                                  "decode", "int4_decode", "transformers", "e2e", "compiled_decode")}
    files = sorted(os.listdir(out))
    # a device call brings back at most 8 files, named in letters, digits, '.', '_' and '-'
    assert files == ["decode.json", "e2e.json", "kernel.json", "library.json", "log.txt", "summary.json",
                     "tests.json", "transformers.json"]
    with open(out / "kernel.json", encoding="utf-8") as f:
        assert json.load(f)["kernel"]["all_correct"] is True
    with open(out / "summary.json", encoding="utf-8") as f:  # eager only on a CPU; on a GPU also compiled and captured
        summary = json.load(f)
    assert set(summary["compiled_decode"]["this_tree"]) == {"dense", "specontext_sparse"}
    assert [r["weights"] for r in summary["int4_decode"]["rows"]] == ["float", "int4"]
    with open(out / "decode.json", encoding="utf-8") as f:
        decode = json.load(f)["decode"]
    assert set(decode["configs"]) == {"resident", "offloaded_async", "offloaded_inline"}
    assert decode["configs"]["offloaded_async"]["transfers"]["fetched_tokens"] > 0
    with open(out / "tests.json", encoding="utf-8") as f:
        tests = json.load(f)
    assert tests["failed"] == tests["errors"] == 0 and tests["skipped"] > 0  # the CUDA tests collect, then skip


def test_short_budget_skips_parts_and_says_so(tmp_path):
    out = tmp_path / "out"
    proc = run_check(out, 25)
    assert proc.returncode == 0, proc.stdout[-3000:]
    status = parts(out)
    assert status["build"] == "ok"
    assert status["transformers"] == status["e2e"] == "skipped"
    assert "skipped" in proc.stdout


@pytest.mark.parametrize("env,message", [({"DEVICE": "tpu"}, "DEVICE must be cuda or cpu"),
                                         ({"BUDGET": "8m"}, "BUDGET must be whole seconds")])
def test_bad_settings_are_refused_in_one_line(tmp_path, env, message):
    proc = subprocess.run(["bash", SCRIPT], cwd=REPO, env={**os.environ, "OUT": str(tmp_path), **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
