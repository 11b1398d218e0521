"""Coverage-guided fuzzing of every parser of an untrusted file (atheris; random mutation where
atheris is not installed). A finding is anything other than specontext's own typed errors
(``SpecontextError``): an uncaught exception, a hang over --timeout seconds, or memory past
--rss-limit-mb (a size field trusted before it was checked).

    python tests/fuzz/fuzz.py --list
    python tests/fuzz/fuzz.py gguf --seconds 600                # the long run of one target
    python tests/fuzz/fuzz.py all --seconds 600 --out fuzz.json # every target, 10 minutes each
    python tests/fuzz/fuzz.py batch --seconds 3                 # what CI runs for each target

Targets: gguf (header, metadata and tensor-info paths, then the model config and tensors),
gguf_tokenizer (the tokenizer built from GGUF metadata, then encoding a chat), safetensors
(headers), config (config.json -> ModelConfig), head (a retrieval-head artefact: its JSON or its
safetensors), onnx_head (an exported head's metadata), batch (--batch JSONL), profile (a device
profile JSON). The seed corpus is made at start from the installed default model and the shipped
head (their headers, truncated) and from small valid files built here; nothing is committed.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TARGETS = ("gguf", "gguf_tokenizer", "safetensors", "config", "head", "onnx_head", "batch", "profile")
HEAD_STEM = os.path.join(REPO, "models", "smollm2-135m-instruct")


# ---- targets: bytes in, nothing out; only SpecontextError may escape ---------------------------

def _write(workdir: str, name: str, data: bytes) -> str:
    path = os.path.join(workdir, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def target_gguf(data: bytes, workdir: str) -> None:
    from specontext.loaders.gguf_loader import GGUFFile

    f = GGUFFile(_write(workdir, "m.gguf", data))
    cfg = f.model_config()
    if sum(int(t.n_bytes) for t in f.tensors) <= 1 << 20:  # small files: every tensor too
        f.hf_tensors(cfg)


def target_gguf_tokenizer(data: bytes, workdir: str) -> None:
    from specontext.loaders.gguf_loader import GGUFFile
    from specontext.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_fields(GGUFFile(_write(workdir, "t.gguf", data)).meta)
    ids = tok.encode("Hello <|im_end|> world", parse_special=False)
    tok.decode(ids)
    if tok.chat_template:
        tok.encode_chat([{"role": "user", "content": "hi <|im_start|>"}])


def target_safetensors(data: bytes, workdir: str) -> None:
    from specontext.loaders.hf import read_safetensors

    folder = os.path.join(workdir, "st")
    os.makedirs(folder, exist_ok=True)
    _write(folder, "model.safetensors", data)
    read_safetensors(folder)


def target_config(data: bytes, workdir: str) -> None:
    from specontext.loaders.hf import load_hf_config

    folder = os.path.join(workdir, "cfg")
    os.makedirs(folder, exist_ok=True)
    _write(folder, "config.json", data)
    load_hf_config(folder)


def target_head(data: bytes, workdir: str) -> None:
    """The first byte picks the part fuzzed (even: the JSON, odd: the weights); the other is the
    shipped head's own."""
    from specontext.retrieval.head import load_head

    if not data:
        return
    part, body = data[0] % 2, data[1:]
    stem = os.path.join(workdir, "head")
    for i, ext in enumerate((".json", ".safetensors")):
        if i == part:
            _write(workdir, "head" + ext, body)
        else:
            with open(HEAD_STEM + ext, "rb") as src:
                _write(workdir, "head" + ext, src.read())
    load_head(stem + ".json")


def target_onnx_head(data: bytes, workdir: str) -> None:
    from specontext.retrieval.onnx_head import read_onnx_metadata

    read_onnx_metadata(_write(workdir, "head.onnx", data))


def target_batch(data: bytes, workdir: str) -> None:
    from specontext.cli import read_batch
    from specontext.settings import GenerationConfig

    _write(workdir, "doc.txt", b"A short document.")
    read_batch(_write(workdir, "requests.jsonl", data), GenerationConfig())


def target_profile(data: bytes, workdir: str) -> None:
    from specontext.planner.profiles import read_profile

    read_profile(_write(workdir, "profile.json", data))


# ---- seeds -------------------------------------------------------------------------------------

def _tiny_gguf(path: str) -> None:
    """A small, complete llama GGUF (tokenizer, chat template, every tensor) written here."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(path, "llama")
    E, L, H, G, I, V = 16, 1, 2, 1, 32, 300
    for key, value in (("block_count", L), ("context_length", 64), ("embedding_length", E),
                       ("feed_forward_length", I), ("attention.head_count", H), ("attention.head_count_kv", G)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    symbols = [chr(c) for c in range(33, 127)] + ["Ġ", "Ċ", "he", "Ġt", "Ġthe"]
    tokens = specials + symbols + [f"<extra_{i}>" for i in range(V - len(specials) - len(symbols))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * 3 + [1] * (V - 3))
    w.add_token_merges(["h e", "Ġ t", "Ġt he"])
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}<|im_start|>assistant\n")
    rng = np.random.default_rng(0)
    D = E // H
    shapes = {"token_embd.weight": (V, E), "output_norm.weight": (E,), "blk.0.attn_norm.weight": (E,),
              "blk.0.ffn_norm.weight": (E,), "blk.0.attn_q.weight": (H * D, E), "blk.0.attn_k.weight": (G * D, E),
              "blk.0.attn_v.weight": (G * D, E), "blk.0.attn_output.weight": (E, H * D),
              "blk.0.ffn_gate.weight": (I, E), "blk.0.ffn_up.weight": (I, E), "blk.0.ffn_down.weight": (E, I)}
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def seeds(target: str, workdir: str) -> list[bytes]:
    """Valid inputs and headers cut short, from the installed default model and shipped head."""
    out: list[bytes] = []
    if target in ("gguf", "gguf_tokenizer"):
        tiny = os.path.join(workdir, "seed.gguf")
        _tiny_gguf(tiny)
        with open(tiny, "rb") as f:
            out.append(f.read())
        try:
            from specontext.assets import default_model_path

            with open(default_model_path(), "rb") as f:
                head = f.read(1 << 16)
            out += [head, head[:4096]]
        except Exception:  # noqa: BLE001 - no default model installed: the tiny file is the seed
            pass
        out += [data[:n] for data in out[:1] for n in (24, 200, 2000)]
    elif target == "safetensors":
        import torch
        from safetensors.torch import save

        out.append(save({"a": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.ones(4, dtype=torch.int8)}))
        with open(HEAD_STEM + ".safetensors", "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            f.seek(0)
            out.append(f.read(8 + n + 64))
    elif target == "config":
        base = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 16,
                "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}}
        out += [json.dumps(base).encode(), json.dumps({**base, "model_type": "qwen3", "head_dim": 8}).encode()]
    elif target == "head":
        with open(HEAD_STEM + ".json", "rb") as f:
            out.append(b"\x00" + f.read())
        with open(HEAD_STEM + ".safetensors", "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            f.seek(0)
            out.append(b"\x01" + f.read(8 + n + 256))
    elif target == "onnx_head":
        out.append(b"\x08\x07\x12\x04test")  # a protobuf ModelProto prefix (ir_version 7, producer name)
    elif target == "batch":
        out.append(b'{"id": "a", "document": "doc.txt", "question": "What?"}\n{"prompt": "hi", "max_new_tokens": 4}\n'
                   b'{"text": "inline", "question": "Q", "seed": 3, "temperature": 0.5}\n')
    elif target == "profile":
        with open(os.path.join(REPO, "profiles", "jetson-orin-nano-8gb.json"), "rb") as f:
            out.append(f.read())
    return out


# ---- running -----------------------------------------------------------------------------------

def one_input(target: str, workdir: str):
    from specontext.errors import SpecontextError

    fn = globals()[f"target_{target}"]

    def test(data: bytes) -> None:
        try:
            fn(data, workdir)
        except SpecontextError:
            pass  # a typed, one-line error: the expected outcome for bad input

    return test


def run_atheris(target: str, seconds: int, timeout: int, rss_limit_mb: int, corpus: str, artifacts: str) -> int:
    import atheris

    # atheris instruments what the standard path finders load; an editable install's redirecting
    # finder would hand it specontext uninstrumented (no coverage), so the source tree on
    # PYTHONPATH is imported through the path finder instead
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
    with atheris.instrument_imports(include=["specontext", "gguf"]):
        import specontext.cli  # noqa: F401 - every module a target reaches, instrumented
        import specontext.loaders.gguf_loader  # noqa: F401
        import specontext.loaders.hf  # noqa: F401
        import specontext.planner.profiles  # noqa: F401
        import specontext.retrieval.head  # noqa: F401
        import specontext.retrieval.onnx_head  # noqa: F401
        import specontext.tokenizer  # noqa: F401
    workdir = tempfile.mkdtemp(prefix=f"fuzz-{target}-")
    atheris.Setup([sys.argv[0], corpus, f"-max_total_time={seconds}", f"-timeout={timeout}",
                   f"-rss_limit_mb={rss_limit_mb}", f"-artifact_prefix={artifacts}/", "-print_final_stats=1"],
                  one_input(target, workdir))
    atheris.Fuzz()  # exits the process: 0 when no finding
    return 0


def run_random(target: str, seconds: int, corpus: str) -> int:
    """Without atheris: seeds mutated at random (bytes flipped, cut, repeated, spliced)."""
    import random

    workdir = tempfile.mkdtemp(prefix=f"fuzz-{target}-")
    test = one_input(target, workdir)
    pool = [open(os.path.join(corpus, n), "rb").read() for n in sorted(os.listdir(corpus))] or [b""]
    rng, end, runs = random.Random(0), time.time() + seconds, 0
    while time.time() < end:
        data = bytearray(rng.choice(pool))
        for _ in range(rng.randint(1, 8)):
            op = rng.randrange(4)
            if op == 0 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif op == 1 and data:
                del data[rng.randrange(len(data)):]
            elif op == 2 and data:
                i = rng.randrange(len(data))
                data[i:i] = data[i:i + rng.randint(1, 64)] * rng.randint(1, 4)
            else:
                data += rng.choice(pool)[:rng.randint(0, 64)]
        test(bytes(data))
        runs += 1
    print(f"random mutation: {runs} inputs, no finding", flush=True)
    return 0


def fuzz_one(target: str, args) -> dict:
    """Run one target in its own process (a finding or a limit ends only that process)."""
    corpus = os.path.join(args.work, target, "corpus")
    artifacts = os.path.join(args.work, target, "findings")
    os.makedirs(corpus, exist_ok=True)
    os.makedirs(artifacts, exist_ok=True)
    for i, data in enumerate(seeds(target, os.path.join(args.work, target))):
        with open(os.path.join(corpus, f"seed{i}"), "wb") as f:
            f.write(data)
    cmd = [sys.executable, __file__, target, "--child", "--seconds", str(args.seconds), "--timeout", str(args.timeout),
           "--rss-limit-mb", str(args.rss_limit_mb), "--work", args.work]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.seconds + 300,
                          env={**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")})
    log = proc.stdout + proc.stderr
    stats = {}
    for line in log.splitlines():  # libFuzzer's final stats: "stat::number_of_executed_units: 1234"
        if line.startswith("stat::"):
            key, _, value = line[len("stat::"):].partition(":")
            if value.strip().isdigit():
                stats[key.strip()] = int(value.strip())
    findings = sorted(os.listdir(artifacts))
    cov = [line for line in log.splitlines() if " cov: " in line]
    return {"target": target, "exit": proc.returncode, "seconds": round(time.time() - t0, 1),
            "engine": "atheris" if "INFO: Seed:" in log else "random",
            "executions": stats.get("number_of_executed_units"), "coverage": cov[-1].split(" cov: ")[1].split()[0]
            if cov else None, "findings": findings, "log_tail": log.strip().splitlines()[-15:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="?", choices=TARGETS + ("all",))
    p.add_argument("--list", action="store_true", help="print the targets")
    p.add_argument("--seconds", type=int, default=600)
    p.add_argument("--timeout", type=int, default=5, help="seconds one input may take before it counts as a hang")
    p.add_argument("--rss-limit-mb", type=int, default=3072, help="the process's memory limit (the baseline with "
                   "torch is about 1 GiB, so this allows about 2 GiB triggered by one input)")
    p.add_argument("--work", default=None, help="corpus and findings folder (default: a temporary one)")
    p.add_argument("--out", help="write the results as JSON")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(TARGETS))
        return 0
    if not args.target:
        p.error("name a target (or all); --list shows them")
    if args.child:
        corpus = os.path.join(args.work, args.target, "corpus")
        try:
            import atheris  # noqa: F401
        except ImportError:
            return run_random(args.target, args.seconds, corpus)
        return run_atheris(args.target, args.seconds, args.timeout, args.rss_limit_mb, corpus,
                           os.path.join(args.work, args.target, "findings"))
    args.work = args.work or tempfile.mkdtemp(prefix="specontext-fuzz-")
    results = []
    for target in TARGETS if args.target == "all" else (args.target,):
        r = fuzz_one(target, args)
        results.append(r)
        print(f"{target:15s} exit {r['exit']}  {r['engine']}  executions {r['executions']}  coverage {r['coverage']}  "
              f"findings {len(r['findings'])}  ({r['seconds']} s)", flush=True)
        if r["exit"] != 0:
            print("\n".join(r["log_tail"]), flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"work": args.work, "results": results}, f, indent=1)
    return 0 if all(r["exit"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
