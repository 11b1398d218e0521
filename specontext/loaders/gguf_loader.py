"""GGUF files: metadata -> ModelConfig, tensors -> dequantized Hugging Face-named tensors.

Tensors are dequantized with the ``gguf`` package (Q4_0, Q4_1, Q8_0, K-quants and the other
types it implements). GGUF stores Llama-architecture q/k projections with rows permuted for
interleaved RoPE; they are permuted back here so one model implementation serves both formats.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from dataclasses import dataclass
from collections.abc import Callable, MutableMapping

import numpy as np
import torch

from ..config import ModelConfig, RopeConfig
from ..errors import InputError, ModelFileError, UnsupportedModelError, malformed
from ..model.quant import INT4_GROUP, QuantizedWeight, kernel_dtype, quantize
from .gguf_check import check_gguf_layout
from .gguf_quant import INT4_TYPES, INT8_TYPES, int4_from_gguf, int8_from_gguf

GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# the linear layers whose weights may stay quantized (embeddings and the LM head load as float)
_LINEAR_PARTS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def part_of(stem: str) -> str:
    """``blk.N.attn_q`` -> ``attn_q``; a global tensor's stem unchanged."""
    return stem.split(".", 2)[2] if stem.startswith("blk.") else stem


FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
DEQUANT_ROWS = 4096  # rows dequantized at a time (the default model's embeddings: 12 x 9 MiB)


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the header describes it: ``shape`` fastest dimension first (GGUF's order),
    ``raw_shape`` / ``dtype`` how its stored bytes are viewed (rows of blocks for quantized types)."""

    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    data_offset: int
    n_bytes: int
    dtype: np.dtype
    raw_shape: tuple[int, ...]


_NUMPY_TYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                "I32": np.int32, "I64": np.int64}


def _tensor_info(entry, data_start: int) -> TensorInfo:
    """A header entry (``gguf_check.TensorEntry``, already checked) as the reads view it: float and
    integer types as their values, others as rows of their blocks' bytes."""
    import gguf

    qtype = gguf.GGMLQuantizationType(entry.ggml_type)
    shape = tuple(reversed(entry.dims))
    dtype = _NUMPY_TYPES.get(qtype.name)
    if dtype is None:
        block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
        dtype, shape = np.uint8, (*shape[:-1], shape[-1] // block * type_bytes)
    return TensorInfo(entry.name, qtype, entry.dims, data_start + entry.offset, entry.n_bytes, np.dtype(dtype), shape)


def auto_format(linear_types: list[str], warn: bool = False) -> str:
    """``int4``, ``int8`` or ``fp32`` for a GGUF whose linear layers have ``linear_types`` (see
    :meth:`GGUFFile.auto_weight_format`); ``warn``: note a fall-back from quantized types.

    Where the CPU has neither native bfloat16 nor AVX2 (``model/quant.py``, ``cpu_bf16_kernels``)
    torch's int4 and int8 kernels took float32 activations and were slower than float32 weights
    (int4 decoded the default model at 9.9 tok/s against 24 with float32 activations); int4 now
    runs on the native products there too (``model/qmatmul.py``), on their plain loops, which were
    not measured on such a CPU, so ``auto`` still loads float32 there, with a notice."""
    fmt = None
    if linear_types and all(t in INT4_TYPES for t in linear_types):
        fmt = "int4"
    elif linear_types and all(t in INT8_TYPES for t in linear_types):
        fmt = "int8"
    if fmt is not None and kernel_dtype() == torch.bfloat16:
        return fmt
    if fmt is not None:
        if warn:
            warnings.warn(f"this CPU has neither native bfloat16 nor AVX2, where the {fmt} kernels are slower than float32, so "
                          f"--weights auto loads the GGUF's {', '.join(linear_types)} layers as float32; "
                          f"--weights {fmt} keeps them {fmt}", stacklevel=3)
        return "fp32"
    quantized = [t for t in linear_types if t not in FLOAT_TYPES]
    if warn and quantized:
        warnings.warn(f"the GGUF's linear layers are {', '.join(linear_types)}; --weights auto keeps one "
                      f"quantized format for all of them ({', '.join(INT4_TYPES)} as int4, or "
                      f"{', '.join(INT8_TYPES)} as int8), so they load as float; --weights int4 or int8 "
                      f"quantizes them", stacklevel=3)
    return "fp32"


class GGUFFile:
    """An opened GGUF file: decoded metadata and lazily dequantized tensors.

    Example::

        f = GGUFFile(path)
        cfg = f.model_config()
        tensors = f.hf_tensors(cfg)   # {"model.embed_tokens.weight": float32 tensor, ...}
    """

    def __init__(self, path: str):
        self.path = path
        # every count and length checked against the file's real size as it is read (this also
        # names a missing, unreadable or directory path): the metadata and the tensors' places
        self.layout = check_gguf_layout(path)
        self.meta = self.layout.metadata
        self.tensors = [_tensor_info(t, self.layout.data_start) for t in self.layout.tensors]
        arch = self.meta.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise UnsupportedModelError(
                f"GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)}"
            )
        self.arch = arch

    def _get(self, key: str, required: bool = True, default=None):
        value = self.meta.get(f"{self.arch}.{key}")
        if value is None:
            if required:
                raise ModelFileError(f"GGUF file {self.path} lacks metadata field {self.arch}.{key}")
            return default
        return value

    @malformed("the GGUF file's model metadata")
    def model_config(self) -> ModelConfig:
        names = {t.name for t in self.tensors}
        num_heads = int(self._get("attention.head_count"))
        hidden = int(self._get("embedding_length"))
        head_dim = int(self._get("attention.key_length", required=False, default=hidden // num_heads))
        tokens = self.meta.get("tokenizer.ggml.tokens") or []
        vocab = int(self._get("vocab_size", required=False, default=len(tokens)))
        if not vocab:
            raise ModelFileError(f"GGUF file {self.path} gives no vocabulary size")
        scaling = self._get("rope.scaling.type", required=False, default="none")
        kind = {"none": "default", "linear": "linear", "yarn": "yarn"}.get(scaling)
        if kind is None:
            raise UnsupportedModelError(f"GGUF rope scaling {scaling!r} is not supported; supported: none, linear, yarn")
        freq_factors = None
        if "rope_freqs.weight" in names:  # Llama 3.1 style scaling, precomputed per frequency
            freq_factors = tuple(float(x) for x in self._tensor_f32("rope_freqs.weight").reshape(-1))
        eos = self.meta.get("tokenizer.ggml.eos_token_id")
        return ModelConfig(
            architecture=GGUF_ARCHITECTURES[self.arch],
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(self._get("feed_forward_length")),
            num_layers=int(self._get("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(self._get("attention.head_count_kv", required=False, default=num_heads)),
            head_dim=head_dim,
            rms_norm_eps=float(self._get("attention.layer_norm_rms_epsilon")),
            max_position_embeddings=int(self._get("context_length")),
            rope=RopeConfig(
                theta=float(self._get("rope.freq_base", required=False, default=10000.0)),
                kind=kind,
                factor=float(self._get("rope.scaling.factor", required=False, default=1.0)),
                original_max_position_embeddings=self._get("rope.scaling.original_context_length", required=False),
                freq_factors=freq_factors,
                **(self._yarn_fields() if kind == "yarn" else {}),
            ),
            tie_word_embeddings="output.weight" not in names,
            qkv_bias="blk.0.attn_q.bias" in names,
            o_bias="blk.0.attn_output.bias" in names,
            mlp_bias="blk.0.ffn_up.bias" in names,
            qk_norm="blk.0.attn_q_norm.weight" in names,
            bos_token_id=self.meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=(int(eos),) if eos is not None else (),
            name=str(self.meta.get("general.name") or ""),
        )

    def _yarn_fields(self) -> dict:
        """YaRN's optional GGUF metadata as RopeConfig fields: the ramp's rotation bounds
        (``rope.scaling.yarn_beta_fast`` / ``yarn_beta_slow``) and the attention scale. A
        ``yarn_attn_factor`` is the whole scale (transformers' ``attention_factor``); llama.cpp's
        general ``rope.scaling.attn_factor`` multiplies YaRN's own 0.1 ln(factor) + 1."""
        out = {}
        for key, name in (("rope.scaling.yarn_beta_fast", "beta_fast"), ("rope.scaling.yarn_beta_slow", "beta_slow")):
            value = self._get(key, required=False)
            if value is not None:
                out[name] = float(value)
        whole = self._get("rope.scaling.yarn_attn_factor", required=False)
        general = self._get("rope.scaling.attn_factor", required=False)
        factor = float(self._get("rope.scaling.factor", required=False, default=1.0))
        if whole is not None:
            out["attention_factor"] = float(whole)
        elif general is not None:
            out["attention_factor"] = float(general) * (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
        return out

    def _raw(self, tensor) -> np.ndarray:
        """A tensor's stored bytes (or values), shaped as the reader describes them; the reader's
        view is only a shape and dtype, its bytes are read from the file here."""
        return np.frombuffer(self._read(tensor.data_offset, tensor.n_bytes), dtype=tensor.dtype).reshape(tensor.raw_shape)

    def _tensor_f32(self, name: str) -> np.ndarray:
        import gguf

        tensor = next(t for t in self.tensors if t.name == name)
        qtype = tensor.tensor_type
        try:
            data = self._raw(tensor)
            if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                         gguf.GGMLQuantizationType.F64):
                arr = data.astype(np.float32)
            elif data.ndim == 2 and data.shape[0] > DEQUANT_ROWS:
                # by rows: gguf's dequantization holds a few float32 copies of what it is given
                arr = None
                for i in range(0, data.shape[0], DEQUANT_ROWS):
                    part = gguf.quants.dequantize(data[i:i + DEQUANT_ROWS], qtype)
                    if arr is None:
                        arr = np.empty((data.shape[0], *part.shape[1:]), dtype=np.float32)
                    arr[i:i + len(part)] = part
            else:
                arr = gguf.quants.dequantize(data, qtype)
        except NotImplementedError:
            raise UnsupportedModelError(
                f"tensor {name} has GGUF type {qtype.name}, which the gguf package cannot dequantize"
            ) from None
        except (ValueError, IndexError) as exc:
            raise ModelFileError(f"tensor {name} in {self.path} is corrupt: {exc}") from None
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists the fastest dim first
        if arr.size != int(np.prod(shape)):
            raise ModelFileError(f"tensor {name} in {self.path} has {arr.size} values, expected {np.prod(shape)}")
        return arr.reshape(shape)

    def _read(self, offset: int, size: int) -> bytearray:
        """``size`` bytes at ``offset``, read through the file (never mapped: a file truncated
        meanwhile is a short read and a clear error, not a SIGBUS), from the file the header
        came from."""
        buf = bytearray(size)
        with open(self.path, "rb") as f:
            self._check_identity(os.fstat(f.fileno()))
            f.seek(offset)
            if f.readinto(buf) != size:
                raise self._changed()
        return buf

    def _changed(self) -> ModelFileError:
        return ModelFileError(f"{self.path} changed while it was being read (another program wrote or replaced it); "
                              "load it again once it is complete")

    def linear_types(self) -> list[str]:
        """The GGUF types of the linear layers' weights, sorted, each once (``Q4_1``, ``F16``, ...)."""
        return sorted({t.tensor_type.name for t in self.tensors
                       if t.name.endswith(".weight") and part_of(t.name.rpartition(".")[0]) in _LINEAR_PARTS})

    def auto_weight_format(self) -> str:
        """What ``--weights auto`` keeps on a CPU: ``int4`` when every linear layer is Q4_0, Q4_1 or
        Q4_K, ``int8`` when every one is Q8_0, else ``fp32`` (float types, or a mix or a type the
        kernels do not take, which is noted once: one format serves all layers, so that the
        planner's count and the fused q/k/v and gate/up layers stay one format)."""
        return auto_format(self.linear_types(), warn=True)

    def _quantized(self, tensor, weights: str) -> QuantizedWeight | None:
        """A linear layer's weight kept quantized as ``weights`` (``int4`` / ``int8``) asks, read
        one tensor at a time: straight from its blocks where its type maps onto the format."""
        type_name, rows, k = tensor.tensor_type.name, int(tensor.shape[1]), int(tensor.shape[0])
        if weights == "int4" and type_name in INT4_TYPES:
            return int4_from_gguf(self._raw(tensor), type_name, rows, k)
        if weights == "int8" and type_name in INT8_TYPES:
            return int8_from_gguf(self._raw(tensor), rows, k)
        if weights == "int4" and k % INT4_GROUP:
            raise InputError(f"tensor {tensor.name} has {k} input features, not a multiple of {INT4_GROUP}, so it "
                             f"cannot be int4; use --weights int8 or fp32")
        return quantize(torch.from_numpy(self._tensor_f32(tensor.name)), weights)

    def _blocks(self, tensor, linear: bool):
        """A weight's bytes as the GGUF stores them (``--weights gguf``, ``model/ggml_linear.py``), or
        None for a table whose type ggml cannot multiply (it then loads float); a linear layer of
        such a type is refused, naming what would load it."""
        from ..model.ggml_linear import BlockWeight, row_bytes

        type_name, rows, k = tensor.tensor_type.name, int(tensor.shape[1]), int(tensor.shape[0])
        data = self._raw(tensor).view(np.uint8).reshape(rows, -1)
        if row_bytes(int(tensor.tensor_type), k) != data.shape[1]:
            if not linear:
                return None
            raise InputError(f"tensor {tensor.name} has GGUF type {type_name}, which ggml's CPU kernels do not "
                             f"multiply in rows of {k}; use --weights int4 or fp32")
        return BlockWeight(int(tensor.tensor_type), torch.from_numpy(data), k)  # owns its bytes (read, not mapped)

    @malformed("a GGUF tensor")
    def hf_tensors(self, cfg: ModelConfig, weights: str = "fp32") -> LazyTensors:
        """All weights under Hugging Face names, each read when taken (:class:`LazyTensors`):
        float32 CPU tensors, and, when ``weights`` is ``int4`` or ``int8`` (or ``auto`` choosing
        one, :meth:`auto_weight_format`), the linear layers' weights as :class:`QuantizedWeight`
        (never dequantized whole where the GGUF type maps onto the format)."""
        if weights == "auto":
            weights = self.auto_weight_format()
        if weights == "gguf":
            from ..model.ggml_linear import ggml

            ggml()  # ggml must be there before any tensor is read: a missing extra fails here, in one line
        out: dict = {}
        for tensor in self.tensors:
            name = tensor.name
            stem, _, kind = name.rpartition(".")  # kind: weight / bias
            if stem.startswith("blk."):
                _, layer, part = stem.split(".", 2)
                hf = _LAYER_NAMES.get(part)
                if hf is None:
                    raise UnsupportedModelError(f"GGUF tensor {name} has no counterpart in a {cfg.architecture} model")
                hf_name = f"model.layers.{layer}.{hf}.{kind}"
            elif stem in _GLOBAL_NAMES:
                hf_name = f"{_GLOBAL_NAMES[stem]}.{kind}"
            elif stem == "rope_freqs":
                continue  # folded into the RoPE config
            else:
                raise UnsupportedModelError(f"GGUF tensor {name} is not part of a {cfg.architecture} model")
            out[hf_name] = functools.partial(self._hf_tensor, tensor, hf_name, stem, kind, weights, cfg)
        return LazyTensors(out, self.check_unchanged, weights)

    @malformed("a GGUF tensor")
    def _hf_tensor(self, tensor, hf_name: str, stem: str, kind: str, weights: str,
                   cfg: ModelConfig) -> torch.Tensor | QuantizedWeight:
        """One tensor read from the file and converted as :meth:`hf_tensors` describes."""
        permuted = self.arch == "llama" and hf_name.endswith(
            ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias"))
        heads = cfg.num_heads if ".q_proj." in hf_name else cfg.num_kv_heads
        quantized = None  # a weight kept in blocks (gguf) or int4 / int8
        if weights == "gguf" and kind == "weight" and (part_of(stem) in _LINEAR_PARTS or stem in ("token_embd", "output")):
            quantized = self._blocks(tensor, linear=part_of(stem) in _LINEAR_PARTS)  # None: a float table
        elif weights in ("int4", "int8") and kind == "weight" and part_of(stem) in _LINEAR_PARTS:
            quantized = self._quantized(tensor, weights)
        if quantized is not None:
            if permuted:  # the same rows as the float path, by index
                order = _unpermute_rope_rows(np.arange(quantized.shape[0])[:, None], heads)[:, 0]
                quantized = quantized.rows(torch.from_numpy(np.ascontiguousarray(order)))
            return quantized
        arr = self._tensor_f32(tensor.name)
        if permuted:
            arr = _unpermute_rope_rows(arr, heads)
        # float32, C order and writable; copied only where it is not already (a table's values are
        # made here, so a second copy would double the load's peak: 113 MiB for the default model's)
        return torch.from_numpy(np.require(arr, np.float32, ["C", "W"]))

    def check_unchanged(self) -> None:
        """Raise ModelFileError if the file is no longer the one whose header was read."""
        self._check_identity(os.stat(self.path))

    def _check_identity(self, now: os.stat_result) -> None:
        then = self.layout.stat
        if (now.st_ino, now.st_dev, now.st_size, now.st_mtime_ns) != (then.st_ino, then.st_dev, then.st_size,
                                                                       then.st_mtime_ns):
            raise self._changed()


class LazyTensors(MutableMapping):
    """Hugging Face-named tensors read from the file when taken: ``pop`` reads one and forgets it,
    so a loader that pops each weight as it builds the model holds the model plus one tensor,
    never a second copy of every weight. ``tensors[name]`` reads again each time; assigned values
    are kept. :meth:`check` says whether the file stayed the same while it was read;
    ``weight_format`` is the linear layers' format (``int4``, ``int8`` or ``fp32``)."""

    def __init__(self, readers: dict, check: Callable[[], None], weight_format: str):
        self._items = dict(readers)  # name -> a reader (functools.partial) or a value
        self.check = check
        self.weight_format = weight_format

    def __getitem__(self, name: str):
        item = self._items[name]
        return item() if isinstance(item, functools.partial) else item

    def __contains__(self, name) -> bool:  # without reading (Mapping's would)
        return name in self._items

    def __setitem__(self, name: str, value) -> None:
        self._items[name] = value

    def __delitem__(self, name: str) -> None:
        del self._items[name]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def _unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    # GGUF conversion reorders each head's rows from [first half | second half] to interleaved
    # pairs (x0, x_half, x1, x_half+1, ...); undo it to get the half-split layout back.
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
