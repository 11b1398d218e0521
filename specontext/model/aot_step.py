"""The decode step compiled ahead of time (``--compile-decode aot``, CPU): AOTInductor builds it
once, in a child process, into a shared library; this process loads and runs it without importing
torch.compile.

Shape letters: L layers, G KV heads, S positions per row, D head dim, V vocabulary.

Why: on a CPU a small model's eager decode step is mostly framework overhead (the default model:
about 20 ms of a 45-55 ms step on this project's 2-core AVX2 machine; its int4 products and LM
head took about 18 ms on torch's bf16 kernels). torch.compile removes the overhead, but compiling in the serving process
costs its imports and working memory (dynamo and inductor: 178 MiB of RSS for a one-line function;
the default model compiled at 1k peaked at 633 MiB, 1.5x llama.cpp's). AOTInductor
compiles the same step to a library in a child process; loading it adds about 1 MiB.

The step's graph takes the model's weights as inputs rather than constants, so the library holds
no copy of them and does not depend on their values: a library is keyed by what the graph depends
on (:func:`step_key`: the config but its name and token ids, every weight's name, shape and dtype,
the module types, torch's version, this CPU's vector extensions and the thread count it was built
for). Each layer's K and V buffers, [1, G, S, D], are inputs written in place at the step's
position; S is dynamic, so one library serves every cache capacity. One row (B = 1), float KV;
other steps run eagerly.

Each library is checked against the eager model on one step when it is loaded (:meth:`AOTStep.check`).
Built libraries live in ``$SPECONTEXT_AOT_DIR`` or ``$XDG_CACHE_HOME/specontext/aot`` (default
``~/.cache/specontext/aot``), one folder per key, written whole or not at all.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import stat
import subprocess
import sys
from dataclasses import asdict

import torch
from torch import nn

from ..errors import InputError
from ..kv.plan import StepPlan, make_plan
from ..kv.rows import store_rows

MIN_TOKENS = 16  # the smallest cache capacity the library takes (export specializes sizes 0 and 1)
CHECK_TOKENS = 6  # the load's check: this many tokens prefilled eagerly, then one step compared
BUILD_TIMEOUT_S = 3600
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _BufferKV:
    """The step's K/V buffers as the cache interface the layers call: resident, float, dense."""

    def __init__(self, kv: list[torch.Tensor]):
        self.kv = kv

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: StepPlan):
        k_buf, v_buf = self.kv[2 * layer], self.kv[2 * layer + 1]
        store_rows(k_buf, v_buf, k, v, plan)
        return k_buf, v_buf, plan.attn_mask


class _Run(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids, plan, cache):
        return self.model.run(ids, plan, cache)


class DecodeStep(nn.Module):
    """``forward(ids [1, 1], positions [1, 1], mask [1, 1, 1, S] bool, kv [2 L] x [1, G, S, D],
    weights)`` -> float32 logits [1, V]: the model's decode step over whole buffers (a static
    plan, ``kv/plan.py``), with its weights (in :attr:`names` order) passed in."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = _Run(model)
        self.names = [n for n, _ in self.inner.named_parameters()] + [n for n, _ in self.inner.named_buffers()]

    def weights(self) -> list[torch.Tensor]:
        found = {**dict(self.inner.named_parameters()), **dict(self.inner.named_buffers())}
        return [found[n] for n in self.names]

    def forward(self, ids, positions, mask, kv, weights):
        model = self.inner.model
        cos, sin = model.rotary(positions, model.dtype)
        plan = StepPlan(positions=positions, input_lens=(1,), starts=(0,), write_start=None, kv_len=kv[0].shape[2],
                        attn_mask=mask, cos=cos, sin=sin, static=True)
        return torch.func.functional_call(self.inner, dict(zip(self.names, weights)), (ids, plan, _BufferKV(kv)))


def step_key(model: nn.Module, threads: int) -> str:
    """What a built library depends on, hashed (see the module docstring)."""
    from ..model.quant import cpu_bf16_kernels

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            isa = sorted({w for w in f.read().split() if w.startswith(("avx", "amx", "fma", "f16c"))})
    except OSError:
        isa = []
    step = DecodeStep(model)
    config = {k: v for k, v in asdict(model.config).items() if k not in ("name", "bos_token_id", "eos_token_ids")}
    what = {"config": config, "torch": torch.__version__, "isa": isa, "threads": threads, "code": _code_digest(),
            "bf16_kernels": cpu_bf16_kernels(), "dtype": str(model.dtype),
            "weights": [(n, tuple(w.shape), str(w.dtype)) for n, w in zip(step.names, step.weights())],
            "modules": [type(m).__qualname__ for m in model.modules()]}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _code_digest() -> str:
    """This package's step code (the model, the KV layouts, this file): a library built from other
    code is never used, whatever its version says."""
    digest = hashlib.sha256()
    for sub in ("model", "kv"):
        folder = os.path.join(_PACKAGE, sub)
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), "rb") as f:
                    digest.update(name.encode() + f.read())
    with open(os.path.join(_PACKAGE, "config.py"), "rb") as f:
        digest.update(f.read())
    return digest.hexdigest()


def _private_folder(path: str) -> None:
    """Make ``path`` (mode 0700) or check it: a library found there is native code this process
    loads, so the folder must be the user's own and writable by no one else."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.stat(path)
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise InputError(f"{path} holds compiled decode steps, which this process would load and run, but it is not "
                         f"yours alone (owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):o}); set "
                         f"SPECONTEXT_AOT_DIR to a folder only you can write")


def cache_dir() -> str:
    root = os.environ.get("SPECONTEXT_AOT_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "specontext", "aot")
    return root


def build(model: nn.Module, package_path: str) -> str:
    """Export the decode step of ``model`` and compile it with AOTInductor into ``package_path``
    (a ``.pt2``). Imports torch.compile's machinery: run it in a child process (:func:`main`)."""
    cfg = model.config
    step = DecodeStep(model).eval()
    S = min(MIN_TOKENS * 4, max(cfg.max_position_embeddings, MIN_TOKENS + 1))
    kv = [torch.zeros(1, cfg.num_kv_heads, S, cfg.head_dim, dtype=model.dtype) for _ in range(2 * cfg.num_layers)]
    args = (torch.zeros(1, 1, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.int64),
            torch.ones(1, 1, 1, S, dtype=torch.bool), kv, step.weights())
    tokens = torch.export.Dim("tokens", min=MIN_TOKENS, max=max(cfg.max_position_embeddings, MIN_TOKENS + 1))
    shapes = (None, None, {3: tokens}, [{2: tokens}] * len(kv), [None] * len(args[4]))
    with torch.no_grad():
        exported = torch.export.export(step, args, dynamic_shapes=shapes, strict=False)
        return torch._inductor.aoti_compile_and_package(exported, package_path=package_path)


class AOTStep:
    """A built decode step, loaded: call it as the engine calls a compiled step."""

    def __init__(self, package_path: str, model: nn.Module):
        from .decode_attention import available

        self.model = model
        available()  # the graph may call specontext::decode_attention_ (ggml's and the int4 / int8 operators
        # are registered when the model loads its layers)
        self.loader = torch._C._aoti.AOTIModelPackageLoader(package_path, "model", False, 1, -1)
        self.weights = DecodeStep(model).weights()

    def run(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, kv: list[torch.Tensor]) -> torch.Tensor:
        return self.loader.run([ids, positions, mask, *kv, *self.weights])[0]

    def __call__(self, ids, plan: StepPlan, cache, logits_for: str, capture, captured) -> torch.Tensor:
        kv = [t for layer in cache.layers for t in (layer.k, layer.v)]
        return self.run(ids, plan.positions, plan.attn_mask, kv)

    def tolerance(self) -> float:
        """The check's bound on the relative difference: 1e-3, 2^-6 where any weight is held in
        bfloat16 (bf16 kernels and head, ``model/quant.py``, ``model/bf16.py``), 2^-5 on ggml's
        kernels (``model/ggml_linear.py``). bf16 logits outside the refined few are 0.125 apart
        between 16 and 32, and a graph that fuses the float32 ops around the kernels differently
        flips some roundings: on the default model a quarter of the logits moved by one step,
        0.0039 of the largest. ggml rounds every activation row to 8 bits, so a difference of
        1e-7 in an attention output (the native kernel against torch's) moved the default model's
        logits by 0.012 of the largest. A rotary or norm that differs moves them by far more
        (tests/test_aot_step.py, tests/test_ggml.py)."""
        from .ggml_linear import GGMLLinear

        if any(isinstance(m, GGMLLinear) for m in self.model.modules()):
            return 2.0 ** -5
        return 2.0 ** -6 if any(w.dtype == torch.bfloat16 for w in self.weights) else 1e-3

    def check(self) -> float:
        """The largest difference between this library's logits and the eager model's on one decode
        step after CHECK_TOKENS prefilled positions (so rotary, the mask and reads of the past all
        count), relative to the largest logit; raises InputError above :meth:`tolerance`."""
        from ..kv.cache import DenseKVCache

        cfg, model = self.model.config, self.model
        cache = DenseKVCache(cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim, MIN_TOKENS, model.dtype, "cpu",
                             sliding_window=cfg.sliding_window)
        ids = (torch.arange(CHECK_TOKENS + 1) * 7919 % cfg.vocab_size)[None, :]  # any tokens, fixed
        with torch.inference_mode():
            model(ids[:, :CHECK_TOKENS], cache.plan_step([CHECK_TOKENS]), cache, logits_for="none")
            kv = [t.clone() for layer in cache.layers for t in (layer.k, layer.v)]  # the past, before the step
            eager = model(ids[:, CHECK_TOKENS:], cache.plan_step([1]), cache)
        plan = make_plan([CHECK_TOKENS], [1], torch.device("cpu"), cfg.sliding_window, static_tokens=MIN_TOKENS)
        got = self.run(ids[:, CHECK_TOKENS:], plan.positions, plan.attn_mask, kv)
        err = ((got - eager).abs().max() / eager.abs().max().clamp_min(1e-6)).item()
        if not err <= self.tolerance():
            raise InputError(f"the ahead-of-time decode step differs from the eager model (relative error {err:.2g}); "
                             f"delete {cache_dir()} to rebuild it, or use --compile-decode off")
        return err


def load_or_build(model: nn.Module, model_path: str, settings, threads: int) -> AOTStep:
    """The decode step for ``model`` (loaded from ``model_path`` with ``settings``), built in a child
    process the first time (a notice on stderr), then loaded from the cache and checked."""
    if model.device.type != "cpu":
        raise InputError("compile_decode aot runs on a CPU; on CUDA use on or cuda-graph")
    if settings.activations != "float":
        raise InputError("compile_decode aot takes float activations; drop --activations int8 or use "
                         "--compile-decode on")
    key = step_key(model, threads)
    _private_folder(cache_dir())
    folder = os.path.join(cache_dir(), key)
    _private_folder(folder)
    package = os.path.join(folder, "step.pt2")
    with open(os.path.join(folder, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build per key at a time; a second process waits, then loads it
        if not os.path.exists(package):
            _build_in_child(package, key, model_path, settings, threads)
    step = AOTStep(package, model)
    step.check()
    return step


def _build_in_child(package: str, key: str, model_path: str | None, settings, threads: int) -> None:
    print(f"specontext: compiling the decode step ahead of time (once per model and settings; about 2 minutes "
          f"for the default model on 2 cores, in a child process that loads the model again) into "
          f"{os.path.dirname(package)}", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "specontext.model.aot_step", f"--out={package}", f"--key={key}",
           f"--threads={threads}", f"--weights={settings.weights}", f"--embeddings={settings.embeddings}"]
    if model_path:
        cmd.append(f"--model={model_path}")
    try:  # run from the package's parent folder: the child imports this specontext, not one in the cwd
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
                              cwd=os.path.dirname(_PACKAGE))
    except subprocess.TimeoutExpired:
        raise InputError(f"the decode step did not compile ahead of time within {BUILD_TIMEOUT_S} s; use "
                         f"--compile-decode off or on") from None
    if proc.returncode != 0 or not os.path.exists(package):
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise InputError(f"the decode step did not compile ahead of time ({reason[:200]}); "
                         f"use --compile-decode off or on")


def main() -> None:
    """The child process: load the model as the parent did, check the key, build, then move the
    package into place (a build that is interrupted leaves nothing behind)."""
    parser = argparse.ArgumentParser(description="build the ahead-of-time decode step (run by specontext itself)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--model", default=None)
    parser.add_argument("--weights", default="auto")
    parser.add_argument("--embeddings", default="float")
    args = parser.parse_args()
    import specontext

    llm = specontext.load(args.model, device="cpu", threads=args.threads, weights=args.weights,
                          embeddings=args.embeddings)
    if step_key(llm.model, args.threads) != args.key:
        raise SystemExit("the model loaded here is not the one the parent process holds (its key differs)")
    tmp = f"{os.path.splitext(args.out)[0]}.{os.getpid()}.tmp.pt2"  # the packager takes a name ending in .pt2
    try:
        build(llm.model, tmp)
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


if __name__ == "__main__":
    main()
