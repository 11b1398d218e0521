"""Shared fixtures: tiny random-weight checkpoints in Hugging Face layout, and the default model."""

from __future__ import annotations

import json
import os

import pytest
import torch


CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def cli_command() -> list[str]:
    """How to run specontext-run here: the installed script, else the module."""
    import shutil
    import sys

    exe = shutil.which("specontext-run")
    return [exe] if exe else [sys.executable, "-m", "specontext.cli"]


def start_long_answer(gguf: str, tmp_path, out) -> tuple:
    """specontext-run streaming a very long answer into ``out``; returns (process, its stdout file) once
    ``out``'s partial file holds 50 bytes. Stdout goes to tmp_path/stdout.txt, not a pipe: nobody reads
    a pipe until the test signals, and a child blocked on a full pipe is a state of this harness."""
    import signal
    import subprocess
    import time

    stdout_file = open(tmp_path / "stdout.txt", "w+", encoding="utf-8")
    proc = subprocess.Popen([*cli_command(), "--model", gguf, "-q", "the", "--max-new-tokens", "150000", "--ignore-eos",
                             "--output", str(out), "--quiet", "--device", "cpu"],
                            stdout=stdout_file, stderr=subprocess.PIPE, text=True,
                            # a test runner started in the background (`cmd &`, nohup) ignores SIGINT, and its
                            # children inherit that; Python then installs no KeyboardInterrupt handler and a
                            # SIGINT would be dropped. A user's terminal gives the default disposition.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    partial = out.parent / (out.name + ".partial")  # tokens stream here; it becomes ``out`` at the end
    deadline = time.time() + 240
    while time.time() < deadline and (not partial.exists() or partial.stat().st_size < 50) and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read()
    return proc, stdout_file


def signal_and_wait(proc, stdout_file, signum) -> str:
    """Send ``signum`` to ``proc``; its stderr once it exits (the test fails if it has not within 180 s)."""
    import subprocess

    proc.send_signal(signum)
    try:
        return proc.communicate(timeout=180)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        stderr = proc.communicate()[1]
        pytest.fail(f"no exit within 180 s of signal {signum}; stderr: {stderr[-2000:]}")
    finally:
        stdout_file.close()


def make_tiny_chat_model(root, max_position_embeddings: int) -> dict:
    """A tiny llama as a Hugging Face folder and as a GGUF with a ChatML template."""
    hf = make_hf_model("llama", str(root / "hf"), vocab_size=288, hidden_size=64, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=max_position_embeddings)
    gguf_path = str(root / "tiny.gguf")
    write_tiny_gguf(hf, gguf_path, chat_template=CHATML_TEMPLATE)
    return {"hf": str(root / "hf"), "gguf": gguf_path}


def write_tiny_tokenizer(folder: str, vocab_size: int, chat_template: str | None = None) -> None:
    """A word-level tokenizer over ``vocab_size`` made-up words, enough to drive generation."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(folder, "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": "</s>"}
    if chat_template:
        cfg["chat_template"] = chat_template
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that attention patterns and norms actually matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def make_hf_model(family: str, folder: str, seed: int = 0, **overrides):
    """Write a tiny random model of ``family`` with transformers; return the HF model (fp32)."""
    transformers = pytest.importorskip("transformers")
    base = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    base.update(overrides)
    cls_name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[family]
    config = getattr(transformers, f"{cls_name}Config")(**base)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{cls_name}ForCausalLM")(config).eval()
    randomize(model, seed)
    model.save_pretrained(folder)
    write_tiny_tokenizer(folder, base["vocab_size"])
    return model


def make_random_head(target, path: str, hidden_layers=(0, 1), num_heads: int = 4, num_kv_heads: int = 2,
                     head_dim: int = 8, seed: int = 0):
    """A random retrieval head (embedding + hidden input) for ``target``, saved at ``path``; returns it."""
    from specontext.retrieval.head import RetrievalHead, RetrievalHeadConfig, save_head

    cfg = RetrievalHeadConfig(target=target, input_kind="embedding+hidden", hidden_layers=tuple(hidden_layers),
                              num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                              kv_group_of_head=tuple(h // (num_heads // num_kv_heads) for h in range(num_heads)))
    torch.manual_seed(seed)
    head = RetrievalHead(cfg)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.3)
    save_head(head, path)
    return head


def tiny_sparse_setup(root, num_tokens: int) -> dict:
    """A tiny GQA llama (6 query heads, 2 KV heads, 3 layers) in ``root/m``, its transformers twin,
    the loaded LLM (32-token prefill chunks), a random retrieval head and ``num_tokens`` random ids."""
    hf = make_hf_model("llama", str(root / "m"), max_position_embeddings=256)
    import specontext

    llm = specontext.load(str(root / "m"), device="cpu", prefill_chunk_tokens=32)
    head = str(root / "head" / "tiny")
    make_random_head(llm.target, head)
    ids = torch.randint(3, 96, (num_tokens,), generator=torch.Generator().manual_seed(3)).tolist()
    return {"hf": hf, "llm": llm, "path": str(root / "m"), "head": head, "head_path": head, "ids": ids, "root": root}


def recording_selections(llm):
    """Record each decode step's global selection through the engine's ``on_select`` hook.

    Returns (record, restore): ``record`` gets, per step, the selection's indices [B, G, K + 1]
    (a copy) or None for a dense step; ``restore()`` removes the hook.
    """
    record = []
    llm.engine.on_select = lambda sel, plan: record.append(None if sel is None else sel.indices.clone())
    return record, lambda: setattr(llm.engine, "on_select", None)


@pytest.fixture(scope="session")
def default_llm():
    """The real default model (SmolLM2-135M-Instruct), loaded once per test session; the tests that
    use it skip where the model's package or gguf is not installed (e.g. a bare GPU machine)."""
    import specontext
    from specontext.assets import default_model_path
    from specontext.errors import ModelFileError

    pytest.importorskip("gguf", reason="the gguf package is not installed")
    try:
        default_model_path()
    except ModelFileError as exc:
        pytest.skip(str(exc))
    return specontext.load(device="cpu")


def _byte_symbols() -> list[str]:
    # GPT-2 byte-level BPE shows each byte as a printable character: printable Latin-1 bytes stand
    # for themselves, the rest are shifted above U+0100 in byte order.
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    symbols, shift = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + shift)
            shift += 1
    return [symbols[b] for b in range(256)]


def write_tiny_gguf(hf_model, path: str, arch: str = "llama", tensor_type=None, chat_template: str | None = None,
                    extra: dict | None = None, table_type=None):
    """Convert a tiny transformers model to GGUF the way llama.cpp's converter lays it out.

    Vocabulary: 3 control tokens, 256 byte symbols, then merged pieces up to the model's vocab.
    ``tensor_type``: a GGMLQuantizationType for the 2-D weight matrices (default F32);
    ``table_type``: another for the embedding table and LM head (default ``tensor_type``).
    """
    gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")
    import numpy as np

    cfg = hf_model.config
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    symbols = _byte_symbols()
    merged = ["Ġt", "he", "Ġthe", "in", "Ġa", "er", "on", "Ġo"]
    tokens = (specials + symbols + merged)[: cfg.vocab_size]
    tokens += [f"<extra_{i}>" for i in range(cfg.vocab_size - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    w.add_token_merges(["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ o"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)
    for key, value in (extra or {}).items():  # more metadata, {arch}.-prefixed: str, int or float values
        key = f"{arch}.{key}"
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_float32(key, float(value))

    def permute(t, heads):
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, t in hf_model.state_dict().items():
        arr = t.detach().float().numpy().copy()
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            stem, kind = rest.rsplit(".", 1)
            gname = f"blk.{layer}.{names[stem]}.{kind}"
            if arch == "llama" and stem in ("self_attn.q_proj", "self_attn.k_proj"):
                arr = permute(arr, cfg.num_attention_heads if "q_proj" in stem else cfg.num_key_value_heads)
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        qtype = (tensor_type if table_type is None else table_type) if gname in ("token_embd.weight", "output.weight") else tensor_type
        if qtype is not None and arr.ndim == 2:
            w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
