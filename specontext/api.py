"""The Python API: load a model, then generate (blocking) or stream.

Example::

    import specontext
    llm = specontext.load()                      # the default model, SmolLM2-135M-Instruct
    print(llm.generate("What is the capital of France?", max_new_tokens=16).text)
    print(llm.ask("France is a country in Europe.", "What is the capital of France?").text)
    for piece in llm.stream("Name three colours.", max_new_tokens=32):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import os
import warnings
from dataclasses import fields, replace
from typing import Callable, Iterator, Mapping, Union

import torch

from . import assets, prompting
from .config import ModelConfig
from .engine import Engine
from .generation import BatchGeneration, Generation
from .stats import GenerationResult
from .errors import InputError, ModelFileError
from .loaders.release import returning_freed_memory
from .model import decode_attention, qmatmul
from .model.bf16 import hold_head_in_bf16
from .model.int8_embedding import hold_embeddings_in_int8
from .model.llama import LlamaForCausalLM
from .model.quant import kernel_dtype
from .retrieval.head import RetrievalHead, TargetInfo, fingerprint_once, resolve_head
from .settings import FLOAT_FORMATS, GenerationConfig, RuntimeSettings, decode_options
from .tokenizer import Tokenizer

Prompt = Union[str, list[dict], list[int]]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but no CUDA GPU is available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return getattr(torch, name)


QUANTIZED = ("int4", "int8")


def weight_format(settings: RuntimeSettings, device: torch.device, dtype: torch.dtype) -> tuple[str, torch.dtype]:
    """(what the loaders keep: ``int4``, ``int8``, ``fp32`` for float, or ``auto``; the compute dtype).

    ``auto`` on a CPU keeps a GGUF's quantization (``GGUFFile.auto_weight_format``: Q4_0 / Q4_1 /
    Q4_K as int4, Q8_0 as int8) and loads a float checkpoint as float32. On CUDA ``auto`` is float
    (the dtype): the CUDA int4 path (``--weights int4``, bfloat16) has not run on a GPU yet. int8
    has a CPU kernel only. A float format sets the dtype.
    """
    fmt = settings.weights
    if fmt == "int4" and device.type not in ("cpu", "cuda"):
        raise InputError(f"--weights int4 runs on a CPU or a CUDA GPU; on {device.type} use --weights bf16 or fp16")
    if fmt == "int8" and device.type != "cpu":
        raise InputError(f"--weights int8 runs on the CPU's kernel in this version; on {device.type} use "
                         f"--weights int4, bf16 or fp16 (or auto)")
    if fmt == "int4" and device.type == "cuda":
        if settings.dtype not in ("auto", "bfloat16"):
            raise InputError(f"--weights int4 on CUDA runs in bfloat16 (its kernel's dtype); drop --dtype "
                             f"{settings.dtype} or give --dtype bfloat16")
        if torch.cuda.get_device_capability(device) < (8, 0):
            major, minor = torch.cuda.get_device_capability(device)
            raise InputError(f"--weights int4 on CUDA needs compute capability 8.0 or newer (torch's int4 kernel); "
                             f"this GPU is {major}.{minor}: use --weights bf16 or fp16")
        return "int4", torch.bfloat16
    if fmt == "gguf":
        if device.type != "cpu":
            raise InputError(f"--weights gguf runs on ggml's CPU kernels; on {device.type} use --weights int4, bf16 or "
                             f"fp16")
        return "gguf", torch.float32
    if fmt in FLOAT_FORMATS:
        wanted = getattr(torch, FLOAT_FORMATS[fmt])
        if settings.dtype != "auto" and resolve_dtype(settings.dtype, device) != wanted:
            raise InputError(f"--weights {fmt} and --dtype {settings.dtype} disagree; give one of them")
        if device.type == "cpu" and fmt != "fp32":
            raise InputError(f"--weights {fmt} is for CUDA; on a CPU use fp32, int8 or int4 (or auto)")
        return "fp32", wanted
    if fmt == "auto":
        keeps = device.type == "cpu" and dtype == torch.float32
        return ("auto" if keeps else "fp32"), dtype
    return fmt, dtype


def load_model_files(path: str | None, weights: str = "fp32") -> tuple[ModelConfig, Mapping, Tokenizer]:
    """Read config, tensors (float32 or checkpoint dtype, CPU) and tokenizer from a path.

    ``path`` is a ``.gguf`` file, a Hugging Face folder, or None for the default model. A GGUF's
    tensors come as a :class:`~specontext.loaders.gguf_loader.LazyTensors`, each read when taken;
    the caller calls its ``check()`` once it has taken what it needs (the file did not change).
    ``weights`` (``auto``, ``int4``, ``int8``): a GGUF's linear layers come back as
    :class:`~specontext.model.quant.QuantizedWeight` (see ``GGUFFile.hf_tensors``).
    """
    from .loaders.gguf_loader import GGUFFile
    from .loaders.hf import load_hf_config, read_generation_eos, read_safetensors

    path = path or assets.default_model_path()
    if not os.path.exists(path):
        raise ModelFileError(f"model path not found: {path} (expected a .gguf file or a Hugging Face model folder)")
    if os.path.isdir(path):
        if weights == "gguf":
            raise InputError(f"--weights gguf keeps a GGUF file's blocks, but {path} is a Hugging Face folder; use "
                             f"--weights auto, int4 or int8")
        cfg = load_hf_config(path)
        tensors = read_safetensors(path)
        extra_eos = read_generation_eos(path)
        tokenizer = Tokenizer.from_hf_folder(path, eos_token_ids=cfg.eos_token_ids + extra_eos,
                                             bos_token_id=cfg.bos_token_id)
        return cfg, tensors, tokenizer
    if not os.access(path, os.R_OK):
        raise ModelFileError(f"model file is not readable: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelFileError(
            f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF'); "
            "pass a .gguf file or a Hugging Face folder with config.json and *.safetensors"
        )
    gguf_file = GGUFFile(path)
    cfg = gguf_file.model_config()
    tokenizer = Tokenizer.from_gguf_fields(gguf_file.meta)
    # read as they are taken (each read checks the file is still the one parsed); the caller
    # calls tensors.check() once it has taken them all
    return cfg, gguf_file.hf_tensors(cfg, weights), tokenizer


class LLM:
    """A loaded model ready to generate. Create it with :func:`load`.

    Attributes:
        config: the model's :class:`ModelConfig`.
        tokenizer: its :class:`Tokenizer`.
        target: :class:`TargetInfo` (shape and weight fingerprint) a retrieval head must match.
        retrieval_head: the loaded head when ``sparsity`` is ``specontext``, else None.
        engine: the :class:`Engine` running it.
    """

    def __init__(self, model: LlamaForCausalLM, tokenizer: Tokenizer, settings: RuntimeSettings, path: str,
                 target: TargetInfo):
        self.model = model
        self.config = model.config
        self.tokenizer = tokenizer
        self.path = path
        self.target = target
        self.retrieval_head: RetrievalHead | None = None
        self.engine = Engine(model, tokenizer, settings)
        self.engine.model_path = path
        self.settings = settings
        self.set_sparsity()

    def set_sparsity(self, **changes) -> None:
        """Change how later generations select tokens; keywords are the :class:`RuntimeSettings` decode options (``settings.decode_options()``).

        Example::

            llm.set_sparsity(sparsity="specontext", budget_tokens=512)   # loads the head on first use
            llm.set_sparsity(sparsity="dense")
        """
        allowed = decode_options()
        unknown = sorted(set(changes) - allowed)
        if unknown:
            raise InputError(f"unknown sparsity option {unknown[0]!r}; valid: {', '.join(sorted(allowed))}")
        settings = replace(self.settings, **changes)
        opts = settings.sparsity_options()
        if opts.method != "dense" and self.config.sliding_window is not None:
            raise InputError(f"sparsity {opts.method!r} is not supported for sliding-window attention models "
                             f"(window {self.config.sliding_window}); use --sparsity dense")
        head = self.retrieval_head
        changed = (settings.retrieval_head, settings.retrieval_backend) != (self.settings.retrieval_head,
                                                                            self.settings.retrieval_backend)
        if opts.method == "specontext" and (head is None or changed):
            head = self._load_head(settings.retrieval_head, settings.retrieval_backend)
        if settings.compile_decode != self.settings.compile_decode:
            self.engine.clear_compiled()
        self.settings, self.retrieval_head = settings, head
        self.engine.settings, self.engine.sparsity, self.engine.retrieval_head = settings, opts, head

    def _load_head(self, spec: str, backend: str):
        """The head for ``spec`` on ``backend``: a RetrievalHead (torch) or an OnnxHeadRunner."""
        is_onnx_file = spec.lower().endswith(".onnx")
        if backend == "torch":
            if is_onnx_file:
                raise InputError(f"{spec} is an ONNX export; run it with --retrieval-backend onnxruntime, or give the "
                                 "head's .json for torch")
            return resolve_head(spec, self.target, device=self.model.device, dtype=self.model.dtype)
        from .retrieval.onnx_head import OnnxHeadRunner, cached_export

        path = spec if is_onnx_file else cached_export(resolve_head(spec, self.target))
        return OnnxHeadRunner.load(path, self.target, device=self.model.device)

    def export_head_onnx(self, path: str, retrieval_head: str | None = None) -> str:
        """Export the retrieval head (``retrieval_head``, default this LLM's setting) to ONNX at ``path``."""
        from .retrieval.onnx_head import export_onnx

        head = resolve_head(retrieval_head or self.settings.retrieval_head, self.target)
        return export_onnx(head, path)

    def encode_prompt(self, prompt: Prompt, chat: bool = True) -> list[int]:
        """Token ids for a prompt.

        ``prompt`` is a string (wrapped as one user message and rendered with the chat template
        when ``chat`` is true and the model has one), a list of ``{"role", "content"}`` messages
        (always rendered with the template), or a list of token ids (used as they are).

        Strings and message contents are always text: only the chat template's own markup becomes
        control tokens, so ``<|im_end|>`` inside a document cannot end its turn. A prompt that is
        meant to hold markup (already rendered) is passed as token ids, e.g.
        ``llm.tokenizer.encode(rendered)``.
        """
        if isinstance(prompt, str):
            if chat and self.tokenizer.chat_template:
                return self.encode_prompt([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(prompt, parse_special=False)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
            if bad:
                raise InputError(f"token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
            return list(prompt)
        if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            return self.tokenizer.encode_chat(prompt, add_generation_prompt=True)
        raise InputError("prompt must be a string, a list of {'role', 'content'} messages, or a list of token ids")

    def encode_document(self, document: str | None, question: str | None, chat: bool = True) -> list[int]:
        """Token ids for ``question`` about ``document``, framed as ``specontext-run`` frames them.

        The framing (labelled document and question parts, chosen by measurement) lives in
        :mod:`specontext.prompting`; it goes through the chat template when ``chat`` is true and
        the model has one, else it is raw text. Either part may be None; both None or blank
        raises InputError.
        """
        if chat and self.tokenizer.chat_template:
            return self.encode_prompt(prompting.document_messages(document, question))
        return self.encode_prompt(prompting.document_text(document, question), chat=False)

    def ask(self, document: str | None, question: str | None, *, chat: bool = True,
            **generation) -> GenerationResult:
        """Answer ``question`` about ``document`` (the text itself) and return a :class:`GenerationResult`.

        The request is framed as ``specontext-run --document FILE --question TEXT`` frames it
        (see :meth:`encode_document`); keyword arguments are :class:`GenerationConfig` fields, as
        for :meth:`generate`.

        Example::

            llm.ask("France is a country in Europe.", "What is the capital of France?").text
            # 'The capital of France is Paris.'
        """
        return self.generate(self.encode_document(document, question, chat), **generation)

    def start(self, prompt: Prompt, *, chat: bool = True, progress: Callable[[int, int], None] | None = None,
              **generation) -> Generation:
        """Begin generating; returns a :class:`Generation` (iterate it for text pieces)."""
        gen = _generation_config(generation)
        return self.engine.generate(self.encode_prompt(prompt, chat), gen, progress=progress)

    def generate(self, prompt: Prompt, *, chat: bool = True, **generation) -> GenerationResult:
        """Generate to completion and return a :class:`GenerationResult`.

        Keyword arguments are :class:`GenerationConfig` fields: ``max_new_tokens``,
        ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``, ``ignore_eos``.
        """
        g = self.start(prompt, chat=chat, **generation)
        for _ in g:
            pass
        return g.result()

    def stream(self, prompt: Prompt, *, chat: bool = True, **generation) -> Iterator[str]:
        """Yield text pieces as they are generated (same arguments as :meth:`generate`)."""
        yield from self.start(prompt, chat=chat, **generation)

    def start_batch(self, prompts: list[Prompt], *, chat: bool = True, per_request: list[dict] | None = None,
                    progress: Callable[[int, int], None] | None = None, **generation) -> BatchGeneration:
        """Begin generating several prompts together; iterate the result for ``(index, piece)``.

        ``generation`` keywords apply to every request; ``per_request[i]`` (a dict of the same
        keywords) overrides them for request i, e.g. its own ``max_new_tokens`` or ``seed``.
        """
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
            raise InputError("prompts must be a non-empty list of prompts (strings, message lists or token id lists)")
        if per_request is not None and len(per_request) != len(prompts):
            raise InputError(f"per_request has {len(per_request)} entries for {len(prompts)} prompts")
        gens = [_generation_config({**generation, **((per_request or [{}] * len(prompts))[i] or {})})
                for i in range(len(prompts))]
        ids = [self.encode_prompt(p, chat) for p in prompts]
        return self.engine.generate_batch(ids, gens, progress=progress)

    def generate_batch(self, prompts: list[Prompt], *, chat: bool = True, per_request: list[dict] | None = None,
                       **generation) -> list[GenerationResult]:
        """Generate several prompts together (one batch) and return their results in order.

        Each request keeps its own length, sampling, stop strings and (with sparsity) its own
        token selection, so its result equals :meth:`generate` on it alone; decoding them
        together shares each step's weight reads, which is where batching gains throughput.

        Example::

            results = llm.generate_batch(["Summarise: ...", "Translate: ..."], max_new_tokens=64,
                                         per_request=[{}, {"max_new_tokens": 16}])
        """
        batch = self.start_batch(prompts, chat=chat, per_request=per_request, **generation)
        for _ in batch:
            pass
        return batch.results()


def _generation_config(kwargs: dict) -> GenerationConfig:
    names = {f.name for f in fields(GenerationConfig)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise InputError(f"unknown generation option {unknown[0]!r}; valid: {', '.join(sorted(names))}")
    if "stop" in kwargs:
        stop = kwargs["stop"]
        kwargs = {**kwargs, "stop": (stop,) if isinstance(stop, str) else tuple(stop or ())}
    return GenerationConfig(**kwargs)


def load(model: str | None = None, *, device: str = "auto", dtype: str = "auto", threads: int = 0,
         prefill_chunk_tokens: int = 512, settings: RuntimeSettings | None = None, **sparsity) -> LLM:
    """Load a model for generation.

    Args:
        model: a ``.gguf`` file, a Hugging Face folder (config.json, *.safetensors,
            tokenizer.json), or None for the default SmolLM2-135M-Instruct.
        device, dtype, threads, prefill_chunk_tokens: see :class:`RuntimeSettings`
            (ignored when ``settings`` is given).
        sparsity: :class:`RuntimeSettings` sparsity fields, e.g. ``sparsity="specontext",
            budget_tokens=1024, retrieval_head="auto"`` (applied over ``settings``).
    Returns:
        an :class:`LLM`.
    Raises:
        ModelFileError, UnsupportedModelError, InputError (all SpecontextError).
    """
    with returning_freed_memory():  # the load's transient buffers go back to the system (loaders/release.py)
        return _load(model, settings or RuntimeSettings(device=device, dtype=dtype, threads=threads,
                                                        prefill_chunk_tokens=prefill_chunk_tokens), sparsity)


def _load(model: str | None, settings: RuntimeSettings, sparsity: dict) -> LLM:
    """:func:`load`'s work, with its settings made."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    dev = resolve_device(settings.device)
    dt = resolve_dtype(settings.dtype, dev)
    if dev.type == "cpu" and dt != torch.float32:
        raise InputError(f"dtype {settings.dtype} is for CUDA; on CPU use float32 (or auto)")
    path = model or assets.default_model_path()
    if sparsity:
        allowed = {f.name for f in fields(RuntimeSettings)}
        unknown = sorted(set(sparsity) - allowed)
        if unknown:
            raise InputError(f"unknown load option {unknown[0]!r}; valid: {', '.join(sorted(allowed))}")
        settings = replace(settings, **sparsity)
    weights, dt = weight_format(settings, dev, dt)
    if weights == "gguf" and settings.embeddings != "float":
        raise InputError("--embeddings int8 with --weights gguf: the table stays as the GGUF's own blocks (Q8_0 and "
                         "smaller types are already 8-bit or less); drop --embeddings int8")
    if settings.activations == "int8" and (weights != "int8" or dev.type != "cpu"):
        raise InputError(f"--activations int8 runs on a CPU's int8 x int8 kernel and needs --weights int8 (got "
                         f"--weights {settings.weights} on {dev.type}); add --weights int8 on a CPU, or drop it")
    cfg, tensors, tokenizer = load_model_files(path, weights)
    target = TargetInfo.of(cfg, fingerprint_once(tensors), name=os.path.basename(os.path.normpath(path)))
    net = LlamaForCausalLM(cfg, device="meta")  # not under torch.device("meta"): see LlamaForCausalLM
    weights = getattr(tensors, "weight_format", weights)  # what a GGUF's auto chose
    head_in_bf16 = dev.type == "cpu" and weights in QUANTIZED and kernel_dtype() == torch.bfloat16
    # the head (and a float table) load straight into bf16; an int8 table is made from the float one
    tables = ("lm_head.weight",) + (("model.embed_tokens.weight",) if settings.embeddings == "float" else ())
    net.load_checkpoint(tensors, dtype=dt, device=dev,
                        quantize_to=weights if weights in QUANTIZED or weights == "gguf" else None,
                        held_in=dict.fromkeys(tables, torch.bfloat16) if head_in_bf16 else None,
                        int8_tables=(dev.type == "cpu" and weights in QUANTIZED and settings.embeddings == "float"
                                     and qmatmul.available()))
    if hasattr(tensors, "check"):  # a GGUF read while loading: the file must not have changed meanwhile
        tensors.check()
    del tensors
    if settings.embeddings == "int8" and hold_embeddings_in_int8(net):
        warnings.warn("--embeddings int8 on a model whose LM head is its embedding table (tied): the head keeps "
                      "the float table, so the int8 one adds memory; it saves memory on untied models", stacklevel=3)
    if head_in_bf16:
        hold_head_in_bf16(net)
    if dev.type == "cpu":
        decode_attention.available()  # registered before any step is traced or compiled
    llm = LLM(net, tokenizer, settings, path, target)
    if settings.activations == "int8":
        _calibrate_int8_activations(llm)
    if settings.compile_decode == "aot":
        llm.engine.aot_step()
    return llm


def _calibrate_int8_activations(llm: LLM) -> None:
    """Smooth the int8 layers and switch them to int8 activations (``model/smooth.py``), from the
    activation maxima of CALIBRATION_TOKENS tokens the model samples from BOS (seeded: the same
    model gives the same layers every load)."""
    from .model.smooth import CALIBRATION_TOKENS, record_input_maxima, use_int8_activations
    from .retrieval.selection import SparsityOptions

    bos = llm.tokenizer.bos_token_id
    start = [bos] if bos is not None else llm.tokenizer.encode("\n", add_bos=False)
    gen = GenerationConfig(max_new_tokens=CALIBRATION_TOKENS, temperature=0.8, seed=0, ignore_eos=True)

    def run() -> None:
        for _ in llm.engine.generate(start, gen, sparsity=SparsityOptions(method="dense")):
            pass
    # eager: the recording hooks and the layers replaced afterwards must not meet a compiled step
    engine, settings = llm.engine, llm.engine.settings
    engine.settings = replace(settings, compile_decode="off")
    try:
        maxima = record_input_maxima(llm.model.model.layers, run)
    finally:
        engine.settings = settings
    use_int8_activations(llm.model, maxima)
    engine.clear_compiled(modules_changed=True)
