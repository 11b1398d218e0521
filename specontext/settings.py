"""Runtime and generation settings: the single source of every user-facing option.

The CLI is generated from these fields (their ``metadata`` carries the help text), so an option
exists in exactly one place. Values derived from them (cache capacity, chunk counts) live in
plan or state objects and are never written back here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from .errors import InputError
from .methods import METHODS, check_offload
from .retrieval.selection import SparsityOptions

DTYPES = ("auto", "float32", "float16", "bfloat16")
COMPILE_MODES = ("off", "on", "aot", "cuda-graph")
WEIGHT_FORMATS = ("auto", "fp32", "fp16", "bf16", "int8", "int4", "gguf")
ACTIVATIONS = ("float", "int8")
# the float formats of --weights and --kv-dtype, as --dtype names them
FLOAT_FORMATS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
KV_DTYPES = ("auto", "fp16", "bf16", "fp32", "fp8", "int8")
EMBEDDING_FORMATS = ("float", "int8")


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


def _decode_opt(default, help: str, **extra):
    """An option of how decode steps run: one :meth:`specontext.LLM.set_sparsity` may change."""
    return _opt(default, help, decode=True, **extra)


def decode_options() -> set[str]:
    """The names of the options :meth:`specontext.LLM.set_sparsity` may change on a loaded model."""
    return {f.name for f in fields(RuntimeSettings) if f.metadata.get("decode")}


@dataclass(frozen=True)
class RuntimeSettings:
    """How the engine runs: device, precision, threads, prefill chunking, and decode sparsity."""

    device: str = _opt("auto", "compute device: auto (CUDA if present, else CPU), cpu, cuda, or cuda:N")
    dtype: str = _opt("auto", "weight and KV precision: auto (float32 on CPU, bfloat16 on CUDA), float32, float16, bfloat16",
                      choices=DTYPES)
    weights: str = _opt("auto", "weight format of the linear layers: auto (on a CPU with native bf16 or AVX2 a GGUF keeps its "
                        "quantization: Q4_0/Q4_1/Q4_K as int4, Q8_0 as int8, else float with a notice; a float checkpoint, "
                        "or any model on CUDA, loads float as --dtype), fp32, fp16 or bf16 (CUDA), int8 (per "
                        "output row), int4 (groups of 32; Q4_0/Q4_1 blocks are kept exactly). int4 runs on a CPU "
                        "in float32 products (the float32 model's values), int8 on torch's CPU weight-only kernel "
                        "in bfloat16 where the CPU has it; beside them the LM head and embeddings are int8 groups "
                        "where that is exact (a GGUF's Q8_0 table), else bfloat16; int4 also on CUDA (bfloat16, compute capability 8.0+; not yet "
                        "run on a GPU); gguf (a GGUF file's blocks as they are, layers, LM head and embeddings, multiplied "
                        "by ggml's CPU kernels as llama.cpp does: needs the llamacpp extra); norms stay float",
                        choices=WEIGHT_FORMATS)
    activations: str = _opt("float", "inputs of the int8 linear layers: float (weight-only int8), or int8 (with "
                            "--weights int8 on a CPU: q/k/v, o and gate/up multiply int8 by int8, smoothed per "
                            "input channel from a calibration pass over 64 tokens the model writes itself at load; "
                            "down_proj stays weight-only). Decodes faster than fp32 on VNNI CPUs, with slightly "
                            "less agreement with fp32 than weight-only int8", choices=ACTIVATIONS)
    embeddings: str = _opt("float", "token embedding table: float (as the LM head holds it) or int8 (one byte a value "
                           "and a float32 scale per row, each token's row upcast when read: half a bf16 table; "
                           "for untied models such as Llama-3.1-8B and Qwen3-8B, whose table is a GiB in bf16; a "
                           "tied model's head keeps its float table, so there it adds memory)",
                           choices=EMBEDDING_FORMATS)
    kv_dtype: str = _opt("auto", "KV cache storage: auto (the compute dtype), int8 or fp8 (8-bit rows, int8 or "
                         "float8 e4m3, with a float32 scale per token and KV head, upcast when read, only the "
                         "chosen rows on a sparse step; offloaded layers keep their rows 8-bit in host memory), fp32, fp16, bf16 "
                         "(the compute dtype's)", choices=KV_DTYPES)
    threads: int = _opt(0, "CPU threads for compute; 0 keeps PyTorch's default (one per core)")
    prefill_chunk_tokens: int = _opt(512, "prompt tokens processed per prefill step; bounds activation memory")
    sparsity: str = _decode_opt("dense", "what each decode step attends to: dense (every past token); specontext (the retrieval "
                         "head's choice, one set per KV head for all layers); oracle (per layer, the top of the model's own "
                         "attention: an upper bound); quest (per layer, pages ranked by key bounds); streaming (sinks plus "
                         "the most recent tokens); snapkv (per layer, the prompt positions the prompt's last tokens attended to, "
                         "plus sinks and window, fixed after prefill). Prefill is always dense", choices=METHODS)
    budget_tokens: int = _decode_opt(1024, "past tokens attended per KV head on a sparse decode step, sinks and window included; "
                              "while the context fits in the budget, steps run dense", flags=("--budget",))
    sink_tokens: int = _decode_opt(4, "first tokens always kept (specontext, streaming)")
    window_tokens: int = _decode_opt(60, "most recent tokens always kept (specontext, snapkv)")
    retrieval_head: str = _decode_opt("auto", "retrieval head for --sparsity specontext: a NAME.json / NAME.safetensors artefact, "
                               "or auto (a shipped or trained head whose target matches this model)")
    retrieval_backend: str = _decode_opt("torch", "what runs the retrieval head each step: torch, or onnxruntime (the head "
                                  "exported to ONNX, on the CPU provider, or CUDA with the K cache bound on the device; "
                                  "needs the onnx extra). --retrieval-head may then also be an exported .onnx file",
                                  choices=("torch", "onnxruntime"))
    pin_fraction: float = _decode_opt(0.5, "--sparsity specontext: share of the budget pinned to the prompt positions its "
                               "last --focus-window-tokens queries attended to most during prefill (where the question "
                               "looks); kept every step like sinks and window, the head chooses the rest. 0 = off")
    focus_window_tokens: int = _decode_opt(32, "prompt tokens at the end of the prompt whose attention over the prompt "
                                    "decides the pinned positions (specontext with --pin-fraction, snapkv)")
    focus_layers: str = _decode_opt("late", "layers whose focus the pins average: all, late (the second half), or layers and "
                             "ranges like 14-22,25")
    focus_pool_tokens: int = _decode_opt(15, "odd width of the max-pool smoothing the focus over neighbouring positions "
                                  "before pinning (1 = none)")
    fallback_threshold: float = _decode_opt(0.0, "run a decode step dense when the retrieval head's attention mass on its "
                                     "chosen tokens is below this (0 = never)")
    quest_page_tokens: int = _decode_opt(16, "page size for --sparsity quest")
    block_tokens: int = _decode_opt(1, "--sparsity specontext: select whole blocks of N consecutive tokens (each scored by its "
                             "best token) instead of single tokens; the budget must be a multiple of N")
    offload_layers: int = _opt(0, "keep the full KV of the last N layers in host memory (pinned on CUDA); the device "
                               "keeps slots for the tokens each step selects, loaded while earlier layers compute")
    slot_pool: float = _opt(1.0, "device slots per KV head of an offloaded layer, as a multiple of the budget (>= 1); "
                            "above 1, recently dropped tokens stay resident, so re-selected ones need no transfer")
    async_prefetch: bool = _opt(True, "load offloaded layers' tokens on a copy stream (CPU: a worker thread) right "
                                "after selection, overlapping compute; off: copy before compute (for measurement)")
    adaptive_offload: bool = _opt(False, "let the memory manager place layers for --device-profile: every layer's KV "
                                  "stays on the device while it fits, and each time the context crosses the plan's "
                                  "next threshold the last device-resident layer moves to host memory (with slots, as "
                                  "--offload-layers); a context that cannot fit is refused up front with the maximum")
    device_profile: str = _opt("auto", "device for the memory plan (--plan, --adaptive-offload): auto (detect this "
                               "machine), a shipped profile name (see profiles/), or a profile JSON file")
    measure_recall: bool = _decode_opt(False, "on sparse steps also compute dense attention and report the fraction of its "
                                "mass on the chosen tokens (slower; for evaluation)")
    compile_decode: str = _decode_opt("off", "run decode steps compiled with torch.compile (resident KV; dense, specontext "
                               "or streaming): off; on (the first decode step compiles, 5 to 25 s for the default "
                               "model on a CPU, less once cached on disk, once per cache capacity in whole 256-token "
                               "buckets; each step is then 1.05 to 1.4x faster (int4 weights, 1k and 8k), but a dense "
                               "step attends over the whole cache, and compiling adds about 170 MiB of RSS at 1k, 300 at 8k); "
                               "aot (CPU, dense steps of one row over float KV: the step compiled ahead of time by "
                               "AOTInductor in a child process, about 2 minutes once per model and settings, cached "
                               "under $SPECONTEXT_AOT_DIR or ~/.cache/specontext/aot; no torch.compile in this process, "
                               "so about eager's RSS; 2.0x eager's speed for the default model at 1k); cuda-graph (CUDA only: compiled and "
                               "captured as CUDA graphs, torch's reduce-overhead mode: 5.8 to 8.9x faster steps on an "
                               "H200 where the step is launch-bound; opt-in until its sparse tokens are checked "
                               "in float32 there)",
                               choices=COMPILE_MODES)

    def sparsity_options(self) -> SparsityOptions:
        """The validated sparsity choice (raises InputError naming the bad value)."""
        return SparsityOptions(method=self.sparsity, budget_tokens=self.budget_tokens, sink_tokens=self.sink_tokens,
                               window_tokens=self.window_tokens, page_tokens=self.quest_page_tokens,
                               fallback_threshold=self.fallback_threshold, measure_recall=self.measure_recall,
                               block_tokens=self.block_tokens, pin_fraction=self.pin_fraction,
                               focus_window_tokens=self.focus_window_tokens, focus_pool_tokens=self.focus_pool_tokens,
                               focus_layers=self.focus_layers)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise InputError(f"device must be auto, cpu, cuda or cuda:N, got {dev!r}")
        if self.kv_dtype not in KV_DTYPES:
            raise InputError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {self.kv_dtype!r}")
        if self.embeddings not in EMBEDDING_FORMATS:
            raise InputError(f"embeddings must be one of {', '.join(EMBEDDING_FORMATS)}, got {self.embeddings!r}")
        if self.weights not in WEIGHT_FORMATS:
            raise InputError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {self.weights!r}")
        if self.activations not in ACTIVATIONS:
            raise InputError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {self.activations!r}")
        if self.compile_decode not in COMPILE_MODES:
            raise InputError(f"compile_decode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_decode!r}")
        if self.threads < 0:
            raise InputError(f"threads must be >= 0, got {self.threads}")
        if self.prefill_chunk_tokens < 1:
            raise InputError(f"prefill_chunk_tokens must be >= 1, got {self.prefill_chunk_tokens}")
        if self.offload_layers < 0:
            raise InputError(f"offload_layers must be >= 0, got {self.offload_layers}")
        if not (math.isfinite(self.slot_pool) and self.slot_pool >= 1):
            raise InputError(f"slot_pool must be a number >= 1 (slots per KV head as a multiple of the budget), "
                             f"got {self.slot_pool}")
        if self.adaptive_offload and self.offload_layers:
            raise InputError("adaptive_offload places layers itself; drop offload_layers (or adaptive_offload)")
        if self.offload_layers:
            check_offload(self.sparsity, "with offload_layers")
        if self.retrieval_backend not in ("torch", "onnxruntime"):
            raise InputError(f"retrieval_backend must be torch or onnxruntime, got {self.retrieval_backend!r}")
        if not math.isfinite(self.fallback_threshold):
            raise InputError(f"fallback_threshold must be a finite number, got {self.fallback_threshold}")
        self.sparsity_options()


@dataclass(frozen=True)
class GenerationConfig:
    """What to generate: length, sampling and stopping.

    ``temperature`` 0 means greedy decoding (the default, so results reproduce exactly).
    """

    max_new_tokens: int = _opt(256, "maximum number of tokens to generate")
    temperature: float = _opt(0.0, "sampling temperature; 0 = greedy")
    top_p: float = _opt(1.0, "nucleus sampling: keep the smallest set of tokens with this total probability (0 < p <= 1)")
    top_k: int = _opt(0, "sample only from the k most likely tokens; 0 = no limit")
    seed: int = _opt(0, "random seed for sampling (results reproduce for a given seed)")
    stop: tuple[str, ...] = _opt((), "stop when this string is generated (repeatable); it is not included in the output",
                                 repeatable=True)
    ignore_eos: bool = _opt(False, "keep generating past the end-of-sequence token")

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or not math.isfinite(self.top_p):
            raise InputError(f"temperature and top_p must be finite numbers, got {self.temperature} and {self.top_p}")
        if not -2**63 <= self.seed < 2**63:
            raise InputError(f"seed must fit in a signed 64-bit integer, got {self.seed}")
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InputError("stop strings must be non-empty strings")
