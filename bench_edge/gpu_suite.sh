#!/usr/bin/env bash
# Every GPU measurement of bench_edge/, in the order of importance, for a machine with one CUDA GPU
# (an H100/H200-class card for the cloud settings). Results land in bench_edge/results/ with the
# device's description. Install first: pip install ".[test,bench,onnx-gpu]" (nvcc on the PATH builds
# the CUDA kernels). Rough times on an H100: 1-3 min per step below, the 32k-output settings 5-10 min.
#
#   bash bench_edge/gpu_suite.sh            # all of it
#   bash bench_edge/gpu_suite.sh quick      # the CUDA tests, kernels and one setting (about 10 min)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python -c "import torch, specontext.native as n; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(0), '| kernels:', n.cuda_available())"

# 1. correctness on the GPU: native kernels, offloaded == resident with pinned and pageable memory
pytest -q -m cuda tests/
# 2. the copy kernel, the hidden fraction of transfers, decode against transformers' offloaded cache
python bench_edge/bench_offload_gpu.py --shape llama-3.1-8b --context 32768
# 3. end to end, the paper's cloud settings (B = 2048), ours vs transformers sdpa / offloaded
python bench_edge/bench_e2e.py gpu --shape llama-3.1-8b --setting 2k,32k
[ "${1:-}" = quick ] && exit 0
python bench_edge/bench_e2e.py gpu --shape llama-3.1-8b --setting 2k,16k
python bench_edge/bench_e2e.py gpu --shape llama-3.1-8b --setting 16k,2k
python bench_edge/bench_e2e.py gpu --shape llama-3.1-8b --setting 32k,2k
python bench_edge/bench_e2e.py gpu --shape qwen3-8b --setting 2k,32k
python bench_edge/bench_e2e.py gpu --shape qwen3-8b --setting 32k,2k
# 4. edge emulation: Llama-3.2-1B shape, device memory capped at 4 GB
python bench_edge/bench_e2e.py gpu --shape llama-3.2-1b --setting 2k,16k --edge
# 5. selection cost and the head on ONNX Runtime (CUDA provider, I/O binding)
python bench_edge/bench_selection.py --device cuda --out bench_edge/results/selection_cuda.json
python bench_edge/bench_head_backends.py --device cuda
# 6. the memory model against torch.cuda.max_memory_allocated
python bench_edge/bench_memory_model.py --device cuda
