"""GGUF loading: layout, q/k un-permutation, dequantization and the GGUF-built tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")

import specontext  # noqa: E402
from specontext.loaders.gguf_loader import GGUFFile  # noqa: E402

from conftest import CHATML_TEMPLATE, make_hf_model, write_tiny_gguf  # noqa: E402


def _logits(llm, ids):
    cache = llm.engine.new_cache(len(ids))
    return llm.engine.prefill(ids, cache, logits_for="all")[0]


@pytest.mark.parametrize("family,arch,overrides", [
    ("llama", "llama", dict(vocab_size=288, tie_word_embeddings=True, hidden_size=64, num_attention_heads=4,
                            num_key_value_heads=2)),
    ("qwen3", "qwen3", dict(vocab_size=288, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32)),
    ("qwen2", "qwen2", dict(vocab_size=288, hidden_size=64, num_attention_heads=4, num_key_value_heads=1)),
])
def test_gguf_float_logits_match_transformers(family, arch, overrides, tmp_path):
    hf = make_hf_model(family, str(tmp_path / "hf"), **overrides)
    path = str(tmp_path / "m.gguf")
    write_tiny_gguf(hf, path, arch=arch)
    ids = torch.randint(3, 288, (1, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids).logits[0]
    llm = specontext.load(path, device="cpu")
    assert llm.config.architecture == family
    assert (_logits(llm, ids[0].tolist()) - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("qtype,max_rel_err", [
    (gguf.GGMLQuantizationType.Q8_0, 0.01), (gguf.GGMLQuantizationType.Q4_0, 0.15),
    (gguf.GGMLQuantizationType.Q4_1, 0.12), (gguf.GGMLQuantizationType.Q5_1, 0.06),
])
def test_quantized_tensors_dequantize_to_the_original(qtype, max_rel_err, tmp_path):
    hf = make_hf_model("llama", str(tmp_path / "hf"), vocab_size=288, hidden_size=64, intermediate_size=96,
                       num_attention_heads=4, num_key_value_heads=2)
    path = str(tmp_path / "q.gguf")
    write_tiny_gguf(hf, path, tensor_type=qtype)
    f = GGUFFile(path)
    got = f.hf_tensors(f.model_config())
    for name, ref in hf.state_dict().items():
        if ref.ndim != 2:
            continue
        err = (got[name] - ref).norm() / ref.norm()
        assert err.item() < max_rel_err, f"{name}: relative error {err.item():.3f}"
    # and the model built from them still follows the reference closely
    llm = specontext.load(path, device="cpu")
    ids = list(range(3, 40))
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].softmax(-1)
    got_p = _logits(llm, ids).softmax(-1)
    assert (got_p - expected).abs().max().item() < 4 * max_rel_err


def test_gguf_tokenizer_special_tokens_and_roundtrip(tmp_path):
    hf = make_hf_model("llama", str(tmp_path / "hf"), vocab_size=288, hidden_size=64, num_attention_heads=4,
                       num_key_value_heads=2)
    path = str(tmp_path / "t.gguf")
    write_tiny_gguf(hf, path, chat_template=CHATML_TEMPLATE)
    llm = specontext.load(path, device="cpu")
    tok = llm.tokenizer
    ids = tok.encode("<|im_start|>user\nthe tea<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2  # control tokens are single ids
    assert tok.decode(ids, skip_special=False) == "<|im_start|>user\nthe tea<|im_end|>"
    # merges apply: " the" is one token (Ġ t -> Ġt, then Ġt he -> Ġthe)
    the = tok.backend.token_to_id("Ġthe")
    assert the in tok.encode("a the")
    # untrusted text can keep special markers as plain text
    assert 1 not in tok.encode("<|im_start|>", parse_special=False)
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token_ids == (2,)


def test_unsupported_tensor_type_is_named(tmp_path):
    hf = make_hf_model("llama", str(tmp_path / "hf"), vocab_size=288, hidden_size=256, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=256, num_hidden_layers=1)
    path = str(tmp_path / "bad.gguf")
    # Q8_K has no dequantizer in the gguf package: a block of 256 values takes 292 bytes
    write_tiny_gguf(hf, path)
    w = gguf.GGUFReader(path)
    path2 = str(tmp_path / "bad2.gguf")
    raw = np.zeros((256, 292), dtype=np.uint8)
    writer = gguf.GGUFWriter(path2, "llama")
    _copy_fields(w, writer)
    for t in w.tensors:
        if t.name == "blk.0.ffn_up.weight":
            writer.add_tensor(t.name, raw, raw_dtype=gguf.GGMLQuantizationType.Q8_K)
        else:
            writer.add_tensor(t.name, np.array(t.data, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist()))))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(specontext.UnsupportedModelError, match=r"blk\.0\.ffn_up\.weight.*Q8_K"):
        specontext.load(path2, device="cpu")


def _copy_fields(reader, writer):
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, value, vtype)


@pytest.mark.parametrize("attn,expected", [({"rope.scaling.yarn_attn_factor": 1.25}, 1.25),
                                           ({"rope.scaling.attn_factor": 0.5}, 0.5 * (0.1 * np.log(4.0) + 1.0)),
                                           ({}, None)])
def test_gguf_yarn_metadata_is_read(tmp_path, attn, expected):
    """YaRN's beta bounds and attention factor come from the GGUF metadata, and give the same RoPE
    as the Hugging Face config that says the same."""
    from specontext.config import ModelConfig
    from specontext.model.rope import inverse_frequencies

    hf = make_hf_model("llama", str(tmp_path / "hf"), vocab_size=288, hidden_size=64, num_attention_heads=4,
                       num_key_value_heads=2)
    path = str(tmp_path / "yarn.gguf")
    write_tiny_gguf(hf, path, extra={"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0,
                                     "rope.scaling.original_context_length": 64, "rope.scaling.yarn_beta_fast": 16.0,
                                     "rope.scaling.yarn_beta_slow": 2.0, **attn})
    rope = GGUFFile(path).model_config().rope
    assert rope.kind == "yarn" and rope.factor == 4.0 and rope.original_max_position_embeddings == 64
    assert (rope.beta_fast, rope.beta_slow) == (16.0, 2.0)
    assert rope.attention_factor == pytest.approx(expected) if expected is not None else rope.attention_factor is None
    hf_cfg = hf.config.to_dict()
    hf_cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": rope.theta, "factor": 4.0, "beta_fast": 16.0,
                                 "beta_slow": 2.0, "original_max_position_embeddings": 64,
                                 **({"attention_factor": expected} if expected else {})}
    from_hf = ModelConfig.from_hf_dict(hf_cfg, name="yarn").rope
    ours = inverse_frequencies(rope, 16, 256)
    theirs = inverse_frequencies(from_hf, 16, 256)
    assert torch.allclose(ours[0], theirs[0]) and ours[1] == pytest.approx(theirs[1])


def _header(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
    import struct

    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _kv_string(key: str, value: bytes, claimed: int | None = None) -> bytes:
    import struct

    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<IQ", 8, len(value) if claimed is None else claimed) + value


@pytest.mark.parametrize("body,message", [
    (_header(0, 2**60), "more than the file can hold"),  # would make the reader loop for ages
    (_header(0, 1) + _kv_string("general.architecture", b"llama", claimed=2**40), "past the end of the file"),
    (_header(0, 1, version=7), "version 7 is not supported"),
    (_header(2**61, 0), "more than the file can hold"),
    (b"GGU", "past the end of the file"),
    (b"PK\x03\x04" + bytes(40), "does not start with 'GGUF'"),
])
def test_gguf_header_counts_are_checked_against_the_file_size(tmp_path, body, message):
    from specontext.errors import ModelFileError
    from specontext.loaders.gguf_check import check_gguf_layout

    path = tmp_path / "bad.gguf"
    path.write_bytes(body)
    with pytest.raises(ModelFileError, match=message):
        check_gguf_layout(str(path))


def test_gguf_tensor_outside_the_file_is_refused_before_reading(tmp_path):
    import struct

    from specontext.errors import ModelFileError

    name = b"token_embd.weight"
    tensor = struct.pack("<Q", len(name)) + name + struct.pack("<IQQIQ", 2, 64, 64, 0, 0)  # F32, 16 KiB
    path = tmp_path / "short.gguf"
    path.write_bytes(_header(1, 1) + _kv_string("general.architecture", b"llama") + tensor + bytes(64))
    with pytest.raises(ModelFileError, match="lies outside the file"):
        GGUFFile(str(path))


def _reader_view(path):
    """The gguf package's reading of a file's metadata and tensors (the reference)."""
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = [(t.name, t.tensor_type, tuple(int(d) for d in t.shape), int(t.data_offset), int(t.n_bytes),
                t.data.dtype, tuple(t.data.shape)) for t in reader.tensors]
    return meta, tensors


def test_header_walk_decodes_what_the_gguf_package_reads(tmp_path):
    """Our bounded walk decodes the metadata (every value type, arrays of numbers and strings) and
    the tensors' places as the gguf package's reader does, on the default model and on a file
    holding every scalar type."""
    from specontext import assets

    path = str(tmp_path / "types.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    T = gguf.GGUFValueType
    for i, (vtype, value) in enumerate([(T.UINT8, 200), (T.INT8, -100), (T.UINT16, 60000), (T.INT16, -30000),
                                        (T.UINT32, 4_000_000_000), (T.INT32, -2_000_000_000), (T.FLOAT32, 0.1),
                                        (T.BOOL, True), (T.STRING, "héllo"), (T.UINT64, 2**63 + 5),
                                        (T.INT64, -2**62), (T.FLOAT64, 1 / 3)]):
        writer.add_key_value(f"test.scalar{i}", value, vtype)
    writer.add_key_value("test.floats", [0.5, -1.25, 3.0], T.ARRAY, sub_type=T.FLOAT32)
    writer.add_key_value("test.ints", [1, -2, 3], T.ARRAY, sub_type=T.INT32)
    writer.add_key_value("test.strings", ["a", "", "ß c"], T.ARRAY, sub_type=T.STRING)
    writer.add_tensor("token_embd.weight", np.arange(64 * 32, dtype=np.float32).reshape(32, 64))
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for p in (path, assets.default_model_path()):
        ours = GGUFFile(p)
        meta, tensors = _reader_view(p)
        assert ours.meta == meta
        assert [(t.name, t.tensor_type, t.shape, t.data_offset, t.n_bytes, t.dtype, t.raw_shape)
                for t in ours.tensors] == tensors
    assert GGUFFile(path).meta["test.scalar6"] == pytest.approx(0.1, rel=1e-7)  # float32's value


def test_repeated_names_in_a_header_are_refused(tmp_path):
    import struct

    from specontext.errors import ModelFileError

    name = b"token_embd.weight"
    tensor = struct.pack("<Q", len(name)) + name + struct.pack("<IQQIQ", 2, 8, 1, 0, 0)  # F32, 32 bytes
    path = tmp_path / "twice.gguf"
    path.write_bytes(_header(2, 1) + _kv_string("general.architecture", b"llama") + 2 * tensor + bytes(96))
    with pytest.raises(ModelFileError, match="appears twice"):
        GGUFFile(str(path))


def test_text_that_is_not_utf8_is_left_undecoded(tmp_path):
    """A string (or an array holding one) that is not UTF-8 reads as None, as the gguf package's
    reader failed on it: undecodable tokens are never merged into one replacement string."""
    import struct

    bad = struct.pack("<Q", 8) + b"test.bad" + struct.pack("<IQ", 8, 2) + b"\xff\xfe"
    arr = struct.pack("<Q", 10) + b"test.array" + struct.pack("<IIQ", 9, 8, 2) + struct.pack("<Q", 1) + b"a" \
        + struct.pack("<Q", 1) + b"\xff"
    path = tmp_path / "bad_text.gguf"
    path.write_bytes(_header(0, 3) + _kv_string("general.architecture", b"llama") + bad + arr + bytes(32))
    meta = GGUFFile(str(path)).meta
    assert meta["test.bad"] is None and meta["test.array"] is None and meta["general.architecture"] == "llama"
