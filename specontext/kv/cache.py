"""KV storage behind one small interface.

Shape letters: B batch, T new tokens this step, G KV heads, S cached positions, D head dim.

A cache strategy (dense, or offloaded in ``kv/offload.py``) stores and returns; it never chooses
(the step's plan and selection are in ``kv/plan.py``). It implements these calls:

* ``reserve(input_lens)``: once per step, on the host, reserve positions for this step's tokens
  (a growing cache grows, a managed one moves layers to host memory); returns each row's start,
  from which the engine plans the step (``kv/plan.py``).
* ``begin_step(plan)``: called by the engine once the plan is complete (selection included),
  before layer 0 runs: where an offloaded cache issues its loads for the whole step.
* ``update(layer, k, v, plan)``: store the layer's new K/V and return (keys, values, mask) to
  attend over: every position in range, or, when the plan carries a global selection, only
  the chosen rows.
* ``store`` / ``past`` / ``gather``: the same in three parts, for a selection that attention
  makes inside the layer from its own queries and past keys (a per-layer policy).
"""

from __future__ import annotations

import abc

import torch

from ..errors import ContextLengthError
from .int8 import Int8ResidentLayer
from .plan import FetchPlan, StepPlan, make_plan
from .rows import store_rows


class KVCache(abc.ABC):
    """Interface shared by every cache strategy (see module docstring)."""

    num_layers: int
    batch_size: int
    capacity_tokens: int

    @abc.abstractmethod
    def reserve(self, input_lens: list[int]) -> list[int]:
        """Reserve room for this step's tokens; return each row's length before the step."""

    @abc.abstractmethod
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: StepPlan):
        """Store k, v [B, G, T, D] of ``layer``; return (keys, values, attn_mask) to attend over:
        every position in range, or the rows of the plan's global selection."""

    @abc.abstractmethod
    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: StepPlan) -> None:
        """Store k, v only (a step whose selection is chosen in the layer, from :meth:`past`)."""

    @abc.abstractmethod
    def past(self, layer: int, plan: StepPlan) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A decode step's past keys of ``layer`` and which are real, (None, None) if they are not
        on the device."""

    @abc.abstractmethod
    def gather(self, layer: int, plan: StepPlan, indices: torch.Tensor, valid: torch.Tensor | None):
        """(keys, values, mask) of the positions ``indices`` [B, G, K + 1] of ``layer``."""

    @abc.abstractmethod
    def allocated_bytes(self) -> int:
        """Bytes of all buffers this cache owns."""

    def begin_step(self, plan: StepPlan) -> FetchPlan | None:
        """The plan is final (``plan.selection`` set) and layer 0 is about to run: issue the step's
        loads; returns what offloaded layers read this step (the engine puts it in the plan)."""
        return None

    def rewind(self, length: int) -> None:
        """Forget every cached position >= ``length`` in every row (to decode again from a prompt)."""
        self.seq_lens = [length] * self.batch_size


class ResidentLayer:
    """One layer's full K and V on the compute device, [B, G, S, D] each (S: positions per row).

    Buffers are never concatenated; attention reads a narrowed view of the first ``kv_len``
    positions (a static step: the whole buffer under its mask).
    """

    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device):
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def buffers(self) -> tuple[torch.Tensor, ...]:
        """The tensors a step writes in place."""
        return self.k, self.v

    def grow(self, size: int) -> None:
        """Reallocate to ``size`` positions per row, keeping what is stored (one layer's transient)."""
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.zeros(*old.shape[:2], size, old.shape[3], dtype=old.dtype, device=old.device)
            new[:, :, :old.shape[2]] = old
            setattr(self, name, new)

    def store(self, k: torch.Tensor, v: torch.Tensor, plan: StepPlan) -> None:
        """Write the step's new k, v [B, G, T, D] at their positions."""
        store_rows(self.k, self.v, k, v, plan)

    def read(self, plan: StepPlan):
        return self.k[:, :, :plan.kv_len], self.v[:, :, :plan.kv_len], plan.attn_mask

    def host_rows(self, kv: int, length: int) -> torch.Tensor:
        """K (``kv`` 0) or V (1) of the first ``length`` positions, [B, G, length, D], as an
        offloaded layer stores them (as they are: a view)."""
        return (self.k, self.v)[kv][:, :, :length]

    def keys(self, n: int) -> torch.Tensor:
        """The first ``n`` positions' keys."""
        return self.k[:, :, :n]

    def gather(self, flat_rows: torch.Tensor, out_k: torch.Tensor, out_v: torch.Tensor) -> None:
        """Rows ``flat_rows`` ((b * G + g) * S + position) into ``out_k`` / ``out_v`` [B, G, K + 1, D]."""
        B, G, S, D = self.k.shape
        torch.index_select(self.k.view(B * G * S, D), 0, flat_rows, out=out_k.view(-1, D))
        torch.index_select(self.v.view(B * G * S, D), 0, flat_rows, out=out_v.view(-1, D))


class DenseKVCache(KVCache):
    """Every layer's full K and V on the compute device: a list of :class:`ResidentLayer`.

    Args:
        num_layers, batch_size, num_kv_heads, head_dim: shape.
        capacity_tokens: positions per row (prompt plus tokens to generate).
        dtype, device: storage.
        sliding_window: if set, a query at position p sees keys in (p - window, p].
        kv_format: ``float`` (K and V in ``dtype``), ``int8`` or ``fp8`` (8-bit rows with a scale
            per token and KV head, upcast to ``dtype`` when read: ``kv/int8.py``).
        grow_tokens: 0 preallocates ``capacity_tokens``; N > 0 starts with N positions and grows
            every device buffer to the next multiple of N as the cache fills (one layer at a
            time, so the transient is one layer's old buffer). For the memory manager, which
            moves layers to host memory as the context grows: memory then follows the length.

    Example::

        cache = DenseKVCache(cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim, 1024, torch.float32, "cpu")
        plan = cache.plan_step([prompt_len])
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int,
                 capacity_tokens: int, dtype: torch.dtype, device: torch.device | str,
                 sliding_window: int | None = None, grow_tokens: int = 0, kv_format: str = "float"):
        if kv_format not in ("float", "int8", "fp8"):
            raise ValueError(f"kv_format must be float, int8 or fp8, got {kv_format!r}")
        self.kv_format = kv_format
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.capacity_tokens = capacity_tokens
        self.device = torch.device(device)
        self.dtype = dtype
        self.sliding_window = sliding_window
        self.grow_tokens = grow_tokens
        self.device_tokens = min(grow_tokens, capacity_tokens) if grow_tokens else capacity_tokens
        self.resident_shape = (batch_size, num_kv_heads, self.device_tokens, head_dim)
        self.layers: list = [self._initial_layer(layer) for layer in range(num_layers)]
        self.seq_lens = [0] * batch_size  # cached tokens per row, host side
        # gathered rows of a sparse step, [B, G, K + 1, D]; sized on the first sparse step
        self.k_selected_device: torch.Tensor | None = None
        self.v_selected_device: torch.Tensor | None = None

    def _initial_layer(self, layer: int):
        """The storage ``layer`` starts in."""
        if self.kv_format != "float":
            return Int8ResidentLayer(self.resident_shape, self.dtype, self.device, self.kv_format)
        return ResidentLayer(self.resident_shape, self.dtype, self.device)

    def allocated_bytes(self) -> int:
        gathered = [t for t in (self.k_selected_device, self.v_selected_device) if t is not None]
        return sum(layer.nbytes() for layer in self.layers) + sum(t.numel() * t.element_size() for t in gathered)

    def reset(self) -> None:
        self.seq_lens = [0] * self.batch_size

    def reserve(self, input_lens: list[int]) -> list[int]:
        """Reserve positions for ``input_lens[b]`` new tokens of each row (growing the buffers if
        they grow); returns each row's length before the step, the step's first positions."""
        if len(input_lens) != self.batch_size:
            raise ValueError(f"input_lens has {len(input_lens)} rows, cache has {self.batch_size}")
        new_lens = [s + n for s, n in zip(self.seq_lens, input_lens)]
        if max(new_lens) > self.capacity_tokens:
            raise ContextLengthError(
                f"KV cache holds {self.capacity_tokens} tokens, step needs {max(new_lens)}"
            )
        if max(new_lens) > self.device_tokens:
            self._grow(max(new_lens))
        starts, self.seq_lens = self.seq_lens, new_lens
        return starts

    @property
    def row_pitch(self) -> int:
        """Positions per row in a resident layer's buffers (flat row numbers count in these)."""
        return self.device_tokens

    def plan_step(self, input_lens: list[int], queries_per_kv: int = 1) -> StepPlan:
        """Reserve the step's positions and plan it (positions, masks; no selection, no rotary):
        for calling the model directly. The engine plans its steps itself (``Engine.step``)."""
        return make_plan(self.reserve(input_lens), input_lens, self.device, self.sliding_window, queries_per_kv)

    def _grow(self, num_tokens: int) -> None:
        """Reallocate every resident layer to hold ``num_tokens`` (rounded up to ``grow_tokens``)."""
        size = min(-(-num_tokens // self.grow_tokens) * self.grow_tokens, self.capacity_tokens)
        for layer in self.layers:
            if hasattr(layer, "grow"):  # resident (float or 8-bit); host layers do not grow
                layer.grow(size)
        self.device_tokens = size
        self.resident_shape = (*self.resident_shape[:2], size, self.resident_shape[3])

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: StepPlan) -> None:
        """Write the step's new k, v [B, G, T, D] of ``layer`` at their positions."""
        self.layers[layer].store(k, v, plan)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: StepPlan):
        """Store k, v [B, G, T, D]; return keys/values [B, G, kv_len, D] (or, on a step with a
        global selection, its rows [B, G, K + 1, D]) and the mask."""
        self.store(layer, k, v, plan)
        sel = plan.selection
        if sel is not None:
            return self.gather(layer, plan, sel.indices, sel.valid)
        return self.layers[layer].read(plan)

    def past(self, layer: int, plan: StepPlan) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A decode step's past keys [B, G, P, D] of ``layer`` (P = kv_len - 1) and, when rows
        differ in length, which are real ([B, P] bool; else None)."""
        num_past = plan.kv_len - 1
        past_keys = self.layers[layer].keys(num_past)
        past_valid = None
        if len(set(plan.starts)) > 1:
            past_valid = torch.arange(num_past, device=past_keys.device)[None, :] < plan.positions[:, :1]
        return past_keys, past_valid

    def gather(self, layer: int, plan: StepPlan, indices: torch.Tensor, valid: torch.Tensor | None):
        """The rows ``indices`` [B, G, K + 1] (current token last) of ``layer`` as keys and values
        [B, G, K + 1, D], and the mask [B, G, 1, K + 1] from ``valid`` (None: all real)."""
        out_k, out_v = self._gathered(indices.shape)
        # Whole rows by flat row number ((b * G + g) * S + position): a row copy per index, where
        # torch.gather over an expanded [B, G, K + 1, D] index reads and checks every element
        # (measured on CPU at 8k, B = 1024: 72 us against 860 us per buffer). A global selection's
        # row numbers are the same for every layer, so the plan holds them.
        sel = plan.selection
        if plan.flat_rows is not None and sel is not None and indices is sel.indices:
            flat = plan.flat_rows
        else:  # a per-layer choice
            B, G, _ = indices.shape
            flat = (indices + torch.arange(B * G, device=indices.device).view(B, G, 1) * self.row_pitch).reshape(-1)
        self.layers[layer].gather(flat, out_k, out_v)
        mask = None if valid is None else valid[:, :, None, :]  # [B, G, 1, K + 1]
        return out_k, out_v, mask

    def step_buffers(self, plan: StepPlan) -> list[torch.Tensor]:
        """Every tensor that outlives a step of ``plan`` and that the step writes: each layer's
        buffers and, on a step with a global selection, the gathered rows' (allocated here if
        need be). A CUDA-graph capture keeps them at fixed addresses."""
        out = [t for layer in self.layers for t in layer.buffers()]
        if plan.selection is not None and plan.selection.indices is not None:
            out += self._gathered(plan.selection.indices.shape)
        return out

    def _gathered(self, index_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """The [B, G, K + 1, D] buffers every layer gathers its rows into (shared: one layer at a time)."""
        shape = (*index_shape, self.resident_shape[3])
        if self.k_selected_device is None or self.k_selected_device.shape != shape:
            self.k_selected_device = torch.empty(shape, dtype=self.dtype, device=self.device)
            self.v_selected_device = torch.empty(shape, dtype=self.dtype, device=self.device)
        return self.k_selected_device, self.v_selected_device
