"""What one forward step does, decided before layer 0 runs: the step plan and the selection.

Shape letters: B batch, T new tokens this step, G KV heads, H query heads, K budget (past tokens
attended per KV head), P past positions, D head dim.

The step's plan is made on the host, once per step; every layer reads it. What a decode step
attends to comes in as a :class:`Selection`: either one index set for every layer (a global
selection, which the retrieval head makes before the model runs), or a per-layer policy that
attention calls with that layer's queries and past keys (the oracle, Quest, SnapKV). The cache
gathers whatever was chosen; it never chooses.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Callable, Protocol, Sequence

import torch


class LayerPolicy(Protocol):
    """Chooses inside one layer: ``(layer, queries [B, H, 1, D], past_keys [B, G, P, D], past_valid
    [B, P] bool or None) -> (indices [B, G, K + 1], valid [B, G, K + 1] or None)``, the current
    token's position last. ``past_keys`` is None for a layer whose keys are not on the device
    (offloaded); only a policy that ignores the keys (a global selection seen per layer) runs there."""

    def __call__(self, layer: int, queries: torch.Tensor, past_keys: torch.Tensor | None,
                 past_valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]: ...


@dataclass(frozen=True)
class Selection:
    """One decode step's choice, carried in ``StepPlan.selection``.

    Attributes:
        indices: [B, G, K + 1] int64 positions to attend, the current token's last, shared by
            every layer; None when ``policy`` chooses per layer.
        valid: [B, G, K + 1] bool where rows hold fewer than K real choices (padding is False);
            None when every entry is real.
        policy: called by attention in each layer (see :class:`LayerPolicy`), or None. A global
            selection has one too when something must see each layer's choice (recall measurement).
        fallback_rows: batch rows that attend to every past position this step (the head was not
            confident for them while it was for others); their ``indices`` cover the whole past.
    """

    indices: torch.Tensor | None
    valid: torch.Tensor | None = None
    policy: LayerPolicy | Callable | None = None
    fallback_rows: tuple[int, ...] = ()


def append_current(indices: torch.Tensor, valid: torch.Tensor | None, positions: torch.Tensor):
    """indices [B, G, K] -> [B, G, K + 1] with each row's current position last (always valid)."""
    B, G, _ = indices.shape
    cur = positions[:, :1, None].expand(B, G, 1).to(indices.dtype)
    full = torch.cat([indices, cur], dim=-1)
    if valid is not None:
        valid = torch.cat([valid, valid.new_ones(B, G, 1)], dim=-1)
    return full, valid


@dataclass(frozen=True)
class FetchPlan:
    """What offloaded layers read this step, decided once for all of them before layer 0.

    Attributes:
        kind: ``"slots"`` (the step's selection, from each layer's device slots, loaded
            elastically) or ``"staged"`` (whole layers streamed through two staging buffers).
        gather_rows: slots mode, the [B * G * (K + 1)] flat rows into a layer's [B, G, P + N, D]
            slots to attend (the current token's slot last).
        gather_shape: slots mode, (B, G, K + 1, D).
        gather_valid: slots mode, the mask [B, G, 1, K + 1] or None when every entry is real.
    """

    kind: str
    gather_rows: torch.Tensor | None = None
    gather_shape: tuple[int, ...] = ()
    gather_valid: torch.Tensor | None = None


@dataclass(frozen=True)
class StepPlan:
    """One forward step, planned on the host before layer 0 and only read after that.

    Attributes:
        positions: [B, T] int64 on the compute device; absolute position of each new token.
        input_lens: real (non-padding) new tokens per row (host).
        starts: each row's cached length before the step, i.e. its first new position (host).
        write_start: the common start position when every row writes all T tokens at the same
            offset (the fast path: one slice assignment); None otherwise.
        kv_len: number of cache positions the step attends over (max over rows).
        attn_mask: [B, 1, T, kv_len] bool (True = attend) or None when every query may see every
            key in range (decode of equal-length rows without a sliding window).
        attn_mask_grouped: ``attn_mask`` repeated to [B, 1, R*T, kv_len] for the R query heads
            folded per KV head (made once per step, not per layer); None when not needed.
        valid_index: ([N] batch index, [N] position) of the real tokens when rows differ.
        cos, sin: [B, T, D] rotary tables.
        selection: a :class:`Selection` for sparse decode steps, else None.
        flat_rows: a global selection's rows as flat row numbers ((b * G + g) * S + position)
            into a resident layer's [B, G, S, D] buffers, [B * G * (K + 1)]; the same for every
            layer, so made once per step.
        focus: an attention observer, else None: every attention layer reports
            ``observe(layer, queries, keys, mask)`` to it. A ``retrieval.focus.QueryFocus`` on
            prefill chunks holding a row's focus window; the distillation's teacher probe.
        fetch: what offloaded layers read this step (:class:`FetchPlan`), None without any.
        static: a decode step whose shapes do not change from step to step, for a compiled or
            captured step: new tokens are written at ``positions`` (a tensor, not ``write_start``)
            and a dense step attends over the whole buffer (``kv_len`` is its length) under
            ``attn_mask``.
    """

    positions: torch.Tensor
    input_lens: tuple[int, ...]
    starts: tuple[int, ...]
    write_start: int | None
    kv_len: int
    attn_mask: torch.Tensor | None
    attn_mask_grouped: torch.Tensor | None = None
    valid_index: tuple[torch.Tensor, torch.Tensor] | None = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    selection: Selection | None = None
    flat_rows: torch.Tensor | None = None
    focus: object | None = None
    fetch: FetchPlan | None = None
    static: bool = False

    def with_selection(self, selection: Selection | None, row_pitch: int) -> StepPlan:
        """This plan with ``selection``, its flat rows made for buffers of ``row_pitch`` positions per row."""
        if selection is None or selection.indices is None:
            return replace(self, selection=selection)
        B, G, _ = selection.indices.shape
        base = row_bases(B, G, row_pitch, selection.indices.device)
        return replace(self, selection=selection, flat_rows=(selection.indices + base).reshape(-1))


@functools.lru_cache(maxsize=32)
def arange(n: int, device: torch.device) -> torch.Tensor:
    """``torch.arange(n)`` on ``device``, made once and shared: callers only read it."""
    return torch.arange(n, device=device)


@functools.lru_cache(maxsize=32)
def row_bases(batch: int, heads: int, row_pitch: int, device: torch.device) -> torch.Tensor:
    """[B, G, 1] first flat row of each (row, KV head) in buffers of ``row_pitch`` positions per
    row, made once and shared: callers only read it."""
    return torch.arange(batch * heads, device=device).view(batch, heads, 1) * row_pitch


def to_device(values, device: torch.device) -> torch.Tensor:
    """Host ints as an int64 tensor on ``device``; on CUDA through pinned memory, asynchronously, so
    the host never waits for the device (a copy from pageable memory would)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.int64, device=device)
    return torch.tensor(values, dtype=torch.int64).pin_memory().to(device, non_blocking=True)


def make_plan(starts: Sequence[int], input_lens: Sequence[int], device: torch.device,
              sliding_window: int | None = None, queries_per_kv: int = 1, static_tokens: int = 0) -> StepPlan:
    """The positions, masks and write layout of a step whose rows hold ``starts`` tokens and add
    ``input_lens``, from host values alone (nothing is read back from the device).

    ``static_tokens`` > 0 plans a one-token decode step over buffers of that many positions with
    fixed shapes (see ``StepPlan.static``)."""
    starts, input_lens = tuple(int(s) for s in starts), tuple(int(n) for n in input_lens)
    if static_tokens:
        return _static_plan(starts, input_lens, device, sliding_window, static_tokens)
    num_new = max(input_lens)
    new_lens = [s + n for s, n in zip(starts, input_lens)]
    uniform = len(set(starts)) == 1 and all(n == num_new for n in input_lens)
    arange = torch.arange(num_new, device=device)
    if uniform:
        positions = (arange + starts[0])[None, :].expand(len(starts), num_new)  # [B, T]
    else:
        positions = to_device(starts, device)[:, None] + arange[None, :]
    kv_len = max(new_lens)
    attn_mask = grouped = None
    if not (uniform and num_new == 1 and sliding_window is None):
        key_pos = torch.arange(kv_len, device=device)
        mask = key_pos[None, None, :] <= positions[:, :, None]  # causal
        if not uniform:  # rows shorter than kv_len
            mask &= key_pos[None, None, :] < to_device(new_lens, device)[:, None, None]
        if sliding_window is not None:
            mask &= key_pos[None, None, :] > positions[:, :, None] - sliding_window
        attn_mask = mask[:, None]
        if queries_per_kv > 1 and num_new > 1:
            grouped = attn_mask.repeat(1, 1, queries_per_kv, 1)
    valid_index = None
    if not uniform:  # the real tokens, listed on the host
        rows = [b for b, n in enumerate(input_lens) for _ in range(n)]
        where = [starts[b] + t for b, n in enumerate(input_lens) for t in range(n)]
        valid_index = (to_device(rows, device), to_device(where, device))
    return StepPlan(positions=positions, input_lens=input_lens, starts=starts,
                    write_start=starts[0] if uniform else None, kv_len=kv_len, attn_mask=attn_mask,
                    attn_mask_grouped=grouped, valid_index=valid_index)


def _static_plan(starts: tuple[int, ...], input_lens: tuple[int, ...], device: torch.device,
                 sliding_window: int | None, num_tokens: int) -> StepPlan:
    """A one-token decode step with the same shapes every step: positions come from the host as a
    tensor, and the mask [B, 1, 1, S] covers the whole buffer."""
    if max(input_lens) != 1:
        raise ValueError("a static plan is for decode steps of one token per row")
    positions = to_device(starts, device)[:, None]  # [B, 1]
    key_pos = arange(num_tokens, device)
    mask = key_pos[None, :] <= positions  # [B, S]
    if sliding_window is not None:
        mask &= key_pos[None, :] > positions - sliding_window
    return StepPlan(positions=positions, input_lens=input_lens, starts=starts, write_start=None, kv_len=num_tokens,
                    attn_mask=mask[:, None, None, :], static=True)
