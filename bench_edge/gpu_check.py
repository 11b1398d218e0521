"""The bookkeeping steps of gpu_check.sh: the library check, the CUDA tests' report, the summary.

    python bench_edge/gpu_check.py library --out DIR --device cuda --arch 90   # library.json; exit 1 without kernels
    python bench_edge/gpu_check.py tests --out DIR --junit tests.xml           # tests.json from pytest's JUnit XML
    python bench_edge/gpu_check.py summary --out DIR --parts parts.tsv ...     # summary.json: every part and the key figures

``summary`` reads only JSON (no torch import), so gpu_check.sh can rewrite it after every part.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def write(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def read(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ---- library ---------------------------------------------------------------------------------

def device_description() -> dict | None:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    info = {"name": props.name, "capability": f"{props.major}.{props.minor}", "total_memory_bytes": props.total_memory,
            "multiprocessors": props.multi_processor_count, "torch_cuda": torch.version.cuda}
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total,clocks.max.sm",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    return info


def check_library(args) -> int:
    """library.json: which library loaded, what CUDA it was compiled with, whether its kernels run
    here and copy correctly. Exit 1 on a GPU when the kernels for --arch are missing or fail."""
    import torch

    import machine
    from specontext import native

    out = {"machine": machine.describe(), "device": device_description(), "library": native.library_path(),
           "cuda_build": native.cuda_build(), "cuda_available": native.cuda_available()}
    tool = shutil.which("cuobjdump")
    if tool:
        listing = subprocess.run([tool, "--list-elf", out["library"]], capture_output=True, text=True, timeout=60)
        out["cuobjdump_list_elf"] = (listing.stdout + listing.stderr).strip().splitlines()[-20:]
    problems = []
    if args.device == "cuda":
        build = out["cuda_build"]
        if build is None:
            problems.append("the library was built without CUDA")
        elif build["archs"] and int(args.arch) * 10 not in build["archs"]:
            problems.append(f"no sm_{args.arch} code in the library (compiled: {build['archs']})")
        if not out["cuda_available"]:
            problems.append("spc_cuda_available() is 0: no usable device for the library's runtime")
        if not problems:  # one real copy on the device, checked against torch indexing
            host = torch.arange(2 * 64 * 8, dtype=torch.float16).view(2, 64, 8).pin_memory()
            slots = torch.zeros(2, 16, 8, dtype=torch.float16, device="cuda")
            src = torch.tensor([5, 63, 0, 17], device="cuda")
            dst = torch.tensor([2, 9, 15, 0], device="cuda")
            native.copy_rows_planes(host, src, slots, dst)
            torch.cuda.synchronize()
            out["smoke_copy_correct"] = bool(torch.equal(slots[:, dst], host[:, src.cpu()].cuda()))
            if not out["smoke_copy_correct"]:
                problems.append("the kernel copied wrong bytes")
    out["problems"] = problems
    write(os.path.join(args.out, "library.json"), out)
    print(json.dumps({k: out[k] for k in ("library", "cuda_build", "cuda_available", "problems")}))
    return 1 if problems else 0


# ---- tests -----------------------------------------------------------------------------------

def report_tests(args) -> int:
    """tests.json from pytest's JUnit XML: counts, and each failure or error with its message."""
    out = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skip_reasons": {}}
    try:
        root = ET.parse(args.junit).getroot()
    except (OSError, ET.ParseError) as exc:
        out["problem"] = f"no JUnit report: {exc}"
        write(os.path.join(args.out, "tests.json"), out)
        return 1
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag: child for child in case}
        if "failure" in kinds or "error" in kinds:
            tag = "failure" if "failure" in kinds else "error"
            out["failed" if tag == "failure" else "errors"] += 1
            message = (kinds[tag].get("message") or kinds[tag].text or "").strip()
            out["failures"].append({"test": name, "kind": tag, "message": message[:600]})
        elif "skipped" in kinds:
            out["skipped"] += 1
            reason = (kinds["skipped"].get("message") or "").strip()[:120]
            out["skip_reasons"][reason] = out["skip_reasons"].get(reason, 0) + 1
        else:
            out["passed"] += 1
    write(os.path.join(args.out, "tests.json"), out)
    print(json.dumps({k: out[k] for k in ("passed", "failed", "errors", "skipped")}))
    return 0


# ---- summary ---------------------------------------------------------------------------------

def key_figures(folder: str) -> dict:
    """The figures a reader wants first, from whichever part files exist."""
    figures: dict = {}
    kernel = (read(os.path.join(folder, "kernel.json")) or {}).get("kernel")
    if kernel:
        figures["kernel_all_correct"] = kernel.get("all_correct")
        figures["kernel_gbps_by_rows"] = {r["rows"]: {k: r.get(k) for k in ("kernel_gbps", "memcpy_gbps", "contiguous_gbps")
                                                      if k in r} for r in kernel.get("rows", [])}
    decode = (read(os.path.join(folder, "decode.json")) or {}).get("decode")
    if decode:
        figures["decode_step_s"] = {k: v.get("decode_step_s") for k, v in decode.get("configs", {}).items()}
        figures["hidden_fraction_of_transfer_time"] = decode.get("hidden_fraction_of_transfer_time")
        figures["hidden_fraction_resolved"] = decode.get("resolved")
    hf = (read(os.path.join(folder, "transformers.json")) or {}).get("transformers")
    if hf:
        figures["speedup_vs_transformers_offloaded"] = hf.get("speedup_vs_transformers_offloaded")
    tests = read(os.path.join(folder, "tests.json"))
    if tests:
        figures["cuda_tests"] = {k: tests.get(k) for k in ("passed", "failed", "errors", "skipped")}
    return figures


def summarize(args) -> int:
    parts = []
    if os.path.exists(args.parts):
        with open(args.parts, encoding="utf-8") as f:
            for line in f:
                name, status, seconds, note = (line.rstrip("\n").split("\t") + [""] * 4)[:4]
                parts.append({"part": name, "status": status, "seconds": int(seconds or 0), "note": note})
    library = read(os.path.join(args.out, "library.json")) or {}
    out = {"check": "bench_edge/gpu_check.sh", "settings": {"budget_s": args.budget, "device": args.device,
                                                           "shape": args.shape, "context": args.context},
           "machine": library.get("machine"), "device": library.get("device"), "cuda_build": library.get("cuda_build"),
           "parts": parts, "figures": key_figures(args.out)}
    compiled = read(args.compiled) if args.compiled else None
    if compiled:  # eager, compiled and captured decode steps (kept here: the run brings back 8 files)
        out["compiled_decode"] = {k: v for k, v in compiled.items() if k != "machine"}
    int4 = read(args.int4) if args.int4 else None
    if int4:  # int4 against bfloat16 weights, dense decode (bench_int4_gpu.py)
        out["int4_decode"] = {k: v for k, v in int4.items() if k != "machine"}
    write(os.path.join(args.out, "summary.json"), out)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    lib = sub.add_parser("library")
    lib.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    lib.add_argument("--arch", default="90")
    tests = sub.add_parser("tests")
    tests.add_argument("--junit", required=True)
    summ = sub.add_parser("summary")
    summ.add_argument("--parts", required=True)
    summ.add_argument("--budget", type=int, required=True)
    summ.add_argument("--device", required=True)
    summ.add_argument("--shape", required=True)
    summ.add_argument("--context", type=int, required=True)
    summ.add_argument("--compiled", default=None, help="the compiled-decode measurement's JSON, if any")
    summ.add_argument("--int4", default=None, help="the int4-decode measurement's JSON, if any")
    for s in (lib, tests, summ):
        s.add_argument("--out", required=True, help="the results folder")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    return {"library": check_library, "tests": report_tests, "summary": summarize}[args.step](args)


if __name__ == "__main__":
    sys.exit(main())
