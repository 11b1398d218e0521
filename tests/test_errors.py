"""Bad input gets one line on stderr and a non-zero exit, never a traceback or a partial file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from specontext.cli import main

from conftest import cli_command, make_tiny_chat_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny"), max_position_embeddings=128)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([*argv, "--quiet", "--device", "cpu"])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_model_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--model", str(tmp_path / "nope.gguf"), "-q", "hi")
    assert_one_line_error(code, err, "not found", "nope.gguf")


def test_missing_document(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--document", str(tmp_path / "missing.txt"), "-q", "hi")
    assert_one_line_error(code, err, "document not found")


def test_document_is_a_directory(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--document", str(tmp_path), "-q", "hi")
    assert_one_line_error(code, err, "is a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read files without read permission")
def test_unreadable_document(capsys, tmp_path):
    doc = tmp_path / "secret.txt"
    doc.write_text("x")
    doc.chmod(0)
    code, _, err = run_cli(capsys, "--document", str(doc), "-q", "hi")
    assert_one_line_error(code, err, "not readable")


def test_document_not_utf8(capsys, tmp_path, tiny):
    doc = tmp_path / "latin1.txt"
    doc.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    code, _, err = run_cli(capsys, "--model", tiny["gguf"], "--document", str(doc), "-q", "hi")
    assert_one_line_error(code, err, "not UTF-8", "offset 3")


def test_truncated_gguf(capsys, tmp_path, tiny):
    data = open(tiny["gguf"], "rb").read()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[: len(data) // 3])
    code, _, err = run_cli(capsys, "--model", str(bad), "-q", "hi")
    assert_one_line_error(code, err, "truncated.gguf", "not a valid GGUF")


def test_gguf_with_corrupt_header(capsys, tmp_path, tiny):
    data = bytearray(open(tiny["gguf"], "rb").read())
    data[8:16] = (2**62).to_bytes(8, "little")  # absurd tensor count
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "--model", str(bad), "-q", "hi")
    assert_one_line_error(code, err, "corrupt.gguf")


def test_file_that_is_not_gguf(capsys, tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, maybe a pickle")
    code, _, err = run_cli(capsys, "--model", str(bad), "-q", "hi")
    assert_one_line_error(code, err, "not a GGUF file")


def _copy_hf(tiny, dest):
    import shutil

    shutil.copytree(tiny["hf"], dest)
    return dest


def test_truncated_safetensors(capsys, tmp_path, tiny):
    folder = _copy_hf(tiny, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(capsys, "--model", str(folder), "-q", "w3 w4")
    assert_one_line_error(code, err, "model.safetensors", "not a valid safetensors")


def test_safetensors_with_bad_header(capsys, tmp_path, tiny):
    folder = _copy_hf(tiny, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:12] = b"\xff\xfe{["  # header JSON no longer parses
    weights.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "--model", str(folder), "-q", "w3 w4")
    assert_one_line_error(code, err, "not a valid safetensors")


def test_pickle_checkpoint_is_refused(capsys, tmp_path, tiny):
    folder = _copy_hf(tiny, tmp_path / "m")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    code, _, err = run_cli(capsys, "--model", str(folder), "-q", "w3")
    assert_one_line_error(code, err, "pickle", "never loads")


def test_unsupported_architecture_is_named(capsys, tmp_path, tiny):
    folder = _copy_hf(tiny, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "--model", str(folder), "-q", "w3")
    assert_one_line_error(code, err, "GPT2LMHeadModel", "supported")


def test_missing_config_field_is_named(capsys, tmp_path, tiny):
    folder = _copy_hf(tiny, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (folder / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "--model", str(folder), "-q", "w3")
    assert_one_line_error(code, err, "num_hidden_layers")


def test_prompt_longer_than_context_says_by_how_much(capsys, tmp_path, tiny):
    doc = tmp_path / "long.txt"
    doc.write_text(" the" * 200)  # 200 tokens of "Ġthe"
    code, _, err = run_cli(capsys, "--model", tiny["gguf"], "--document", str(doc), "--no-chat-template")
    assert_one_line_error(code, err, "prompt is 200 tokens", "73 more than", "context of 128 tokens")


@pytest.mark.parametrize("option,value,needle", [
    ("--temperature", "-1", "temperature must be >= 0"),
    ("--top-p", "0", "top_p must be in (0, 1]"),
    ("--top-k", "-3", "top_k must be >= 0"),
    ("--max-new-tokens", "0", "max_new_tokens must be >= 1"),
    ("--max-new-tokens", "many", "invalid int value"),
    ("--dtype", "float8", "invalid choice"),
    ("--device", "tpu", "device must be auto, cpu, cuda or cuda:N"),
    ("--prefill-chunk-tokens", "0", "prefill_chunk_tokens must be >= 1"),
    ("--threads", "-2", "threads must be >= 0"),
])
def test_invalid_option_values(capsys, option, value, needle):
    try:
        code = main(["-q", "hi", "--quiet", option, value])
    except SystemExit as exc:  # argparse rejects malformed values itself (exit 2)
        code = exc.code
    assert_one_line_error(code, capsys.readouterr().err, needle)


def test_no_question_or_document(capsys):
    code, _, err = run_cli(capsys)
    assert_one_line_error(code, err, "--question")


def test_output_into_missing_directory_creates_nothing(capsys, tmp_path, tiny):
    target = tmp_path / "no" / "such" / "dir" / "out.txt"
    code, _, err = run_cli(capsys, "--model", tiny["gguf"], "-q", "hi", "--output", str(target))
    assert_one_line_error(code, err, "does not exist")
    assert not target.exists()


def test_failed_run_leaves_no_output_file(capsys, tmp_path, tiny):
    out = tmp_path / "answer.txt"
    doc = tmp_path / "bad.txt"
    doc.write_bytes(b"\xff\xfe\x00bad")
    code, _, err = run_cli(capsys, "--model", tiny["gguf"], "--document", str(doc), "--output", str(out))
    assert_one_line_error(code, err, "not UTF-8")
    assert not out.exists()


def test_real_entry_point_prints_no_traceback(tmp_path):
    """The installed console script, as a user runs it."""
    cmd = cli_command()
    proc = subprocess.run([*cmd, "--model", str(tmp_path / "x.gguf"), "-q", "hi"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "model path not found" in proc.stderr


def test_failure_during_generation_removes_the_output_file(capsys, tmp_path, tiny, monkeypatch):
    from specontext.model.llama import LlamaForCausalLM

    def broken_forward(self, *args, **kwargs):
        raise RuntimeError("simulated device failure\nsecond line of a long backend message")

    monkeypatch.setattr(LlamaForCausalLM, "forward", broken_forward)
    out = tmp_path / "answer.txt"
    out.write_text("previous answer")
    code, _, err = run_cli(capsys, "--model", tiny["gguf"], "-q", "hi", "--output", str(out))
    assert_one_line_error(code, err, "internal error", "simulated device failure")
    assert out.read_text() == "previous answer"  # untouched
    assert not (tmp_path / "answer.txt.partial").exists()


@pytest.mark.parametrize("option,value", [("--temperature", "nan"), ("--top-p", "nan"), ("--seed", str(2**70))])
def test_non_finite_or_overflowing_numbers(capsys, option, value):
    code = main(["-q", "hi", "--quiet", option, value])
    assert_one_line_error(code, capsys.readouterr().err, "must")
