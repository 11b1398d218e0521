"""``--output`` on paths the user does not control: a symlink, a FIFO, a full filesystem, and SIGTERM
mid-answer. No test here touches /dev."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading

import pytest

from specontext.cli import main

from conftest import cli_command, make_tiny_chat_model, signal_and_wait, start_long_answer

ANSWER_ARGS = ["-q", "the", "--max-new-tokens", "40", "--ignore-eos", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return make_tiny_chat_model(tmp_path_factory.mktemp("out"), max_position_embeddings=200_000)["gguf"]


def answer(tiny_gguf, capsys) -> str:
    assert main(["--model", tiny_gguf, *ANSWER_ARGS]) == 0
    return capsys.readouterr().out.rstrip("\n")


def test_a_symlink_is_followed_and_stays_a_link(tiny_gguf, tmp_path, capsys):
    expected = answer(tiny_gguf, capsys)
    target = tmp_path / "target.txt"
    target.write_text("an earlier answer")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    assert main(["--model", tiny_gguf, *ANSWER_ARGS, "--output", str(link)]) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text(encoding="utf-8") == expected
    assert sorted(os.listdir(tmp_path)) == ["link.txt", "target.txt"]  # no partial left anywhere


def test_a_fifo_is_written_through_and_stays_a_fifo(tiny_gguf, tmp_path, capsys):
    expected = answer(tiny_gguf, capsys)
    fifo = tmp_path / "answer.fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(open(fifo, encoding="utf-8").read()), daemon=True)
    reader.start()
    assert main(["--model", tiny_gguf, *ANSWER_ARGS, "--output", str(fifo)]) == 0
    reader.join(timeout=60)
    assert received == [expected]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and os.listdir(tmp_path) == ["answer.fifo"]


@pytest.fixture
def full_filesystem(tmp_path):
    """A one-page tmpfs, filled by an earlier answer: nothing more can be written there."""
    mount = tmp_path / "small"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(mount)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("cannot mount a size-limited tmpfs here (needs root or CAP_SYS_ADMIN)")
    try:
        (mount / "old.txt").write_bytes(b"x" * 4096)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_full_disk_names_the_file_keeps_stdout_and_leaves_no_partial(tiny_gguf, full_filesystem, capsys):
    expected = answer(tiny_gguf, capsys)
    old = full_filesystem / "old.txt"
    code = main(["--model", tiny_gguf, *ANSWER_ARGS, "--output", str(old)])
    out, err = capsys.readouterr()
    assert code == 1
    assert out.rstrip("\n") == expected  # the whole answer still reached standard output
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(old) in lines[0] and "No space left on device" in lines[0]
    assert "Traceback" not in err and "internal error" not in err
    assert old.read_bytes() == b"x" * 4096 and os.listdir(full_filesystem) == ["old.txt"]


def test_sigterm_keeps_the_partial_answer_and_exits_143(tiny_gguf, tmp_path):
    out = tmp_path / "answer.txt"
    partial = tmp_path / "answer.txt.partial"
    proc, stdout_file = start_long_answer(tiny_gguf, tmp_path, out)
    stderr = signal_and_wait(proc, stdout_file, signal.SIGTERM)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and "terminated after" in stderr
    kept = out.read_text(encoding="utf-8")
    assert len(kept) >= 20 and (tmp_path / "stdout.txt").read_text(encoding="utf-8").startswith(kept[:20])
    assert not partial.exists()


def test_out_of_memory_mid_answer_keeps_it_and_says_what_fits(tiny_gguf, tmp_path, capsys, monkeypatch):
    """A MemoryError after a few tokens (injected: an address-space limit cannot be aimed at the
    middle of a generation reliably): the answer so far stays on stdout and in --output, and one
    line says what the memory plan fits."""
    from specontext import engine as engine_module

    real_generate = engine_module.Engine.generate

    class RunsOut:
        def __init__(self, generation):
            self.generation = generation

        def __iter__(self):
            for i, piece in enumerate(self.generation):
                if i == 6:
                    raise MemoryError()
                yield piece

        def __getattr__(self, name):
            return getattr(self.generation, name)

    monkeypatch.setattr(engine_module.Engine, "generate", lambda self, *a, **k: RunsOut(real_generate(self, *a, **k)))
    out = tmp_path / "answer.txt"
    code = main(["--model", tiny_gguf, *ANSWER_ARGS, "--output", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "out of memory after " in lines[0] and "fits at most" in lines[0], err
    kept = out.read_text(encoding="utf-8")
    assert stdout in (kept, kept + "\n") and len(stdout.strip()) > 0  # the CLI ends an answer with a newline
    assert os.listdir(tmp_path) == ["answer.txt"]


def test_a_model_file_that_changes_after_loading_is_never_read_again(tiny_gguf, tmp_path):
    """Weights are copied out of the memory-mapped GGUF while loading, so truncating or deleting the
    file afterwards (another process replacing it) cannot fault a later step."""
    import specontext

    path = tmp_path / "model.gguf"
    shutil.copy(tiny_gguf, path)
    llm = specontext.load(str(path), device="cpu")
    before = llm.generate("the", chat=False, max_new_tokens=8, ignore_eos=True).token_ids
    with open(path, "r+b") as f:
        f.truncate(100)
    assert llm.generate("the", chat=False, max_new_tokens=8, ignore_eos=True).token_ids == before
    os.remove(path)
    assert llm.generate("the", chat=False, max_new_tokens=8, ignore_eos=True).token_ids == before


def test_a_model_file_replaced_while_loading_is_refused(tiny_gguf, tmp_path, monkeypatch):
    """The file is swapped for another between reading the header and copying the weights (here by
    the test, at the point where a writer would race the loader): a clear error, not wrong weights."""
    import specontext
    from specontext.errors import ModelFileError
    from specontext.loaders.gguf_loader import GGUFFile

    path = tmp_path / "model.gguf"
    shutil.copy(tiny_gguf, path)
    real = GGUFFile.hf_tensors

    def racing(self, cfg, *args):
        tensors = real(self, cfg, *args)
        shutil.copy(tiny_gguf, tmp_path / "new.gguf")
        os.replace(tmp_path / "new.gguf", path)  # what `cp` + `mv` by another program does
        return tensors

    monkeypatch.setattr(GGUFFile, "hf_tensors", racing)
    with pytest.raises(ModelFileError, match="changed while it was being read"):
        specontext.load(str(path), device="cpu")


@pytest.mark.parametrize("when", ["after the header", "half-way through the weights"])
def test_a_model_file_truncated_while_loading_is_an_error_not_a_sigbus(tiny_gguf, tmp_path, when):
    """Another program truncates the GGUF while it loads. Nothing of the file is memory-mapped (a
    mapping would turn the first read past the new end into SIGBUS, killing the process): the run
    ends with one line naming the file. In a subprocess, so that a regression cannot kill pytest."""
    path = tmp_path / "model.gguf"
    shutil.copy(tiny_gguf, path)
    script = tmp_path / "truncating.py"
    script.write_text(
        "import sys\n"
        "import specontext.cli\n"
        "from specontext.loaders.gguf_loader import GGUFFile\n"
        f"path, when = {str(path)!r}, {when!r}\n"
        "def truncate():\n"
        "    with open(path, 'r+b') as f:\n"
        "        f.truncate(f.seek(0, 2) // 2)\n"
        "real_config, real_read, reads = GGUFFile.model_config, GGUFFile._read, []\n"
        "def model_config(self):\n"
        "    if when == 'after the header':\n"
        "        truncate()\n"
        "    return real_config(self)\n"
        "def read(self, offset, size):\n"
        "    reads.append(offset)\n"
        "    if when != 'after the header' and len(reads) == 4:\n"
        "        truncate()\n"
        "    return real_read(self, offset, size)\n"
        "GGUFFile.model_config, GGUFFile._read = model_config, read\n"
        "sys.exit(specontext.cli.main(['--model', path, '-q', 'the', '--max-new-tokens', '4', '--quiet',\n"
        "                               '--device', 'cpu']))\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and "changed while it was being read" in lines[0] and str(path) in lines[0], proc.stderr


def test_out_of_memory_under_an_address_space_limit_is_one_line_with_the_plan(tiny_gguf, tmp_path):
    """A real allocation failure: the CLI runs in a process whose address space is capped just above
    what it holds after loading the model, and is asked for a cache that cannot fit."""
    script = tmp_path / "capped.py"
    script.write_text(
        "import resource, sys\n"
        "import specontext, specontext.cli\n"
        f"specontext.load({str(tiny_gguf)!r}, device='cpu')  # everything a run imports and maps, once\n"
        "vm = int([l for l in open('/proc/self/status') if l.startswith('VmSize')][0].split()[1]) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + 64 * 2**20, resource.RLIM_INFINITY))\n"
        f"sys.exit(specontext.cli.main(['--model', {str(tiny_gguf)!r}, '-q', 'the', '--max-new-tokens', '190000',\n"
        "                               '--ignore-eos', '--quiet', '--device', 'cpu']))\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert len(lines) == 1 and "out of memory" in lines[0] and "memory plan" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr


def test_out_of_memory_mid_answer_under_an_address_space_limit_keeps_the_answer(tiny_gguf, tmp_path):
    """A real allocation failure in the middle of an answer: once three pieces of the answer are on
    stdout, the process caps its address space just above what it holds. The resident cache grows
    in steps (--adaptive-offload), so a later step cannot allocate: the answer so far stays on stdout
    and in --output, and one line says what the memory plan fits."""
    out = tmp_path / "answer.txt"
    script = tmp_path / "capped.py"
    script.write_text(
        "import resource, sys\n"
        "import specontext.cli\n"
        "class CapsMidAnswer:\n"
        "    def __init__(self, real):\n"
        "        self.real, self.writes = real, 0\n"
        "    def write(self, text):\n"
        "        self.writes += 1\n"
        "        if self.writes == 3:\n"
        "            vm = int([l for l in open('/proc/self/status') if l.startswith('VmSize')][0].split()[1]) * 1024\n"
        "            resource.setrlimit(resource.RLIMIT_AS, (vm + 2**20, resource.RLIM_INFINITY))\n"
        "        return self.real.write(text)\n"
        "    def __getattr__(self, name):\n"
        "        return getattr(self.real, name)\n"
        "sys.stdout = CapsMidAnswer(sys.stdout)\n"
        f"sys.exit(specontext.cli.main(['--model', {str(tiny_gguf)!r}, '-q', 'the', '--max-new-tokens', '190000',\n"
        "    '--ignore-eos', '--quiet', '--device', 'cpu', '--adaptive-offload', '--prefill-chunk-tokens', '64',\n"
        f"    '--output', {str(out)!r}]))\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert len(lines) == 1 and "out of memory after " in lines[0] and "fits at most" in lines[0], proc.stderr[-2000:]
    generated = int(lines[0].split("out of memory after ")[1].split()[0])
    assert generated > 3, lines[0]  # mid-answer, not at the cache's first allocation
    kept = out.read_text(encoding="utf-8")
    assert len(kept) > 20 and proc.stdout in (kept, kept + "\n")  # the CLI ends an answer with a newline
    assert sorted(os.listdir(tmp_path)) == ["answer.txt", "capped.py"]


def test_a_batch_whose_reader_goes_away_keeps_every_request_in_the_output(tiny_gguf, tmp_path):
    """`specontext-run --batch ... | head -1`: stdout closes after the first line; --output still
    gets every request, and the run ends with one line, no traceback."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"id": "a", "question": "the", "max_new_tokens": 2}\n'
                        '{"id": "b", "question": "in a", "max_new_tokens": 400}\n')
    out = tmp_path / "results.jsonl"
    cmd = cli_command()
    proc = subprocess.Popen([*cmd, "--model", tiny_gguf, "--batch", str(requests), "--ignore-eos", "--json",
                             "--output", str(out), "--quiet", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    proc.stdout.close()  # what `head -1` does
    stderr = proc.stderr.read()
    proc.wait(timeout=300)
    assert '"id": "a"' in first
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1 and "broken pipe" in stderr, stderr
    ids = [json.loads(line)["id"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(ids) == ["a", "b"]


@pytest.mark.parametrize("mode", [["-q", "the", "--max-new-tokens", "4", "--json"], ["--plan", "--context-tokens", "64"]])
def test_results_printed_to_a_closed_stdout_are_one_line(tiny_gguf, tmp_path, mode):
    """`specontext-run --json ... | head -c 0`: the reader is gone before the result is printed."""
    proc = subprocess.Popen([*cli_command(), "--model", tiny_gguf, *mode, "--device", "cpu", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    stderr = proc.stderr.read()
    proc.wait(timeout=300)
    assert proc.returncode == 130, stderr
    assert len(stderr.strip().splitlines()) == 1 and "broken pipe" in stderr and "Traceback" not in stderr, stderr
