"""The planning mode: a memory plan for model x device x context x requests x budget, with no weights
loaded and no device needed (``specontext-run --plan``, :func:`specontext.plan`)."""

from __future__ import annotations

import os
from typing import Callable
from dataclasses import dataclass, replace

from ..config import ModelConfig
from ..errors import InputError
from .host_memory import host_memory_for
from ..methods import GLOBAL_METHODS
from ..settings import FLOAT_FORMATS, WEIGHT_FORMATS
from ..model.quant import kernel_dtype
from .memory import Buffer, HeadShape, MemoryInputs, buffers, tier_bytes
from .placement import Placement, plan_placement, step_time
from .profiles import DeviceProfile, load_profile

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
MIB = 2**20


def read_model_config(path: str | ModelConfig | None) -> tuple[ModelConfig, str]:
    """The target's shape from a .gguf file, a Hugging Face folder, or a config.json alone (or a
    :class:`ModelConfig` already read, e.g. a loaded model's, which reads no file)."""
    cfg, path, _ = _read_model(path)
    return cfg, path


def _read_model(path: str | ModelConfig | None) -> tuple[ModelConfig, str, Callable[[], str]]:
    """:func:`read_model_config`, and what ``--weights auto`` loads on a CPU, asked only when
    needed (a mixed GGUF's answer comes with a notice): a GGUF's format from its header
    (``GGUFFile.auto_weight_format``: int4, int8 or fp32), else fp32."""
    from .. import assets

    if isinstance(path, ModelConfig):
        return path, path.name, lambda: "fp32"
    path = path or assets.default_model_path()
    if not os.path.exists(path):
        raise InputError(f"model not found: {path} (give a .gguf file, a Hugging Face folder or a config.json)")
    if path.endswith(".gguf"):
        from ..loaders.gguf_loader import GGUFFile

        f = GGUFFile(path)
        return f.model_config(), path, f.auto_weight_format
    if os.path.isdir(path):
        return ModelConfig.from_hf_file(path), path, lambda: "fp32"
    if path.endswith(".json"):  # a config.json alone: named after the file unless it is config.json
        cfg = ModelConfig.from_hf_file(path)
        stem = os.path.splitext(os.path.basename(path))[0]
        return (cfg if stem == "config" else replace(cfg, name=stem)), path, lambda: "fp32"
    raise InputError(f"cannot plan for {path}: give a .gguf file, a Hugging Face folder or a config.json")


def quantized_bytes(weights: str, kind: str) -> tuple[int, int | None]:
    """(bytes of a quantization scale, bytes of an LM head element or None for the compute dtype's)
    as the runtime holds ``weights`` on a ``kind`` device: int4 on a CPU keeps float32 scales and
    zeros (``model/qmatmul.py``), int8 a copy of its row scales in the kernels' dtype; CUDA bf16.
    The head is bf16 beside quantized layers where the kernels run in bf16; a GGUF's Q8_0 head,
    held in int8 groups on a CPU (1.125 B an element), is counted so too, an over-count."""
    from ..model import qmatmul

    bf16 = kind != "cpu" or kernel_dtype().itemsize == 2
    scale = 4 if kind == "cpu" and weights == "int4" and qmatmul.available() else 2 if bf16 else 4
    return scale, 2 if weights in ("int8", "int4") and bf16 else None


def head_shape_for(model: ModelConfig, spec: str) -> tuple[HeadShape, str]:
    """The retrieval head the plan counts: a named artefact, a shipped or trained one made for a
    model of this shape (``auto``; the weights' fingerprint is not checked, since none are
    read), or else the EAGLE-3-shaped head the paper uses."""
    from ..retrieval.head import iter_head_configs, read_head_config

    if spec != "auto":
        return HeadShape.from_config(read_head_config(spec)), spec
    shape = (model.architecture, model.num_layers, model.hidden_size, model.num_heads, model.num_kv_heads,
             model.head_dim, model.vocab_size)
    for path, cfg in iter_head_configs():
        t = cfg.target
        if (t.architecture, t.num_layers, t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim, t.vocab_size) == shape:
            return HeadShape.from_config(cfg), path
    return HeadShape.eagle3_like(model), "assumed: EAGLE-3 shape (fc over 3 layers, one layer's q/k)"


@dataclass
class MemoryPlan:
    """A plan: the inputs, the placement as S grows, and the buffers at the planned context."""

    model_path: str
    model: ModelConfig
    profile: DeviceProfile
    inputs: MemoryInputs
    head_source: str
    context_tokens: int
    placement: Placement

    def at(self, seq_tokens: int) -> tuple[int, list[Buffer]]:
        n = self.placement.num_offloaded_at(seq_tokens)
        return n, buffers(self.inputs, seq_tokens, n, self.placement.slot_pool)

    def lengths(self) -> list[int]:
        """The context grid of the per-length table: powers of two, the thresholds and the context."""
        grid, s = set(), 1024
        while s < self.context_tokens:
            grid.add(s)
            s *= 2
        grid.update(t.seq_tokens for t in self.placement.thresholds if 1 < t.seq_tokens <= self.context_tokens)
        grid.add(self.context_tokens)
        return sorted(grid)

    def to_dict(self) -> dict:
        p, x, m, L = self.profile, self.inputs, self.model, self.model.num_layers
        n, bufs = self.at(self.context_tokens)
        rows = []
        for S in self.lengths():
            k, b = self.at(S)
            t = step_time(x, S, k, p.memory_bandwidth_gb_s * 1e9, p.host_link_gb_s * 1e9, self.placement.slot_pool)
            rows.append({"seq_tokens": S, "num_offloaded": k, "device_bytes": tier_bytes(b, "device"),
                         "host_bytes": tier_bytes(b, "host"), "step_ms": round(t.step_s * 1e3, 3),
                         "compute_ms": round(t.compute_s * 1e3, 3), "transfer_ms": round(t.transfer_s * 1e3, 3),
                         "device_read_bytes": t.device_read_bytes, "link_bytes": t.link_bytes})
        t = step_time(x, self.context_tokens, n, p.memory_bandwidth_gb_s * 1e9, p.host_link_gb_s * 1e9,
                      self.placement.slot_pool)
        return {
            "model": {"path": self.model_path, "name": m.name, "architecture": m.architecture, "num_layers": L,
                      "num_heads": m.num_heads, "num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim,
                      "hidden_size": m.hidden_size, "vocab_size": m.vocab_size,
                      "max_position_embeddings": m.max_position_embeddings},
            "device_profile": p.to_dict(),
            "settings": {"context_tokens": self.context_tokens, "requests": x.requests, "sparsity": x.sparsity,
                         "budget_tokens": x.budget_tokens, "block_tokens": x.block_tokens,
                         "weight_bytes_per_element": x.weight_bytes, "kv_bytes_per_element": x.kv_bytes,
                         "weight_format": x.weight_format, "kv_format": x.kv_format,
                         "embedding_format": x.embedding_format,
                         "prefill_chunk_tokens": x.prefill_chunk_tokens, "retrieval_head": self.head_source,
                         "host_memory": x.host_memory},
            "device_budget_bytes": self.placement.device_budget_bytes,
            "host_budget_bytes": self.placement.host_budget_bytes,
            "unified_memory": self.placement.unified_memory,
            "max_context_tokens": self.placement.max_context_tokens,
            "max_context_limited_by": self.placement.limit_reason,
            "slot_pool": self.placement.slot_pool,
            "pool_tokens": x.pool_tokens(self.context_tokens, self.placement.slot_pool) if n else 0,
            "thresholds": [{"seq_tokens": th.seq_tokens, "num_offloaded": th.num_offloaded,
                            "device_resident_layers": L - th.num_offloaded} for th in self.placement.thresholds],
            "at_context": {"seq_tokens": self.context_tokens, "num_offloaded": n,
                           "offloaded_layers": list(range(L - n, L)),
                           "buffers": [{"name": b.name, "tier": b.tier, "bytes": b.num_bytes, "formula": b.formula}
                                       for b in bufs],
                           "device_bytes": tier_bytes(bufs, "device"), "host_bytes": tier_bytes(bufs, "host"),
                           "predicted_step_ms": round(t.step_s * 1e3, 3),
                           "predicted_tokens_per_s": round(x.requests / t.step_s, 2) if t.step_s else None},
            "per_length": rows,
        }

    def table(self) -> str:
        """The plan as readable text."""
        d = self.to_dict()
        p, s, a = self.profile, d["settings"], d["at_context"]
        out = [f"memory plan: {d['model']['name'] or self.model_path} ({d['model']['num_layers']} layers) on {p.name} "
               f"({p.description})",
               f"  {s['requests']} request(s), context {s['context_tokens']} tokens, {s['sparsity']}"
               + (f" budget {s['budget_tokens']}" if s["sparsity"] != "dense" else "")
               + f", weights {s['weight_bytes_per_element']} B/elem"
               + (f" (linear layers {s['weight_format']})" if s["weight_format"] != "float" else "")
               + (" (embeddings int8)" if s["embedding_format"] == "int8" else "")
               + (f", KV {s['kv_bytes_per_element']} B/elem" if s["kv_format"] == "float"
                  else f", KV {s['kv_format']} (1 B/elem and a float32 scale per token and head)"),
               f"  usable: device {d['device_budget_bytes'] / MIB:,.0f} MiB, host {d['host_budget_bytes'] / MIB:,.0f} MiB"
               + (" (one shared pool: unified memory)" if d["unified_memory"] else ""),
               f"  maximum context: {d['max_context_tokens']} tokens (limited by {d['max_context_limited_by']})",
               "", "  buffers at the planned context:"]
        for b in a["buffers"]:
            out.append(f"    {b['name']:<18} {b['tier']:<6} {b['bytes'] / MIB:>12,.1f} MiB   {b['formula']}")
        out.append(f"    {'total':<18} device {a['device_bytes'] / MIB:>10,.1f} MiB, host {a['host_bytes'] / MIB:,.1f} MiB")
        out += ["", f"  placement as the context grows (slot pool {d['slot_pool']} x budget):",
                f"    {'tokens':>8} {'offloaded':>9} {'device MiB':>11} {'host MiB':>10} {'step ms':>9} "
                f"{'compute':>9} {'transfer':>9}"]
        for r in d["per_length"]:
            out.append(f"    {r['seq_tokens']:>8} {r['num_offloaded']:>9} {r['device_bytes'] / MIB:>11,.0f} "
                       f"{r['host_bytes'] / MIB:>10,.0f} {r['step_ms']:>9.2f} {r['compute_ms']:>9.2f} "
                       f"{r['transfer_ms']:>9.2f}")
        ths = ", ".join(f"S >= {t['seq_tokens']}: {t['num_offloaded']}" for t in d["thresholds"])
        out.append(f"  thresholds (offloaded layers from S on): {ths}")
        out.append(f"  predicted decode at {s['context_tokens']} tokens: {a['predicted_step_ms']:.2f} ms per step "
                   f"({a['predicted_tokens_per_s']} tok/s over {s['requests']} request(s); bytes over bandwidth)")
        return "\n".join(out)


def make_plan(model: str | ModelConfig | None = None, device_profile: str | DeviceProfile = "auto", context_tokens: int | None = None,
              requests: int = 1, budget_tokens: int = 2048, sparsity: str = "specontext", dtype: str = "auto",
              slot_pool: float = 1.0, block_tokens: int = 1, prefill_chunk_tokens: int = 512,
              retrieval_head: str = "auto", pin_fraction: float = 0.5, focus_window_tokens: int = 32,
              weights: str = "auto", kv_dtype: str = "auto", embeddings: str = "float") -> MemoryPlan:
    """Plan memory without loading weights or touching the device.

    Args:
        model: a .gguf file, a Hugging Face folder, a config.json (None: the default model), or a
            :class:`ModelConfig`.
        device_profile: ``auto``, a shipped profile name, a JSON file, or a :class:`DeviceProfile`.
        context_tokens: S, prompt plus new tokens per request (None: the model's context limit).
        requests: R; budget_tokens: K; sparsity: the decode method; slot_pool: the smallest P / K.
        dtype: ``auto`` (bfloat16 on a GPU profile, float32 on a CPU one) or an explicit dtype.
        pin_fraction, focus_window_tokens: query-focused pinning (specontext) and the focus window
            (specontext with pins, snapkv), whose buffers the plan counts.
        weights: the weight format (``--weights``): ``auto`` (on a CPU profile, a GGUF's format
            read from its header as the runtime keeps it; else float, as ``dtype``), ``fp32``,
            ``fp16``, ``bf16`` (which set the dtype), ``int8`` or ``int4`` (the linear layers).
        kv_dtype: the KV format (``--kv-dtype``): ``auto`` (the compute dtype), ``int8`` or ``fp8``
            (8-bit rows with their scales, resident and offloaded alike).
        embeddings: the token table's format (``--embeddings``): ``float`` or ``int8`` (a byte a
            value and a float32 scale a row; the LM head keeps its float table).

    Raises:
        InputError: the plan cannot work (the weights alone exceed the device, or the context
            does not fit), saying what would fit; or a bad input, named.

    Example:
        >>> plan = make_plan("config.json", "rtx-4060-laptop-8gb", context_tokens=32768)  # doctest: +SKIP
        >>> print(plan.table())  # doctest: +SKIP
    """
    cfg, path, auto_weights = _read_model(model)
    profile = device_profile if isinstance(device_profile, DeviceProfile) else load_profile(device_profile)
    if weights == "auto" and profile.kind == "cpu" and dtype in ("auto", "float32"):
        weights = auto_weights()  # as the runtime loads it: a GGUF keeps its quantization on a CPU
    if weights == "gguf":  # the GGUF's own blocks on ggml's CPU kernels
        if profile.kind != "cpu" or not str(path).endswith(".gguf"):
            raise InputError("--weights gguf runs a GGUF file's blocks on a CPU; plan it with a .gguf model on a CPU "
                             "profile, or plan --weights int4")
        # planned as the int4 / int8 it maps to: Q4_1 blocks take 0.125 B a value less than int4's values with
        # float32 scales and zeros (Q4_0 0.1875); the Q8_0 table is counted as the bf16 head (0.94 B an element over)
        weights = auto_weights()
    if weights not in WEIGHT_FORMATS:
        raise InputError(f"weights must be auto, fp32, fp16, bf16, int8, int4 or gguf; got {weights!r}")
    if weights in FLOAT_FORMATS:
        if dtype not in ("auto", FLOAT_FORMATS[weights]):
            raise InputError(f"weights {weights} and dtype {dtype} disagree; give one of them")
        dtype = FLOAT_FORMATS[weights]
    if dtype == "auto":
        dtype = "bfloat16" if profile.kind == "cuda" else "float32"
    if dtype not in DTYPE_BYTES:
        raise InputError(f"dtype must be auto, {', '.join(DTYPE_BYTES)}; got {dtype!r}")
    if requests < 1:
        raise InputError(f"requests must be >= 1, got {requests}")
    if kv_dtype not in ("auto", "int8", "fp8") and FLOAT_FORMATS.get(kv_dtype) != dtype:
        raise InputError(f"--kv-dtype {kv_dtype} cannot be planned: the runtime keeps KV in the compute dtype "
                         f"({dtype}), int8 or fp8; use --kv-dtype auto, int8 or fp8")
    limit = cfg.max_position_embeddings
    S = context_tokens if context_tokens is not None else limit
    if not 1 <= S <= limit:
        raise InputError(f"context_tokens must be in 1..{limit} (the model's context limit), got {S}")
    head, head_source = (head_shape_for(cfg, retrieval_head) if sparsity == "specontext" else (None, "none"))
    kernel_bytes, head_bytes = quantized_bytes(weights, profile.kind)
    inputs = MemoryInputs(model=cfg, weight_bytes=DTYPE_BYTES[dtype], kv_bytes=DTYPE_BYTES[dtype], requests=requests,
                          sparsity=sparsity, budget_tokens=budget_tokens, head=head, slot_pool=slot_pool,
                          block_tokens=block_tokens, prefill_chunk_tokens=prefill_chunk_tokens,
                          fused_attention=profile.kind == "cuda",
                          pin_tokens=round(pin_fraction * budget_tokens) if sparsity == "specontext" else 0,
                          focus_window_tokens=focus_window_tokens, cpu_threads=os.cpu_count() or 1,
                          host_memory=host_memory_for(profile.kind),
                          weight_format=weights if weights in ("int8", "int4") else "float",
                          kv_format=kv_dtype if kv_dtype in ("int8", "fp8") else "float",
                          quant_scale_bytes=kernel_bytes,
                          head_bytes=head_bytes,
                          embedding_format=embeddings)
    placement = plan_placement(inputs, profile.device_budget_bytes, profile.host_budget_bytes, profile.unified_memory,
                               target_seq_tokens=S, max_seq_tokens=limit)
    if placement.max_context_tokens == 0:
        fixed = buffers(inputs, 1, 0 if profile.unified_memory else cfg.num_layers)
        held = sum(b.num_bytes for b in fixed if b.name in ("weights", "head_weights"))
        raise InputError(f"{path} cannot run on {profile.name}: its weights alone need {held / MIB:,.0f} MiB in "
                         f"{dtype}{'' if inputs.weight_format == 'float' else ' with ' + inputs.weight_format + ' layers'} "
                         f"but the device has {profile.device_budget_bytes / MIB:,.0f} MiB usable; use a "
                         f"smaller model or a larger device")
    if S > placement.max_context_tokens:
        mode = "" if profile.unified_memory or sparsity in GLOBAL_METHODS else (
            "; with --sparsity specontext or streaming, offloaded layers need only slots on the device")
        raise InputError(f"a context of {S} tokens x {requests} request(s) does not fit on {profile.name}: at most "
                         f"{placement.max_context_tokens} tokens fit ({placement.limit_reason}); use "
                         f"--context-tokens {placement.max_context_tokens} or fewer, or fewer requests{mode}")
    return MemoryPlan(path, cfg, profile, inputs, head_source, S, placement)
