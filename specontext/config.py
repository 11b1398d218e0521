"""The model's shape, as one frozen dataclass built from config.json or GGUF metadata.

Nothing here allocates tensors; the planner (later) and the model code both read these values.
``head_dim`` is always read from the source when present, never derived, because Qwen3 and
others decouple it from ``hidden_size / num_heads``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields

from .errors import ModelFileError, UnsupportedModelError

# Architectures we run, by the names Hugging Face configs and GGUF metadata use for them.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
HF_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
ROPE_KINDS = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding parameters.

    ``kind`` is one of ``default``, ``linear``, ``llama3``, ``yarn``. ``freq_factors`` (one per
    rotary pair) divides the inverse frequencies; GGUF files of Llama 3.1 store their llama3
    scaling that way (tensor ``rope_freqs.weight``) instead of as parameters.
    """

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn; None means derived from factor
    mscale: float | None = None  # yarn (DeepSeek style)
    mscale_all_dim: float | None = None  # yarn (DeepSeek style)
    truncate: bool = True  # yarn
    freq_factors: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ROPE_KINDS:
            raise UnsupportedModelError(
                f"RoPE scaling type {self.kind!r} is not supported; supported: {', '.join(ROPE_KINDS)}"
            )
        if self.theta <= 0:
            raise ModelFileError(f"rope_theta must be > 0, got {self.theta}")
        if self.kind != "default" and self.factor <= 0:
            raise ModelFileError(f"rope scaling factor must be > 0, got {self.factor}")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and hyper-parameters of a Llama-family decoder.

    Covers Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5 (q/k/v bias), Qwen3 (q/k RMSNorm, explicit
    head_dim) and SmolLM2, with MHA, GQA or MQA (``num_kv_heads`` = ``num_heads``, fewer, or 1).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelFileError(f"model config field {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelFileError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ModelFileError(f"sliding_window must be > 0 or null, got {self.sliding_window}")

    @property
    def num_queries_per_kv(self) -> int:
        """GQA group size: query heads sharing one KV head."""
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, bytes_per_element: int) -> int:
        """Bytes of K plus V for one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_element

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["rope"] = {f.name: getattr(self.rope, f.name) for f in fields(self.rope)}
        return out

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, cfg: dict, name: str = "") -> "ModelConfig":
        """Build from a Hugging Face ``config.json`` dictionary.

        Raises UnsupportedModelError for architectures or options we do not run, and
        ModelFileError naming the field for missing or malformed values.
        """
        arch = _hf_architecture(cfg)
        try:
            hidden = _req(cfg, "hidden_size", int)
            num_heads = _req(cfg, "num_attention_heads", int)
            if num_heads <= 0:
                raise ModelFileError(f"config.json field 'num_attention_heads' must be > 0, got {num_heads}")
            num_kv_heads = cfg.get("num_key_value_heads") or num_heads
            head_dim = cfg.get("head_dim") or hidden // num_heads
            act = cfg.get("hidden_act", "silu")
            if act != "silu":
                raise UnsupportedModelError(f"hidden_act {act!r} is not supported; only 'silu'")
            sliding = None
            if arch == "mistral":
                sliding = cfg.get("sliding_window")
            elif cfg.get("use_sliding_window"):
                raise UnsupportedModelError(
                    f"{arch} with use_sliding_window=true is not supported; set it to false"
                )
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            attention_bias = bool(cfg.get("attention_bias", False))
            return cls(
                architecture=arch,
                vocab_size=_req(cfg, "vocab_size", int),
                hidden_size=hidden,
                intermediate_size=_req(cfg, "intermediate_size", int),
                num_layers=_req(cfg, "num_hidden_layers", int),
                num_heads=num_heads,
                num_kv_heads=int(num_kv_heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                rope=_hf_rope(cfg),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                # Qwen2 always has q/k/v bias and never o bias; Llama's attention_bias covers all four.
                qkv_bias=True if arch == "qwen2" else attention_bias,
                o_bias=attention_bias if arch in ("llama", "mistral") else False,
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                qk_norm=arch == "qwen3",
                sliding_window=int(sliding) if sliding else None,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
                name=name,
            )
        except (TypeError, ValueError) as exc:
            raise ModelFileError(f"malformed config.json: {exc}") from None

    @classmethod
    def from_hf_file(cls, path: str) -> "ModelConfig":
        """Read ``config.json`` (a file or a folder containing one)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        cfg = read_json_object(path, missing=f"config file not found: {path}")
        return cls.from_hf_dict(cfg, name=os.path.basename(os.path.dirname(os.path.abspath(path))))


def read_json_object(path: str, missing: str) -> dict:
    """A JSON object from ``path``; ModelFileError (``missing`` when absent) otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ModelFileError(missing) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _req(cfg: dict, key: str, typ: type):
    if key not in cfg or cfg[key] is None:
        raise ModelFileError(f"config.json is missing required field {key!r}")
    value = cfg[key]
    if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ModelFileError(f"config.json field {key!r} must be an integer, got {value!r}")
    return typ(value)


def _hf_architecture(cfg: dict) -> str:
    archs = cfg.get("architectures") or []
    for a in archs:
        if a in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[a]
    model_type = cfg.get("model_type")
    if model_type in HF_MODEL_TYPES:
        return HF_MODEL_TYPES[model_type]
    shown = ", ".join(archs) if archs else repr(model_type)
    raise UnsupportedModelError(
        f"unsupported architecture {shown}; supported: {', '.join(HF_ARCHITECTURES)}"
    )


def _hf_rope(cfg: dict) -> RopeConfig:
    # transformers 5 nests everything under rope_parameters; older configs use rope_theta plus
    # an optional rope_scaling dict whose type key is 'rope_type' or 'type'.
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    if kind == "dynamic":
        raise UnsupportedModelError("RoPE scaling type 'dynamic' is not supported; use 'linear' or 'yarn'")
    get = merged.get
    return RopeConfig(
        theta=float(theta),
        kind=kind,
        factor=float(get("factor", 1.0) or 1.0),
        original_max_position_embeddings=get("original_max_position_embeddings"),
        low_freq_factor=float(get("low_freq_factor", 1.0)),
        high_freq_factor=float(get("high_freq_factor", 4.0)),
        beta_fast=float(get("beta_fast") or 32.0),
        beta_slow=float(get("beta_slow") or 1.0),
        attention_factor=get("attention_factor"),
        mscale=get("mscale"),
        mscale_all_dim=get("mscale_all_dim"),
        truncate=bool(get("truncate", True)),
    )
