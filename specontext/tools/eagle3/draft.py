"""What an EAGLE-3 draft checkpoint is: its tensors, how to read them, and which target layers it fuses.

Shape letters: E hidden size (the draft's must equal the target's), H the draft's query heads,
Gh its KV heads, D its head dim, I its MLP width, L fused target layers (3 in EAGLE-3), V the
target vocabulary, Vd the draft vocabulary.

An EAGLE-3 draft (SafeAILab/EAGLE ``eagle/model/cnets.py``; SpecForge
``specforge/modeling/draft/llama3_eagle.py``; vLLM and SGLang ``llama_eagle3.py`` load the same
names) is one decoder layer fed by the target:

    fc.weight                                   [E, L*E]  fuses the target's L hidden states
    midlayer.hidden_norm.weight                 [E]       RMSNorm of the fused hidden state
    midlayer.input_layernorm.weight             [E]       RMSNorm of the token embedding
    midlayer.self_attn.q_proj.weight            [H*D, 2E] input: cat([embedding, hidden], -1)
    midlayer.self_attn.k_proj.weight            [Gh*D, 2E]
    midlayer.self_attn.v_proj.weight            [Gh*D, 2E]                 dropped
    midlayer.self_attn.o_proj.weight            [E, H*D]                   dropped
    midlayer.post_attention_layernorm.weight    [E]                        dropped
    midlayer.mlp.{gate,up,down}_proj.weight     [I, E], [I, E], [E, I]     dropped
    norm.weight [E], lm_head.weight [Vd, E]                                dropped
    d2t [Vd] int64, t2d [V] bool (draft/target vocabulary maps)            dropped
    embed_tokens.weight [V, E] (optional; a copy of the target's)          referenced, not stored

:data:`KEPT_TENSORS` maps the kept ones to the head's names; :data:`DROPPED_GROUPS` names the
rest. Checkpoints are read memory-mapped from safetensors (one file or sharded with an index);
pickle-based ``*.bin``/``*.pt`` files are refused, never loaded.

Which target layers: the EAGLE reference and vLLM/SGLang by default take the *inputs* of layers
2, N//2 and N-3 of an N-layer target (low, mid, high, concatenated in that order); SpecForge
takes the *outputs* of layers 1, N//2-1 and N-4, the same tensors. Our ``hidden_layers`` count
outputs (0-based), so the default is ``(1, N//2 - 1, N - 4)``. A draft's config.json may pin
them: ``eagle_config.eagle_aux_hidden_state_layer_ids`` (SpecForge/SGLang) counts outputs, the
top-level ``eagle_aux_hidden_state_layer_ids`` (vLLM, speculators) counts inputs (id j is the
output of layer j - 1). :func:`resolve_hidden_layers` applies these rules.
"""

from __future__ import annotations

import contextlib
import json
import math
import os

import torch

from ...config import read_json_object
from ...errors import InputError, ModelFileError

# Draft tensor -> head parameter. Biases are optional (present when the draft has attention_bias).
KEPT_TENSORS = {
    "fc.weight": "fc.weight",
    "midlayer.hidden_norm.weight": "hidden_norm.weight",
    "midlayer.input_layernorm.weight": "input_layernorm.weight",
    "midlayer.self_attn.q_proj.weight": "q_proj.weight",
    "midlayer.self_attn.k_proj.weight": "k_proj.weight",
    "midlayer.self_attn.q_proj.bias": "q_proj.bias",
    "midlayer.self_attn.k_proj.bias": "k_proj.bias",
}
REQUIRED_TENSORS = tuple(name for name in KEPT_TENSORS if name.endswith(".weight"))
# Dropped draft tensors by group: (group, exact name or prefix ending in '.').
DROPPED_GROUPS = (
    ("v_proj", "midlayer.self_attn.v_proj."),
    ("o_proj", "midlayer.self_attn.o_proj."),
    ("post_attention_layernorm", "midlayer.post_attention_layernorm."),
    ("mlp", "midlayer.mlp."),
    ("final_norm", "norm."),
    ("lm_head", "lm_head."),
    ("vocab_map", "d2t"),
    ("vocab_map", "t2d"),
    ("embedding", "embed_tokens.weight"),
)
EMBEDDING_TENSOR = "embed_tokens.weight"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


# -- reading the checkpoint --------------------------------------------------------------------


def read_draft_config(draft_dir: str) -> dict:
    """The draft's ``config.json`` as a dict; ModelFileError when missing or malformed."""
    if not os.path.isdir(draft_dir):
        raise ModelFileError(f"EAGLE-3 draft folder not found: {draft_dir}")
    return read_json_object(os.path.join(draft_dir, "config.json"),
                            missing=f"EAGLE-3 draft {draft_dir} has no config.json")


def _shard_paths(draft_dir: str) -> list[str]:
    index_path = os.path.join(draft_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelFileError(f"{index_path} is not a valid safetensors index: {exc}") from None
        for shard in shards:
            if not os.path.isfile(os.path.join(draft_dir, shard)):
                raise ModelFileError(f"safetensors shard {shard} listed in the index is missing from {draft_dir}")
        return [os.path.join(draft_dir, s) for s in shards]
    names = sorted(os.listdir(draft_dir))
    shards = [n for n in names if n.endswith(".safetensors")]
    if shards:
        return [os.path.join(draft_dir, s) for s in shards]
    pickled = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickled:
        raise ModelFileError(
            f"EAGLE-3 draft {draft_dir} has only {pickled[0]}, a pickle checkpoint that specontext never loads; "
            "convert it to model.safetensors (safetensors.torch.save_file on a machine you trust) and retry")
    raise ModelFileError(f"no *.safetensors weights in EAGLE-3 draft {draft_dir}")


class DraftCheckpoint:
    """Memory-mapped tensors of a (possibly sharded) safetensors checkpoint: shapes first, data on demand.

    ``shape[name]`` and ``dtype[name]`` (safetensors dtype names, e.g. ``"BF16"``) are read from the
    headers; :meth:`get` reads one tensor. The files stay open until ``stack`` closes.

    Example::

        with contextlib.ExitStack() as stack:
            ckpt = DraftCheckpoint("EAGLE3-LLaMA3.1-Instruct-8B", stack)
            fc = ckpt.get("fc.weight")  # [E, L*E]
    """

    def __init__(self, draft_dir: str, stack: contextlib.ExitStack):
        from safetensors import SafetensorError, safe_open

        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, str] = {}
        self._file: dict[str, object] = {}
        for path in _shard_paths(draft_dir):
            try:
                f = stack.enter_context(safe_open(path, framework="pt"))
                for name in f.keys():
                    sl = f.get_slice(name)
                    self.shape[name] = tuple(sl.get_shape())
                    self.dtype[name] = sl.get_dtype()
                    self._file[name] = f
            except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ModelFileError(f"{path} is not a valid safetensors file: {first}") from None

    def numel(self, name: str) -> int:
        return math.prod(self.shape[name])

    def is_float(self, name: str) -> bool:
        return self.dtype[name] in _FLOAT_DTYPES

    def get(self, name: str) -> torch.Tensor:
        return self._file[name].get_tensor(name)


def dropped_group(name: str) -> str | None:
    """The :data:`DROPPED_GROUPS` group of a draft tensor ``name``; None for a tensor no group names."""
    for group, key in DROPPED_GROUPS:
        if name == key or (key.endswith(".") and name.startswith(key)):
            return group
    return None


# -- layer convention --------------------------------------------------------------------------


def default_hidden_layers(num_target_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's low/mid/high layers as 0-based layer outputs: ``(1, N//2 - 1, N - 4)``.

    (The EAGLE reference captures the inputs of layers 2, N//2, N-3; SpecForge these outputs.)
    """
    n = num_target_layers
    return 1, n // 2 - 1, n - 4


def resolve_hidden_layers(draft_cfg: dict, num_target_layers: int, num_fused: int,
                          hidden_layers: tuple[int, ...] | None = None) -> tuple[tuple[int, ...], str]:
    """The target layers (0-based outputs) a draft fuses, and where that came from.

    Order of precedence: ``hidden_layers`` (our convention); ``eagle_config.
    eagle_aux_hidden_state_layer_ids`` (outputs, SpecForge/SGLang); top-level
    ``eagle_aux_hidden_state_layer_ids`` (inputs, vLLM: id j means the output of layer j - 1);
    else :func:`default_hidden_layers` (only for the standard 3 fused layers).

    Raises:
        InputError: the layers are out of range, not ``num_fused`` of them, or the draft's config
            pins them ambiguously (both fields, disagreeing).
    """
    n = num_target_layers

    def is_int_list(layers) -> bool:
        return isinstance(layers, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool)
                                                         for i in layers)

    def checked(layers, what: str) -> tuple[int, ...]:
        if not is_int_list(layers):
            raise InputError(f"{what} must be a list of integers, got {layers!r}")
        layers = tuple(layers)
        if len(layers) != num_fused:
            raise InputError(f"{what} names {len(layers)} layers {list(layers)}, but the draft's fc.weight fuses "
                             f"{num_fused} hidden states")
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise InputError(f"{what} has layer {bad[0]} (0-based output), outside the target's {n} layers")
        return layers

    if hidden_layers is not None:
        return checked(hidden_layers, "hidden layers"), "given"
    nested = draft_cfg.get("eagle_config")
    nested_ids = nested.get("eagle_aux_hidden_state_layer_ids") if isinstance(nested, dict) else None
    top_ids = draft_cfg.get("eagle_aux_hidden_state_layer_ids")
    from_nested = from_top = None
    if nested_ids:
        from_nested = checked(nested_ids, "config.json eagle_config.eagle_aux_hidden_state_layer_ids")
    if top_ids:
        if not is_int_list(top_ids):
            raise InputError("config.json eagle_aux_hidden_state_layer_ids must be a list of integers, "
                             f"got {top_ids!r}")
        if 0 in top_ids:
            raise InputError("config.json eagle_aux_hidden_state_layer_ids has 0 (the embedding output), which a "
                             "retrieval head cannot fuse; pass --hidden-layers")
        from_top = checked([i - 1 for i in top_ids],
                           "config.json eagle_aux_hidden_state_layer_ids (layer inputs, minus 1)")
    if from_nested and from_top and from_nested != from_top:
        raise InputError(
            f"the draft's config.json pins its target layers twice and they disagree: eagle_config."
            f"eagle_aux_hidden_state_layer_ids {list(nested_ids)} (layer outputs) vs eagle_aux_hidden_state_layer_ids "
            f"{list(top_ids)} (layer inputs); pass --hidden-layers with the 0-based layers whose outputs it was "
            "trained on")
    if from_nested:
        return from_nested, "config.json eagle_config.eagle_aux_hidden_state_layer_ids"
    if from_top:
        return from_top, "config.json eagle_aux_hidden_state_layer_ids"
    if num_fused != 3:
        raise InputError(f"the draft fuses {num_fused} hidden states and its config.json does not say from which "
                         "layers; pass --hidden-layers")
    layers = default_hidden_layers(n)
    if not 0 <= layers[0] < layers[1] < layers[2] < n:
        raise InputError(f"the EAGLE-3 default layers {list(layers)} do not fit a {n}-layer target; "
                         "pass --hidden-layers")
    return layers, "EAGLE-3 default (1, N//2-1, N-4)"


