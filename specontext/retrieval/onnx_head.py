"""The retrieval head on ONNX Runtime: export, loading with checks, and a per-step runner.

Shape letters: B batch, T new tokens, E target hidden size, L fused layers, H head query heads,
Gh head key heads, G target KV heads, Dh head dim, S cached positions (the K cache's capacity).

One graph does a step of the head's work (opset :data:`OPSET`, dynamic B, T and S):

    inputs   embeds [B, T, E] float32      the target's token embeddings of the new tokens
             hidden [B, T, L*E] float32    the fused layers' outputs at p - 1 (absent for
                                           embedding-only heads)
             positions [B, T] int64        absolute positions of the new tokens
             keys [B, Gh, S, Dh] float32   the head's K cache
             valid [B, S] bool             which cached positions may be scored
    outputs  new_keys [B, Gh, T, Dh]       roped keys of the new tokens (the caller stores them)
             queries [B, H, T, Dh]         roped queries of the new tokens
             scores [B, G, S] float32      for the LAST new token: per query head softmax over the
                                           valid positions, max over the heads of each KV group

Decode calls it with T = 1 and the whole K cache (S = its capacity, ``valid`` marking the past),
so the cache can stay bound on the device between steps; prefill calls it per chunk for the keys.
The file's metadata records the head's full config (its target model, with the weight
fingerprint) and the opset, so a file made for another model or opset is refused on load.

Example::

    path = export_onnx(head, "head.onnx")                  # from a loaded RetrievalHead
    runner = OnnxHeadRunner.load(path, llm.target)          # checks model and opset
    new_keys, queries, scores = runner(embeds, hidden, positions, keys, valid)
"""

from __future__ import annotations

import json
import os
import warnings

import torch
from torch import nn

from ..errors import InputError, ModelFileError
from .head import RetrievalHead, RetrievalHeadConfig, TargetInfo

OPSET = 18
FORMAT = "specontext-retrieval-head-step/1"
INSTALL_HINT = ("onnxruntime is not installed; pip install 'specontext[onnx]' (CPU) or "
                "'specontext[onnx-gpu]' (CUDA)")


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise InputError(INSTALL_HINT if module == "onnxruntime" else
                         f"{module} is not installed; pip install 'specontext[onnx]'") from None


class _HeadStep(nn.Module):
    """The traced step (see the module docstring)."""

    def __init__(self, head: RetrievalHead):
        super().__init__()
        self.head = head

    def forward(self, embeds, hidden, positions, keys, valid):
        x = self.head.inputs(embeds, hidden if self.head.config.input_kind == "embedding+hidden" else None)
        q, k = self.head.project(x, positions)  # [B, H, T, Dh], [B, Gh, T, Dh]
        scores = self.head.group_probs(q[:, :, -1:], keys, valid[:, None, :])[:, :, 0]  # [B, G, S]
        return k, q, scores


def export_onnx(head: RetrievalHead, path: str) -> str:
    """Write ``head`` as an ONNX step graph (float32) with its config in the metadata; returns ``path``.

    Raises InputError when onnx is missing or ``path`` cannot be written.
    """
    onnx = _require("onnx")
    cfg = head.config
    E = cfg.target.hidden_size
    step = _HeadStep(RetrievalHead(cfg).float().eval())
    step.head.load_state_dict(head.state_dict())
    B, T, S = 1, 2, 5
    example = (torch.randn(B, T, E), torch.randn(B, T, max(len(cfg.hidden_layers), 1) * E),
               torch.arange(T)[None].to(torch.int64) + 3, torch.randn(B, cfg.num_kv_heads, S, cfg.head_dim),
               torch.ones(B, S, dtype=torch.bool))
    dims = {"embeds": {0: "batch", 1: "tokens"}, "hidden": {0: "batch", 1: "tokens"},
            "positions": {0: "batch", 1: "tokens"}, "keys": {0: "batch", 2: "cached"}, "valid": {0: "batch", 1: "cached"},
            "new_keys": {0: "batch", 2: "tokens"}, "queries": {0: "batch", 2: "tokens"}, "scores": {0: "batch", 2: "cached"}}
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InputError(f"cannot write {path}: the directory {parent} does not exist")
    tmp = path + ".partial"
    # The TorchScript exporter: the graph is plain tensor code with dynamic shapes, and it needs
    # only the onnx package (the torch.export-based one also needs onnxscript).
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(step, example, tmp, input_names=["embeds", "hidden", "positions", "keys", "valid"],
                          output_names=["new_keys", "queries", "scores"], dynamic_axes=dims, opset_version=OPSET,
                          dynamo=False)
    model = onnx.load(tmp)
    for key, value in (("specontext.format", FORMAT), ("specontext.opset", str(OPSET)),
                       ("specontext.head_config", json.dumps(cfg.to_dict(), sort_keys=True))):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, tmp)
    os.replace(tmp, path)
    return path


def cached_export(head: RetrievalHead) -> str:
    """The ONNX export of ``head`` in the user's cache (made on first use), keyed by its weights."""
    import hashlib

    from .head import user_head_dir

    digest = hashlib.sha256()
    for name, t in sorted(head.state_dict().items()):
        digest.update(name.encode())
        digest.update(t.detach().float().cpu().numpy().tobytes())
    stem = os.path.splitext(os.path.basename(head.path or "head"))[0]
    folder = os.path.join(os.path.dirname(user_head_dir()), "onnx")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{stem}-{digest.hexdigest()[:12]}-opset{OPSET}.onnx")
    if not os.path.exists(path):
        export_onnx(head, path)
    return path


def read_onnx_metadata(path: str) -> tuple[RetrievalHeadConfig, int]:
    """(head config, opset) recorded in an exported file; ModelFileError when it is not one of ours."""
    onnx = _require("onnx")
    if not os.path.exists(path):
        raise ModelFileError(f"ONNX retrieval head not found: {path}")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises several types for a damaged file
        raise ModelFileError(f"{path} is not a readable ONNX file ({type(exc).__name__})") from None
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get("specontext.format") != FORMAT:
        raise ModelFileError(f"{path} is not a specontext retrieval head export (no {FORMAT!r} metadata); "
                             "make one with specontext-run --export-head-onnx FILE")
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    opset = opsets.get("ai.onnx", 0)
    if opset != OPSET or meta.get("specontext.opset") != str(OPSET):
        raise ModelFileError(f"{path} was exported for ONNX opset {opset}, this version of specontext runs opset "
                             f"{OPSET}; export it again with specontext-run --export-head-onnx FILE")
    cfg = RetrievalHeadConfig.from_dict(json.loads(meta["specontext.head_config"]), where=path)
    return cfg, opset


class OnnxHeadRunner:
    """An ONNX Runtime session of the step graph; call it with torch tensors, get torch tensors.

    On CUDA (CUDAExecutionProvider) inputs and outputs are bound to the torch tensors' device
    memory (I/O binding), so the K cache never leaves the device; on CPU they are shared as numpy
    arrays without copies.
    """

    def __init__(self, session, config: RetrievalHeadConfig, path: str, device: torch.device):
        self.session, self.config, self.path, self.device = session, config, path, device
        self.provider = session.get_providers()[0]

    @classmethod
    def load(cls, path: str, target: TargetInfo, device: torch.device | str = "cpu") -> "OnnxHeadRunner":
        """Open ``path`` for the model ``target``; refuses another model's head, naming it."""
        ort = _require("onnxruntime")
        cfg, _ = read_onnx_metadata(path)
        why = cfg.target.mismatch(target)
        if why:
            raise InputError(f"ONNX retrieval head {path} was made for {cfg.target.describe()}, not the loaded "
                             f"model ({why}); export one for this model")
        device = torch.device(device)
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise InputError("the model runs on CUDA but this onnxruntime has no CUDA provider; "
                                 "pip install 'specontext[onnx-gpu]' (onnxruntime-gpu) instead of onnxruntime")
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0})] + providers
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(path, options, providers=providers)
        return cls(session, cfg, path, device)

    def __call__(self, embeds: torch.Tensor, hidden: torch.Tensor | None, positions: torch.Tensor,
                 keys: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(new_keys, queries, scores) for the step (shapes in the module docstring)."""
        cfg = self.config
        B, T, E = embeds.shape
        if hidden is None:
            hidden = embeds.new_zeros(B, T, E)
        feeds = {"embeds": embeds.float().contiguous(), "hidden": hidden.float().contiguous(),
                 "positions": positions.to(torch.int64).contiguous(), "keys": keys.float().contiguous(),
                 "valid": valid.contiguous()}
        if self.device.type != "cuda":
            out = self.session.run(None, {k: v.numpy() for k, v in feeds.items()})
            return tuple(torch.from_numpy(o) for o in out)
        S = keys.shape[2]
        outputs = {"new_keys": torch.empty(B, cfg.num_kv_heads, T, cfg.head_dim, device=self.device),
                   "queries": torch.empty(B, cfg.num_heads, T, cfg.head_dim, device=self.device),
                   "scores": torch.empty(B, cfg.target.num_kv_heads, S, device=self.device)}
        binding = self.session.io_binding()
        index = self.device.index or 0
        dtypes = {torch.float32: "float32", torch.int64: "int64", torch.bool: "bool"}
        import numpy as np

        for name, t in {**feeds, **outputs}.items():
            bind = binding.bind_input if name in feeds else binding.bind_output
            bind(name, "cuda", index, getattr(np, dtypes[t.dtype]) if t.dtype != torch.bool else np.bool_,
                 list(t.shape), t.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # inputs written before ORT's stream reads them
        self.session.run_with_iobinding(binding)
        return outputs["new_keys"], outputs["queries"], outputs["scores"]
