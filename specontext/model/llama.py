"""Llama-family decoder: Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM2.

Shape letters: B batch, T tokens this step, H query heads, G KV heads, R = H / G (queries per KV
head), D head dim, S attended positions, E hidden size, V vocabulary.

Module names follow Hugging Face checkpoint keys, except two projections fused at load time for
fewer kernel launches per layer (see FUSED_WEIGHTS): q/k/v -> ``qkv_proj`` and gate/up ->
``gate_up_proj``. Attention never allocates KV: it hands its new K/V to the cache strategy and
attends over what the cache returns.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import InputError
from ..kv.cache import KVCache
from ..kv.plan import StepPlan, to_device
from .decode_attention import decode_attention, usable
from .norm import RMSNorm
from .qmatmul import take_int8_tables
from .quant import Int4Linear, Int8Linear, QuantizedWeight, concat_rows, quantize, quantized_linear
from .rope import RotaryEmbedding, apply_rotary

# tables kept quantized: GGUF blocks (--weights gguf, model/ggml_linear.py) or int8 groups (model/qmatmul.py)
KEPT_TABLES = ("model.embed_tokens.blocks", "lm_head.blocks", "model.embed_tokens.q", "model.embed_tokens.scale",
               "lm_head.q", "lm_head.scale")
# our parameter name suffix -> the checkpoint suffixes concatenated (along dim 0) to make it
FUSED_WEIGHTS = {
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "self_attn.qkv_proj.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.gate_up_proj.bias": ("mlp.gate_proj.bias", "mlp.up_proj.bias"),
}


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, device=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.split = (q_out, kv_out, kv_out)
        self.qkv_proj = nn.Linear(cfg.hidden_size, q_out + 2 * kv_out, bias=cfg.qkv_bias, device=device)
        self.o_proj = nn.Linear(q_out, cfg.hidden_size, bias=cfg.o_bias, device=device)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, device)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, device)

    def forward(self, x: torch.Tensor, plan: StepPlan, cache: KVCache) -> torch.Tensor:
        B, T, _ = x.shape
        H, G, D = self.num_heads, self.num_kv_heads, self.head_dim
        R = H // G
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, G, D), v.view(B, T, G, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q.transpose(1, 2), plan.cos, plan.sin)  # [B, H, T, D]
        k = apply_rotary(k.transpose(1, 2), plan.cos, plan.sin)  # [B, G, T, D]
        keys, values, mask = self._attended(k, v.transpose(1, 2), q, plan, cache)  # [B, G, S, D]
        if plan.focus is not None:  # a prefill chunk holding the prompt's focus window
            plan.focus.observe(self.layer_idx, q, keys, mask)
        if T == 1 and usable(q, keys, mask):  # the native kernel (model/decode_attention.py)
            return self.o_proj(decode_attention(q, keys, values, mask).reshape(B, 1, H * D))
        if T == 1 and q.device.type == "cpu" and R > 1:
            # A CPU decode step: torch's flash kernel for CPU splits its work by (batch, head), so
            # H heads of one query keep both cores busy where G folded heads of R queries do not
            # (76 against 99 us a layer at 1k positions, 2 threads); enable_gqa reads KV head
            # h // R without repeating it. A [B, G, 1, S] mask (a sparse step's) goes per head.
            if mask is not None and mask.shape[1] == G:
                mask = mask.repeat_interleave(R, dim=1)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)  # [B, H, 1, D]
            return self.o_proj(out.reshape(B, 1, H * D))
        # Fold the R query heads of each KV group into the query axis so attention runs per KV
        # head without materialising repeated K/V (query head h uses KV head h // R).
        q = q.reshape(B, G, R * T, D)
        if mask is not None and R > 1 and T > 1 and mask.shape[1] == 1:  # [B, 1, T, S] -> [B, 1, R*T, S]
            grouped = plan.attn_mask_grouped if mask is plan.attn_mask else None
            mask = grouped if grouped is not None else mask.repeat(1, 1, R, 1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [B, G, R*T, D]
        out = out.view(B, G, R, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, H * D)
        return self.o_proj(out)


    def _attended(self, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, plan: StepPlan, cache: KVCache):
        """Store the new k, v [B, G, T, D]; the keys, values and mask this step attends over. A
        selection chosen inside each layer is asked here, with this layer's queries and past keys."""
        layer, sel = self.layer_idx, plan.selection
        if sel is None or sel.policy is None:
            return cache.update(layer, k, v, plan)
        cache.store(layer, k, v, plan)
        past_keys, past_valid = cache.past(layer, plan)
        indices, valid = sel.policy(layer, q, past_keys, past_valid)
        return cache.gather(layer, plan, indices, valid)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias, device=device)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, device=None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)
        self.self_attn = Attention(cfg, layer_idx, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)
        self.mlp = MLP(cfg, device)

    def forward(self, x: torch.Tensor, plan: StepPlan, cache: KVCache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), plan, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """Embeddings, layers and final norm (HF's ``model.`` prefix)."""

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        # given its (uninitialised) weight: nn.Embedding's normal_ initialiser on a meta tensor
        # imports torch._dynamo (see LlamaForCausalLM)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, device=device,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size, device=device))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, device) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)


class LlamaForCausalLM(nn.Module):
    """The decoder with its LM head.

    Build it on the ``meta`` device and fill it with :meth:`load_checkpoint`, so weights are
    materialised once, in their final dtype and device. Pass ``device="meta"`` rather than
    building under ``with torch.device("meta")``: under that mode the parameters' initialisers
    run torch's Python reference ops, and a normal_ on a meta tensor imports torch._dynamo
    (73 MiB of resident memory on this project's CPU) for a model that may never compile.

    Example::

        model = LlamaForCausalLM(cfg, device="meta")
        model.load_checkpoint(tensors, dtype=torch.float32, device="cpu")
        cache = DenseKVCache(cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim, 64, torch.float32, "cpu")
        logits = model(ids, cache.plan_step([ids.shape[1]]), cache)   # [1, V]
    """

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.config = cfg
        self.model = DecoderStack(cfg, device)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device=device)
        self.rotary: RotaryEmbedding | None = None

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (activations, KV): the final norm's (the LM head and embeddings may
        be held in bfloat16 beside quantized layers, ``model/bf16.py``)."""
        return self.model.norm.weight.dtype

    def load_checkpoint(self, tensors: dict, dtype: torch.dtype, device, quantize_to: str | None = None,
                        held_in: dict[str, torch.dtype] | None = None, int8_tables: bool = False) -> None:
        """Load Hugging Face-named tensors, fusing projections per FUSED_WEIGHTS.

        Every parameter must be provided (missing ones are named in the error); extra
        checkpoint entries such as rotary buffers are ignored. Entries are popped from
        ``tensors`` as they are used, so peak memory stays near one copy of the weights.

        ``quantize_to`` (``int4`` or ``int8``): the linear layers become int4 or int8 modules; a
        weight given as a :class:`~specontext.model.quant.QuantizedWeight` stays as it is, float
        ones are quantized as they load. None: every weight must be float. Embeddings, norms and the LM head stay
        float (an int8 LM head, one scale a row, cost top-1 agreement 1.0 -> 0.97 on the default model),
        except as ``held_in`` and ``int8_tables`` say.

        ``held_in``: tensors that load in another dtype than ``dtype`` (the bf16 LM head and table
        beside quantized layers on a CPU, ``model/bf16.py``), converted first, before the quantized
        layers are made, so a float32 table is never held beside its copy and those layers (the
        default model's: 113 MiB beside 56 MiB and 66 MiB of int4 layers). ``int8_tables``: an LM head
        and embedding table (one when tied) whose values are exact int8 groups (a GGUF's Q8_0) are
        held so instead (:func:`~specontext.model.qmatmul.take_int8_tables`), before that.
        """
        from ..errors import ModelFileError

        device = torch.device(device)
        tied = self.config.tie_word_embeddings and "lm_head.weight" not in tensors
        held_in = held_in or {}
        if quantize_to == "gguf" and self._load_tables_as_blocks(tensors, tied):
            tied = False  # the head and table are loaded (as one module pair when tied)
        if int8_tables and take_int8_tables(self, tensors, tied):
            tied = False
        for name, held_dtype in held_in.items():
            if name in tensors:
                # a copy even where the dtype matches: a memory-mapped checkpoint's tensor would
                # otherwise stay a view of the file (a truncated file then faults, SIGBUS)
                tensors[name] = tensors.pop(name).to(held_dtype, copy=True)
        state = self._load_quantized(tensors, quantize_to, device)
        state.update({k: v for k, v in self.state_dict(keep_vars=True).items() if k in KEPT_TABLES})
        for name, param in self.named_parameters(remove_duplicate=False):
            if name == "lm_head.weight" and tied:
                continue
            if name in state:  # a quantized layer's bias, loaded with it
                continue
            prefix, _, suffix = name.partition(".layers.")
            layer_no, _, rest = suffix.partition(".")
            fused = FUSED_WEIGHTS.get(rest)
            keys = [f"{prefix}.layers.{layer_no}.{p}" for p in fused] if fused else [name]
            missing = [k for k in keys if k not in tensors]
            if missing:
                raise ModelFileError(f"checkpoint is missing tensor {missing[0]!r}")
            parts = [tensors.pop(k) for k in keys]
            value = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
            del parts
            if tuple(value.shape) != tuple(param.shape):
                raise ModelFileError(
                    f"tensor {keys[0]!r} has shape {tuple(value.shape)}, the config implies {tuple(param.shape)}"
                )
            state[name] = nn.Parameter(value.to(device=device, dtype=held_in.get(name, dtype)), requires_grad=False)
        if tied:  # the same Parameter object under both names keeps them tied after assign
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        self.load_state_dict(state, assign=True, strict=True)
        cfg = self.config
        self.rotary = RotaryEmbedding(cfg.rope, cfg.head_dim, cfg.max_position_embeddings, device)
        self.eval()

    def _load_quantized(self, tensors: dict, quantize_to: str | None, device: torch.device) -> dict:
        """Replace every linear layer whose weight is (or is to be) quantized by its int4 / int8
        module; returns those modules' state under their full names."""
        from ..errors import ModelFileError

        state = {}
        if quantize_to is None:
            return state
        for layer_no, layer in enumerate(self.model.layers):
            for owner, attr in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                                (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
                linear = getattr(owner, attr)
                rest = f"{'self_attn' if owner is layer.self_attn else 'mlp'}.{attr}"
                prefix = f"model.layers.{layer_no}."
                keys = [prefix + k for k in FUSED_WEIGHTS.get(f"{rest}.weight", (f"{rest}.weight",))]
                if any(k not in tensors for k in keys):
                    continue  # named as missing by the float path
                given = [tensors.pop(k) for k in keys]  # a lazy mapping reads each once, here
                weight = (_blocks_weight(given, keys[0]) if quantize_to == "gguf" else
                          _quantized_weight(given, keys[0], quantize_to))
                if tuple(weight.shape) != tuple(linear.weight.shape):
                    raise ModelFileError(f"tensor {keys[0]!r} has shape {tuple(weight.shape)}, the config implies "
                                         f"{tuple(linear.weight.shape)}")
                bias = None
                if linear.bias is not None:
                    bias_keys = [prefix + k for k in FUSED_WEIGHTS.get(f"{rest}.bias", (f"{rest}.bias",))]
                    missing = [k for k in bias_keys if k not in tensors]
                    if missing:
                        raise ModelFileError(f"checkpoint is missing tensor {missing[0]!r}")
                    bias = torch.cat([tensors.pop(k).float() for k in bias_keys])
                if quantize_to == "gguf":
                    from .ggml_linear import GGMLLinear

                    module = GGMLLinear(weight, bias)
                else:
                    try:
                        module = quantized_linear(weight, bias, device)
                    except ValueError as exc:  # the CUDA int4 kernel's tiling
                        raise InputError(f"tensor {keys[0]!r}: {exc}; use --weights bf16") from None
                setattr(owner, attr, module)
                state.update({f"{prefix}{rest}.{k}": v for k, v in module.state_dict().items()})
        return state

    def _load_tables_as_blocks(self, tensors: dict, tied: bool) -> bool:
        """``--weights gguf``: an embedding table (and LM head) that came as GGUF blocks becomes
        ggml modules, taken out of ``tensors``; float ones are left to the float path. Returns
        whether a tied table was taken (it then serves as the head too)."""
        from .ggml_linear import BlockWeight, GGMLEmbedding, GGMLLinear

        took_tied = False
        if "model.embed_tokens.weight" in tensors:
            table = tensors["model.embed_tokens.weight"]
            if isinstance(table, BlockWeight):
                del tensors["model.embed_tokens.weight"]
                blocks = table.blocks
                if tied:
                    self.lm_head = GGMLLinear(table)
                    blocks, took_tied = self.lm_head.blocks, True  # one copy serves both
                self.model.embed_tokens = GGMLEmbedding(blocks, table.ggml_type, table.in_features)
        head = tensors.get("lm_head.weight")
        if isinstance(head, BlockWeight):
            del tensors["lm_head.weight"]
            self.lm_head = GGMLLinear(head)
        return took_tied

    def has_quantized_layers(self) -> bool:
        return any(isinstance(m, (Int4Linear, Int8Linear)) for m in self.modules())

    def weight_bytes(self) -> int:
        """Bytes of every weight as held (quantized layers at their packed size); tensors that
        share memory (a tied head, an int8 layer's float32 kernel scale) count once."""
        seen = {(t.data_ptr(), t.numel() * t.element_size()) for t in (*self.parameters(), *self.buffers())}
        return sum(size for _, size in seen)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, plan: StepPlan, cache: KVCache, logits_for: str = "last",
                capture_layers: tuple[int, ...] = (), captured: dict | None = None) -> torch.Tensor:
        """Run one step (a prefill chunk or a decode token) through every layer.

        Args:
            input_ids: [B, T] int64 on the model's device (rows padded on the right).
            plan: from ``Engine.step`` (or ``cache.plan_step(input_lens)``, then rotary is made here).
            cache: the strategy holding K/V.
            logits_for: ``"last"`` -> [B, V] at each row's last real token; ``"all"`` -> [B, T, V];
                ``"none"`` -> an empty tensor (prefill chunks that are not the last).
            capture_layers / captured: hidden states [B, T, E] after these layers are stored in
                ``captured[layer]`` (the retrieval head reads them).
        Returns:
            float32 logits.
        """
        return self.run(input_ids, plan, cache, logits_for, capture_layers, captured)

    def run(self, input_ids: torch.Tensor, plan: StepPlan, cache: KVCache, logits_for: str = "last",
            capture_layers: tuple[int, ...] = (), captured: dict | None = None) -> torch.Tensor:
        """:meth:`forward` without its inference-mode wrapper: what ``torch.compile`` traces (the
        caller holds inference mode)."""
        if plan.cos is None:  # a compiled step, or a plan from cache.plan_step (a direct call): rotary made here
            cos, sin = self.rotary(plan.positions, self.dtype)
            plan = replace(plan, cos=cos, sin=sin)
        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, plan, cache)
            if i in capture_layers and captured is not None:
                captured[i] = x
        if logits_for == "none":
            return x.new_empty(0)
        if logits_for == "last" and x.shape[1] == 1:
            x = x[:, 0]  # [B, E]
        elif logits_for == "last":
            last = to_device([max(n - 1, 0) for n in plan.input_lens], x.device)
            x = x[torch.arange(x.shape[0], device=x.device), last]  # [B, E]
        elif logits_for != "all":
            raise ValueError(f"logits_for must be 'last', 'all' or 'none', got {logits_for!r}")
        return self.lm_head(self.model.norm(x)).float()


def _quantized_weight(given: list, name: str, fmt: str) -> QuantizedWeight:
    """A linear layer's weight (its fused parts' rows stacked) as int4 / int8: quantized parts as
    they are, float ones quantized now."""
    try:
        parts = [g if isinstance(g, QuantizedWeight) else quantize(g, fmt) for g in given]
        return concat_rows(parts) if len(parts) > 1 else parts[0]
    except ValueError as exc:  # a shape the format cannot hold (int4: K in groups of 32)
        raise InputError(f"tensor {name!r} cannot be {fmt}: {exc}; use --weights "
                         f"{'int8 or ' if fmt == 'int4' else ''}fp32") from None


def _blocks_weight(given: list, name: str):
    """A linear layer's weight as GGUF blocks (``--weights gguf``, ``model/ggml_linear.py``)."""
    from .ggml_linear import BlockWeight, concat_block_rows

    if not all(isinstance(g, BlockWeight) for g in given):
        raise InputError(f"--weights gguf keeps a GGUF's blocks, but {name!r} is not one; use --weights auto")
    return concat_block_rows(given, name) if len(given) > 1 else given[0]
