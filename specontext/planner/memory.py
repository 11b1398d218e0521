"""The theoretical memory model (SPECONTEXT.md §3): bytes per named buffer and per tier.

Pure functions of shapes and settings: nothing here loads weights or touches a device, so the
planning mode runs anywhere and the model is unit-tested on CPU. Where the layers' KV goes as S
grows, and what a step then costs, is :mod:`.placement`; how host KV is held, :mod:`.host_memory`.

Symbols (one request = one batch row):

====  ==========================================================================================
L     target layers; N of them offloaded (the last N), L - N device-resident
G, D  target KV heads, head dim; H query heads, E hidden size, I MLP width, V vocabulary
Gh,Dh the retrieval head's K heads and head dim; Lf target layers it fuses
R     requests decoding together
S     cache capacity in tokens per request (prompt + new tokens), rounded up to whole blocks
K     budget: past tokens attended per KV head on a sparse step
P     slots per KV head of an offloaded layer (P >= K), rounded up to whole blocks of Nb tokens
C     prefill chunk tokens
e, w  bytes per KV element, per weight / activation element
====  ==========================================================================================

The paper's model is ``1.3 (M_O + M_D) + 4 R [(L_gpu + 1 + α) S + L_cpu B] H D`` (2-byte KV).
This one differs where the runtime differs, term by term (each :class:`Buffer` carries its
formula):

- bytes per element are parameters (``e``, ``w``), not 2;
- weights are counted from the config (or measured from loaded tensors), not scaled by 1.3;
  the overhead is the workspace terms below, which count the prefill peak too;
- the retrieval head's cache holds K only, sized by its own heads (``R Gh S Dh``), not a full
  target layer (the paper's ``+1``);
- no ``α`` (repeat_kv) buffer: attention folds each KV group's query heads into the query
  axis, so repeated K/V are never materialised;
- an offloaded layer keeps ``P + Nb`` slots per KV head (``P >= K``: the slot pool, plus the
  current token's block), and steps that attend to whole offloaded layers (prefill chunks,
  dense steps) stream them through two device staging buffers of ``S`` tokens each;
- the host tier (pinned on a discrete GPU) is counted as the bytes it pins, which is more than
  its logical size when torch's pinned allocator rounds it (:func:`pinned_block_bytes`), and
  checked against host memory;
- the prefill workspace is that of all R rows prefilled together (``Engine.prefill_rows`` runs
  every row in each chunk), including the boolean masks and the float bias SDPA makes of them,
  whose ``R (H/G) C S`` terms dominate it at long contexts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ModelConfig
from ..errors import InputError
from ..kv.slots import pool_tokens
from ..model.qmatmul import DIRECT_ROWS, TILE_BYTES
from ..model.quant import INT4_GROUP
from ..methods import GLOBAL_METHODS, SPARSE_METHODS
from .host_memory import check_host_memory, pinned_block_bytes

INDEX_BYTES = 8  # int64 slot maps
# Elements of one slice of float32 focus-window logits (retrieval/focus.py scores each batch row's
# window queries in slices of at most this many [H, t, S] logits, so the transient stays bounded).
MAX_FOCUS_LOGITS = 1 << 24
# CUDA's memory-efficient SDPA wants its float bias's strides in multiples of this many elements
# (torch >= 2.2, attention.cpp preprocess_mask): an unaligned one (S % 8 != 0) is copied, padded.
SDPA_BIAS_ALIGN = 8
# torch's flash kernel for CPU (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp) works in blocks
# of query rows by key columns, with float32 scratch per thread: query blocks of 256, 64 or 32 rows
# (by the folded query length: >= 768, >= 192, less) against at most 512 keys.
CPU_FLASH_Q_BLOCKS = ((768, 256), (192, 64), (0, 32))
CPU_FLASH_KV_BLOCK = 512


@dataclass(frozen=True)
class HeadShape:
    """What the memory model needs of a retrieval head (from its artefact, or assumed)."""

    num_parameters: int
    num_kv_heads: int  # Gh: heads of its K cache
    head_dim: int  # Dh
    num_fused_layers: int  # Lf: target hidden states it carries between steps

    @classmethod
    def eagle3_like(cls, model: ModelConfig) -> "HeadShape":
        """The head the paper distils from EAGLE-3 when no artefact is given: fc fusion of three
        target layers (3E x E), two norms, and q/k projections shaped like one target layer."""
        E, H, G, D = model.hidden_size, model.num_heads, model.num_kv_heads, model.head_dim
        return cls(num_parameters=3 * E * E + 2 * E + E * H * D + E * G * D, num_kv_heads=G, head_dim=D,
                   num_fused_layers=3)

    @classmethod
    def from_config(cls, cfg) -> "HeadShape":
        """From a :class:`~specontext.retrieval.head.RetrievalHeadConfig` (no weights read)."""
        E = cfg.target.hidden_size
        fused = len(cfg.hidden_layers) if cfg.input_kind == "embedding+hidden" else 0
        width = cfg.input_width
        n = E + (fused * E * E + E if fused else 0)  # input norm; fc and its norm
        n += width * cfg.num_heads * cfg.head_dim + width * cfg.num_kv_heads * cfg.head_dim
        if cfg.qk_bias:
            n += (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim
        return cls(num_parameters=n, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, num_fused_layers=fused)


@dataclass(frozen=True)
class MemoryInputs:
    """Everything the model depends on besides S and N.

    Args:
        model: the target's shape.
        weight_bytes: bytes per weight and activation element (4 float32, 2 float16/bfloat16).
        kv_bytes: bytes per element of float KV and of the rows a sparse step gathers (the
            compute dtype's; 8-bit KV is ``kv_format``).
        requests: R.
        sparsity: dense, specontext, oracle, quest or streaming.
        budget_tokens: K (ignored when dense).
        head: the retrieval head (specontext only); None assumes :meth:`HeadShape.eagle3_like`.
        slot_pool: P / K, at least 1.
        block_tokens: Nb, the selection granularity (1 = tokens).
        prefill_chunk_tokens: C.
        fused_attention: CUDA's SDPA kernels (memory-efficient or cuDNN): no score matrix, but the
            float bias made from the prefill mask is copied once more, padded to whole groups of
            SDPA_BIAS_ALIGN keys. False: the CPU, where prefill runs torch's flash kernel for CPU
            (torch >= 2.3 takes masks there; no score matrix, no padding), while the decode
            workspace still counts the math kernel's ``H S`` float32 scores per request, a bound.
        measured_weight_bytes: the loaded tensors' bytes, used instead of the config count.
        grow_tokens: 0 when resident KV is preallocated for S; g > 0 when it grows in steps of g
            (the memory manager's runtime): resident layers then hold S rounded up to g, and
            one buffer's old copy is alive while it grows.
        pin_tokens: prompt positions pinned per KV head (specontext with query-focused pinning).
        focus_window_tokens: W, the prompt's last W queries whose attention prefill measures
            (pinned specontext and snapkv; 0 = none).
        cpu_threads: threads of torch's CPU kernels (without ``fused_attention``: the flash
            kernel's scratch is per thread).
        host_memory: how the offloaded KV is held on the host (HOST_MEMORY_KINDS): ``pageable``
            without a GPU; on a discrete GPU what OffloadedKVCache uses (CUDA_HOST_MEMORY). The
            host tier counts the bytes this really takes (:func:`pinned_block_bytes`).
        weight_format: ``float`` (``weight_bytes`` per weight), ``int8`` or ``int4``: the linear
            layers' weights as the runtime holds them (:func:`linear_weight_bytes`); embeddings
            and the LM head at ``head_bytes``, norms at ``weight_bytes``.
        kv_format: ``float`` (``kv_bytes`` per element), ``int8`` or ``fp8`` (``--kv-dtype``: one
            byte per element plus a float32 scale per token and KV head, so ``1 + 4 / D`` bytes an
            element; the rows a sparse step gathers are upcast to ``kv_bytes``). Offloaded layers
            hold it 8-bit in host memory, slots and staging, a row's values and scale packed.
        quant_scale_bytes: bytes of an int4 scale or zero (and of int8's kernel copy of its row
            scales): 2 where the kernels run in bfloat16 (CUDA; int8 on CPUs with native bf16 or
            AVX2), else 4 (int4 on a CPU's native products, ``plan.quantized_bytes``).
        head_bytes: bytes per element of the embeddings and LM head (None: ``weight_bytes``); 2
            where quantized layers run beside a bfloat16 head (``model/bf16.py``; a GGUF's Q8_0
            head held in int8 groups, 1.125, is counted so too).
        embedding_format: ``float`` (at ``head_bytes``) or ``int8`` (``--embeddings int8``: the
            table in int8 with a float32 scale per row; the LM head keeps a float table).
    """

    model: ModelConfig
    weight_bytes: int = 2
    kv_bytes: int = 2
    requests: int = 1
    sparsity: str = "specontext"
    budget_tokens: int = 2048
    head: HeadShape | None = None
    slot_pool: float = 1.0
    block_tokens: int = 1
    prefill_chunk_tokens: int = 512
    fused_attention: bool = True
    measured_weight_bytes: int | None = None
    grow_tokens: int = 0
    pin_tokens: int = 0
    focus_window_tokens: int = 0
    cpu_threads: int = 1
    host_memory: str = "pageable"
    weight_format: str = "float"
    kv_format: str = "float"
    quant_scale_bytes: int = 2
    head_bytes: int | None = None
    embedding_format: str = "float"

    def __post_init__(self) -> None:
        for name in ("weight_bytes", "kv_bytes", "requests", "budget_tokens", "block_tokens", "prefill_chunk_tokens",
                     "cpu_threads"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sparsity not in ("dense", *SPARSE_METHODS):
            raise InputError(f"sparsity must be dense, {', '.join(SPARSE_METHODS)}; got {self.sparsity!r}")
        if not (math.isfinite(self.slot_pool) and self.slot_pool >= 1):
            raise InputError(f"slot_pool must be >= 1, got {self.slot_pool}")
        check_host_memory(self.host_memory)
        if self.kv_format not in KV_FORMATS:
            raise InputError(f"kv_format must be one of {', '.join(KV_FORMATS)}, got {self.kv_format!r}")
        if self.embedding_format not in ("float", "int8"):
            raise InputError(f"embedding_format must be float or int8, got {self.embedding_format!r}")
        if self.weight_format not in WEIGHT_FORMATS:
            raise InputError(f"weight_format must be one of {', '.join(WEIGHT_FORMATS)}, got {self.weight_format!r}")

    @property
    def head_shape(self) -> HeadShape | None:
        if self.sparsity != "specontext":
            return None
        return self.head or HeadShape.eagle3_like(self.model)

    def budget(self, seq_tokens: int) -> int:
        """K actually attended: the budget, never more than the context."""
        return min(self.budget_tokens, seq_tokens)

    def pool_tokens(self, seq_tokens: int, slot_pool: float | None = None) -> int:
        """P, as the runtime sizes it: ceil(slot_pool * K), at most S, in whole blocks."""
        if self.sparsity not in GLOBAL_METHODS:
            return 0
        return pool_tokens(self.slot_pool if slot_pool is None else slot_pool, self.budget_tokens, seq_tokens,
                           self.block_tokens)


@dataclass(frozen=True)
class Buffer:
    """One named allocation: its tier (``device`` or ``host``), size and the formula it comes from."""

    name: str
    tier: str
    num_bytes: int
    formula: str


WEIGHT_FORMATS = ("float", "int8", "int4")
KV_FORMATS = ("float", "int8", "fp8")


def linear_weight_bytes(rows: int, cols: int, weight_format: str, float_bytes: int, scale_bytes: int = 2) -> int:
    """Bytes of a [rows, cols] linear weight as the runtime holds it: int4 packs two values a
    byte plus a scale and a zero per group of 32, in the kernel's dtype (``scale_bytes``: 2 for
    bfloat16, so 0.625 bytes a weight, CUDA; 4 for float32, 0.75, a CPU); int8 one byte a value plus a float32 scale
    per row, and a copy of it in the kernel's dtype where that is not float32; float
    ``float_bytes`` a value."""
    if weight_format == "int4":
        return rows * cols // 2 + 2 * scale_bytes * rows * -(-cols // INT4_GROUP)
    if weight_format == "int8":
        return rows * cols + 4 * rows + (scale_bytes * rows if scale_bytes != 4 else 0)
    return rows * cols * float_bytes


def kv_row_bytes(inputs: MemoryInputs, offloaded: bool = False) -> int:
    """Stored bytes of one token's K (or V) row per KV head: ``D e`` for float KV; 8-bit KV takes
    ``D + 4`` resident (the values and their float32 scale, in two buffers) and ``ceil4(D) + 4``
    offloaded (packed in one row of host memory, slots and staging: ``kv/int8.py``)."""
    D = inputs.model.head_dim
    if inputs.kv_format == "float":
        return D * inputs.kv_bytes
    return (-(-D // 4) * 4 if offloaded else D) + 4


def model_weight_bytes(model: ModelConfig, bytes_per_element: int, weight_format: str = "float",
                       scale_bytes: int = 2, head_bytes: int | None = None, embedding_format: str = "float") -> int:
    """The target's weights counted from its config: linear layers as ``weight_format`` holds
    them (quantization scales at ``scale_bytes``), the embeddings and LM head at ``head_bytes``
    an element (None: the element size), everything else (norms, biases) at the element size.
    ``embedding_format`` ``int8``: the table is one byte a value and a float32 scale a row, and
    the LM head keeps its own table even when tied (``model/int8_embedding.py``)."""
    E, I, V, L = model.hidden_size, model.intermediate_size, model.vocab_size, model.num_layers
    H, G, D = model.num_heads, model.num_kv_heads, model.head_dim
    linear = sum(linear_weight_bytes(rows, cols, weight_format, bytes_per_element, scale_bytes)
                 for rows, cols in (((H + 2 * G) * D, E), (E, H * D), (2 * I, E), (E, I)))  # qkv, o, gate/up, down
    per_layer = 2 * E  # 2 norms
    if model.qkv_bias:
        per_layer += (H + 2 * G) * D
    if model.o_bias:
        per_layer += E
    if model.mlp_bias:
        per_layer += 2 * I + E
    if model.qk_norm:
        per_layer += 2 * D
    table = bytes_per_element if head_bytes is None else head_bytes  # a float table's bytes an element
    if embedding_format == "int8":
        embeddings = V * (E + 4) + V * E * table  # the int8 table, and the head's
    else:
        embeddings = V * E * (1 if model.tie_word_embeddings else 2) * table
    return L * linear + (L * per_layer + E) * bytes_per_element + embeddings


def buffers(inputs: MemoryInputs, seq_tokens: int, num_offloaded: int, slot_pool: float | None = None) -> list[Buffer]:
    """Every buffer of one run at capacity ``seq_tokens`` (S) with the last ``num_offloaded`` (N) layers offloaded.

    The KV and slot terms are exactly the runtime's allocations (DenseKVCache,
    OffloadedKVCache, SlotPool, the specontext selector); the workspace terms are estimates of
    the transient activations at their peak.
    """
    m, x = inputs.model, inputs
    L, G, D, H, E, I, V = (m.num_layers, m.num_kv_heads, m.head_dim, m.num_heads, m.hidden_size,
                           m.intermediate_size, m.vocab_size)
    R, e, w, Nb, N = x.requests, x.kv_bytes, x.weight_bytes, x.block_tokens, num_offloaded
    row, packed = kv_row_bytes(x), kv_row_bytes(x, offloaded=True)  # a K (or V) row: resident, offloaded
    if not 0 <= N <= L:
        raise InputError(f"num_offloaded must be in 0..{L}, got {N}")
    S = -(-seq_tokens // Nb) * Nb if N else seq_tokens
    K = x.budget(seq_tokens)
    out = []

    def add(name, tier, num_bytes, formula):
        out.append(Buffer(name, tier, int(num_bytes), formula))

    weights = x.measured_weight_bytes if x.measured_weight_bytes is not None else \
        model_weight_bytes(m, w, x.weight_format, x.quant_scale_bytes, x.head_bytes, x.embedding_format)
    int8_table = x.embedding_format == "int8"
    parts = [] if x.weight_format == "float" else [f"linear layers {x.weight_format}"]
    if x.head_bytes == 2:
        parts.append("LM head bf16" if int8_table else "embeddings and LM head bf16")
    if int8_table:
        parts.append("embeddings int8 (+ a float32 scale a row; the LM head keeps its own table)")
    add("weights", "device", weights, "measured" if x.measured_weight_bytes is not None else
        ", ".join(parts + ["the rest * w"]) if parts else "params(config) * w")
    head = x.head_shape
    if head is not None:
        add("head_weights", "device", head.num_parameters * w, "params(head) * w")
        add("head_k_cache", "device", R * head.num_kv_heads * seq_tokens * head.head_dim * w + R * head.num_fused_layers * E * w,
            "R Gh S Dh w + R Lf E w")
    if x.grow_tokens and N < L:
        held = -(-seq_tokens // x.grow_tokens) * x.grow_tokens
        add("kv_device", "device", 2 * R * (L - N) * G * held * row, "2 R (L - N) G ceil(S / g) g D e")
        add("kv_growth", "device", R * G * held * row, "R G ceil(S / g) g D e (one old buffer while growing)")
    else:
        add("kv_device", "device", 2 * R * (L - N) * G * seq_tokens * row,
            "2 R (L - N) G S D e" if x.kv_format == "float"
            else f"2 R (L - N) G S (D + 4) ({x.kv_format} rows, float32 scales)")
    # gathered rows: sparse steps, and offloaded decode steps whose whole past fits in the slots
    if x.sparsity in SPARSE_METHODS and (K < seq_tokens or (N and x.sparsity in GLOBAL_METHODS)):
        add("kv_selected", "device", 2 * R * G * (K + 1) * D * e, "2 R G (K + 1) D e")
    if N:
        pw = "D e" if x.kv_format == "float" else "(ceil4(D) + 4)"  # a stored row's bytes
        P = x.pool_tokens(seq_tokens, slot_pool)
        if P:
            add("kv_slots", "device", N * 2 * R * G * (P + Nb) * packed, f"N 2 R G (P + Nb) {pw}")
            rows = R * G
            add("slot_maps", "device", rows * (S // Nb + 1 + 2 * (P // Nb + 1)) * INDEX_BYTES,
                "R G (S/Nb + 1 + 2 (P/Nb + 1)) 8")
        add("kv_staging", "device", 2 * 2 * R * G * S * packed, f"2 buffers 2 R G S {pw}")
        host = f"N 2 R G S {pw}"
        host_formula = {"pageable": host, "registered": f"pages({host}) (registered)",
                        "pin_memory": f"2^ceil(log2({host})) (one pinned block)"}[x.host_memory]
        add("kv_host", "host", pinned_block_bytes(N * 2 * R * G * S * packed, x.host_memory), host_formula)
    # query-focused pinning: the pinned positions (specontext), each layer's (snapkv)
    focused = x.focus_window_tokens > 0 and (x.sparsity == "snapkv" or (x.sparsity == "specontext" and x.pin_tokens))
    if focused and x.sparsity == "specontext":
        add("pin_mask", "device", R * G * seq_tokens, "R G S (bool)")
    if focused and x.sparsity == "snapkv":
        add("pin_masks", "device", L * R * G * seq_tokens, "L R G S (bool)")
    # transient activations, at the larger of the two phases
    prefill, prefill_formula = prefill_workspace(x, seq_tokens)
    if focused:  # the focus sums (per layer for snapkv) and one slice of window logits and probabilities
        window = min(x.focus_window_tokens, seq_tokens)
        prefill += R * G * seq_tokens * 4 * (1 + (L if x.sparsity == "snapkv" else 0))
        prefill += 2 * min(H * window * seq_tokens, MAX_FOCUS_LOGITS) * 4
        prefill_formula += (" + R G S 4" + (" (L + 1)" if x.sparsity == "snapkv" else "")
                            + " + 2 min(H W S, 2^24) 4 (focus)")
    attended = K + 1 if x.sparsity in SPARSE_METHODS else seq_tokens
    decode = R * ((3 * E + 2 * (H + 2 * G) * D + 3 * I) * w + (0 if x.fused_attention else 2 * H * attended * 4)
                  + 2 * V * 4)
    # 8-bit KV: a dense step upcasts what it attends over; a per-layer method reads every past K to
    # choose (kv/cache.py: past); a global method gathers into kv_selected, counted above
    upcast_at = 0 if x.sparsity in GLOBAL_METHODS else seq_tokens
    decode += upcast_bytes(x, upcast_at)
    if prefill >= decode:
        add("workspace_prefill", "device", prefill, prefill_formula)
    else:
        add("workspace_decode", "device", decode, "R ((3E + 2(H + 2G)D + 3I) w + 2 V 4)"
            + (upcast_formula(x, "S") if upcast_at else ""))
    return out


def prefill_workspace(inputs: MemoryInputs, seq_tokens: int) -> tuple[int, str]:
    """Peak transient bytes of one prefill chunk at capacity ``seq_tokens`` (S), and the formula.

    ``Engine.prefill_rows`` runs all R rows in every chunk of C tokens, so each term is for the
    R rows together. The peak is inside a layer's attention in the last chunk (S keys). Alive
    then (model/llama.py, kv/cache.py), in bytes:

    - the step's boolean mask ``[R, 1, C, S]`` (``kv.plan.make_plan``) and, when H > G, its
      copy for the H/G query heads folded per KV head, ``[R, 1, (H/G) C, S]``
      (``StepPlan.attn_mask_grouped``, made once per step): ``R C S (1 + H/G)``;
    - the float bias SDPA makes of the mask it is given (``where(mask, 0, -inf)`` in the query's
      dtype): ``R (H/G) C S w``; on CUDA (``fused_attention``) also its copy padded to whole
      groups of SDPA_BIAS_ALIGN keys, which exists whenever S is not a multiple of them;
    - activations per token, in w: the residual stream before and after the layer and a normed
      copy (3E), the rotary tables (2D), and the larger of attention's (qkv, rotated q and k,
      the rotation's temporaries, the output: at most (H + 2G)D + 5HD) and the MLP's (gate and
      up, the activation and the product: 4I); with a retrieval head, the hidden states it
      captures (Lf E);
    - the last chunk's logits ``[R, V]`` in w, then in float32 twice (the model's output and the
      engine's concatenation of the rows);
    - on the CPU (float32 only: the runtime refuses 2-byte types there), the flash kernel's
      scratch: per thread a block of scores, its row statistics and its outputs;
    - with 8-bit KV, the layer's K and V upcast for attention (``kv/int8.py``): ``2 R G S D w``.

    :func:`buffers` adds query-focused pinning's focus terms. A bound, not a measurement:
    tests/test_planner.py checks it against the peak of what a CPU prefill really allocates.
    """
    m, x = inputs.model, inputs
    E, I, V, H, G, D = m.hidden_size, m.intermediate_size, m.vocab_size, m.num_heads, m.num_kv_heads, m.head_dim
    R, w, S = x.requests, x.weight_bytes, seq_tokens
    C = min(x.prefill_chunk_tokens, S)
    group = H // G  # query heads per KV head
    head = x.head_shape
    fused_layers = head.num_fused_layers if head is not None else 0
    per_token = 3 * E + 2 * D + fused_layers * E + max((H + 2 * G) * D + 5 * H * D, 4 * I)
    activations = R * C * per_token * w
    masks = R * C * S * (1 + (group if group > 1 else 0))
    bias = R * group * C * S * w
    padded = R * group * C * (-(-S // SDPA_BIAS_ALIGN) * SDPA_BIAS_ALIGN) * w if x.fused_attention else 0
    logits = R * V * (w + 8)
    scratch = 0
    if not x.fused_attention:
        rows = group * C
        q_block = min(next(b for lo, b in CPU_FLASH_Q_BLOCKS if rows >= lo), rows)
        kv_block = min(CPU_FLASH_KV_BLOCK, S)
        scratch = x.cpu_threads * (q_block * kv_block + q_block * (D + 2)) * 4
    formula = ("R C (3E + 2D" + (" + Lf E" if fused_layers else "") + " + max((H + 2G)D + 5HD, 4I)) w"
               + (" + R C S (1 + H/G) (bool masks)" if group > 1 else " + R C S (bool mask)")
               + " + R (H/G) C S w (SDPA bias)"
               + (f" + R (H/G) C ceil{SDPA_BIAS_ALIGN}(S) w (its padded copy)" if x.fused_attention else "")
               + " + R V (w + 8) (logits)"
               + ("" if x.fused_attention else " + threads (q_blk kv_blk + q_blk (D + 2)) 4 (CPU flash scratch)"))
    tile = 0
    if x.weight_format == "int4" and not x.fused_attention and R * C > DIRECT_ROWS:
        # int4 on a CPU: a chunk's products dequantize each layer a tile of rows at a time (model/qmatmul.py)
        for n, k in (((H + 2 * G) * D, E), (E, H * D), (2 * I, E), (E, I)):
            rows = min(max(1, TILE_BYTES // (4 * k)), n)
            tile = max(tile, rows * k * 4 + (R * C * rows * 4 if rows < n else 0))
        formula += " + an int4 layer's float32 tile (at most 16 MiB) and its product"
    upcast = upcast_bytes(x, S)
    formula += upcast_formula(x, "S")
    return activations + masks + bias + padded + logits + scratch + tile + upcast, formula


def upcast_bytes(inputs: MemoryInputs, attended_tokens: int) -> int:
    """Transient bytes of reading one layer's 8-bit K and V over ``attended_tokens`` positions
    (``kv/int8.py``, ``upcast``): both in the compute dtype, ``2 R G S D w``; 0 for float KV."""
    m, x = inputs.model, inputs
    if x.kv_format == "float":
        return 0
    return 2 * x.requests * m.num_kv_heads * attended_tokens * m.head_dim * x.kv_bytes


def upcast_formula(inputs: MemoryInputs, tokens: str) -> str:
    """:func:`upcast_bytes`' formula, ``tokens`` its positions' letter ('' for float KV)."""
    if inputs.kv_format == "float":
        return ""
    return f" + 2 R G {tokens} D w (8-bit KV upcast of {tokens} positions)"


def tier_bytes(bufs: list[Buffer], tier: str, include_workspace: bool = True) -> int:
    """Bytes of ``bufs`` in ``tier`` (``device`` or ``host``), with or without the workspace terms."""
    return sum(b.num_bytes for b in bufs if b.tier == tier and (include_workspace or not b.name.startswith("workspace")))
