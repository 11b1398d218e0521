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

The file holds the float32 graph. On CUDA the runner loads it with ``keys`` and ``new_keys`` as
float16 (``keys_dtype``): a Cast to float32 after the ``keys`` input and one to float16 after
``new_keys``, the rest unchanged. The K cache then stays float16 on the device, as the torch
head's does, and is bound by pointer with no conversion in torch; the scores are computed as the
float32 graph computes them on the same float16 keys (as torch's ``group_probs`` does).

On CUDA, ONNX Runtime runs on a torch stream of its own (the provider's ``user_compute_stream``)
and does not synchronise at the end of a run (``disable_synchronize_execution_providers``): that
stream waits for the compute stream before the run and the compute stream waits for it after, so
the step never waits on the host. An onnxruntime that ignores the option (older than 1.17) is
ordered as before: the host waits for the compute stream, and ONNX Runtime for its own.

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

from ..errors import InputError, ModelFileError, malformed
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


@malformed("the ONNX retrieval head")
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


def with_keys_dtype(model, keys_dtype: torch.dtype):
    """The step graph ``model`` (an onnx ModelProto, changed in place and returned) taking ``keys``
    and returning ``new_keys`` as ``keys_dtype``, by a Cast on each; every other node unchanged."""
    onnx = _require("onnx")
    elem = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16}[keys_dtype]
    graph = model.graph
    for node in graph.node:  # the float32 graph now reads "keys" through the first cast
        node.input[:] = ["keys_float32" if name == "keys" else name for name in node.input]
        node.output[:] = ["new_keys_float32" if name == "new_keys" else name for name in node.output]
    casts = [onnx.helper.make_node("Cast", ["keys"], ["keys_float32"], to=onnx.TensorProto.FLOAT,
                                   name="specontext_keys_to_float32"),
             onnx.helper.make_node("Cast", ["new_keys_float32"], ["new_keys"], to=elem,
                                   name="specontext_new_keys_to_keys_dtype")]
    nodes = [casts[0], *graph.node, casts[1]]
    del graph.node[:]
    graph.node.extend(nodes)
    for value in (*graph.input, *graph.output):
        if value.name in ("keys", "new_keys"):
            value.type.tensor_type.elem_type = elem
    for value in graph.value_info:  # a recorded float32 type of the renamed tensor stays true
        if value.name == "new_keys":
            value.name = "new_keys_float32"
    return model


class OnnxHeadRunner:
    """An ONNX Runtime session of the step graph; call it with torch tensors, get torch tensors.

    On CUDA (CUDAExecutionProvider) inputs and outputs are bound to the torch tensors' device
    memory (I/O binding), so the K cache never leaves the device, and the graph runs on a stream
    ordered with torch's (module docstring); on CPU they are shared as numpy arrays without copies.

    Attributes:
        keys_dtype: dtype of the ``keys`` it reads and the ``new_keys`` it returns (the K cache's).
        stream: the torch stream ONNX Runtime runs on (CUDA, when onnxruntime takes one), else None.
    """

    def __init__(self, session, config: RetrievalHeadConfig, path: str, device: torch.device,
                 keys_dtype: torch.dtype = torch.float32, stream=None):
        self.session, self.config, self.path, self.device = session, config, path, device
        self.provider = session.get_providers()[0]
        self.keys_dtype, self.stream = keys_dtype, stream
        self._run_options = None
        if stream is not None:  # the stream choreography orders the run; ORT need not wait for it
            self._run_options = _require("onnxruntime").RunOptions()
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")

    @classmethod
    def load(cls, path: str, target: TargetInfo, device: torch.device | str = "cpu",
             keys_dtype: torch.dtype | None = None) -> "OnnxHeadRunner":
        """Open ``path`` for the model ``target``; refuses another model's head, naming it.

        ``keys_dtype``: float16 or float32 for the K cache the graph reads (default float16 on
        CUDA, half the bytes of the cache; float32 on the CPU, where float16 would only add casts).
        """
        ort = _require("onnxruntime")
        cfg, _ = read_onnx_metadata(path)
        why = cfg.target.mismatch(target)
        if why:
            raise InputError(f"ONNX retrieval head {path} was made for {cfg.target.describe()}, not the loaded "
                             f"model ({why}); export one for this model")
        device = torch.device(device)
        if keys_dtype is None:
            keys_dtype = torch.float16 if device.type == "cuda" else torch.float32
        if keys_dtype not in (torch.float32, torch.float16):
            raise InputError(f"the ONNX retrieval head reads float32 or float16 keys, not {keys_dtype}")
        model = path
        if keys_dtype != torch.float32:
            model = with_keys_dtype(_require("onnx").load(path), keys_dtype).SerializeToString()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if device.type != "cuda":
            session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            return cls(session, cfg, path, device, keys_dtype)
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise InputError("the model runs on CUDA but this onnxruntime has no CUDA provider; "
                             "pip install 'specontext[onnx-gpu]' (onnxruntime-gpu) instead of onnxruntime")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        stream = torch.cuda.Stream(device)  # not the default stream: onnxruntime reads handle 0 as "none"
        cuda = {"device_id": device.index, "user_compute_stream": str(stream.cuda_stream)}
        try:
            session = ort.InferenceSession(model, options, providers=[("CUDAExecutionProvider", cuda),
                                                                      "CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - an onnxruntime older than the option refuses it (its own types)
            session = ort.InferenceSession(model, options, providers=[
                ("CUDAExecutionProvider", {"device_id": device.index}), "CPUExecutionProvider"])
        provider = session.get_provider_options().get("CUDAExecutionProvider")
        if provider is None:
            raise InputError("onnxruntime could not start its CUDA provider (its log names the missing CUDA or "
                             "cuDNN library); install the libraries onnxruntime-gpu needs, or use "
                             "--retrieval-backend torch")
        if provider.get("has_user_compute_stream") != "1":
            stream = None  # it runs on a stream of its own
        return cls(session, cfg, path, device, keys_dtype, stream)

    def __call__(self, embeds: torch.Tensor, hidden: torch.Tensor | None, positions: torch.Tensor,
                 keys: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(new_keys, queries, scores) for the step (shapes in the module docstring); ``keys`` and
        ``new_keys`` in ``keys_dtype``, the rest float32."""
        cfg = self.config
        B, T, E = embeds.shape
        if hidden is None:
            hidden = embeds.new_zeros(B, T, E)
        feeds = {"embeds": embeds.float().contiguous(), "hidden": hidden.float().contiguous(),
                 "positions": positions.to(torch.int64).contiguous(),
                 "keys": keys.to(self.keys_dtype).contiguous(), "valid": valid.contiguous()}
        if self.device.type != "cuda":
            out = self.session.run(None, {k: v.numpy() for k, v in feeds.items()})
            return tuple(torch.from_numpy(o) for o in out)
        S = keys.shape[2]
        outputs = {"new_keys": torch.empty(B, cfg.num_kv_heads, T, cfg.head_dim, dtype=self.keys_dtype,
                                           device=self.device),
                   "queries": torch.empty(B, cfg.num_heads, T, cfg.head_dim, device=self.device),
                   "scores": torch.empty(B, cfg.target.num_kv_heads, S, device=self.device)}
        binding = self.session.io_binding()
        import numpy as np

        dtypes = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.bool: np.bool_}
        for name, t in {**feeds, **outputs}.items():
            bind = binding.bind_input if name in feeds else binding.bind_output
            bind(name, "cuda", self.device.index or 0, dtypes[t.dtype], list(t.shape), t.data_ptr())
        self._run(binding)
        return outputs["new_keys"], outputs["queries"], outputs["scores"]

    def _run(self, binding) -> None:
        """Run the bound graph ordered with the compute stream (see the module docstring)."""
        compute = torch.cuda.current_stream(self.device)
        if self.stream is None:  # onnxruntime's own stream: the host orders them
            compute.synchronize()  # inputs written before ORT's stream reads them
            self.session.run_with_iobinding(binding)  # returns once its stream is done
            return
        self.stream.wait_stream(compute)  # inputs written before ORT reads them
        try:
            self.session.run_with_iobinding(binding, self._run_options)
        finally:
            # outputs read after ORT wrote them, and, since every later compute-stream op waits,
            # the inputs freed after this call are not reused before ORT has read them
            compute.wait_stream(self.stream)
