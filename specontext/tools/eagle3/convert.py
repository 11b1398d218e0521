"""The EAGLE-3 import: a draft checkpoint pruned to a :class:`RetrievalHead` for its target.

Shape letters: E hidden size, G the target's KV heads, V the target vocabulary.

A draft's attention scores are exactly a :class:`RetrievalHead`'s: the same norms, the same
concat order (embedding first), q/k projections and RoPE. The import keeps those tensors under the
head's names (:data:`~.draft.KEPT_TENSORS`) and drops the rest (see :mod:`.draft` for the
draft's layout). The draft's positions are one less than ours (it pairs token p with hidden state
p - 1 at position p - 1), a constant shift RoPE scores do not see.

Shapes are checked first against the draft's own config.json, then against the target; every
mismatch is one line naming the field or tensor.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ...config import _hf_rope
from ...errors import InputError, ModelFileError, UnsupportedModelError
from ...retrieval.head import RetrievalHead, RetrievalHeadConfig, TargetInfo, save_head
from .draft import (EMBEDDING_TENSOR, KEPT_TENSORS, REQUIRED_TENSORS, DraftCheckpoint, dropped_group,
                    read_draft_config, resolve_hidden_layers)


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


def _int_field(cfg: dict, key: str, default: int | None = None) -> int:
    value = cfg.get(key)
    if value is None:  # absent or null
        value = default
    if value is None:
        raise ModelFileError(f"EAGLE-3 draft config.json is missing required field {key!r}")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelFileError(f"EAGLE-3 draft config.json field {key!r} must be a positive integer, got {value!r}")
    return value


def _expect_shape(ckpt: DraftCheckpoint, name: str, shape: tuple[int, ...], why: str) -> None:
    if ckpt.shape[name] != shape:
        raise ModelFileError(f"EAGLE-3 draft tensor {name!r} has shape {list(ckpt.shape[name])}, expected "
                             f"{list(shape)} ({why})")


def _embedding_matches(ckpt: DraftCheckpoint, target_embed: torch.Tensor) -> bool:
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
        ckpt = DraftCheckpoint(draft_dir, stack)
        kept, dropped_names = [], []
        for name in sorted(ckpt.shape):
            if name in KEPT_TENSORS:
                kept.append(name)
            elif dropped_group(name) is not None:
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
            group = dropped_group(name)
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
