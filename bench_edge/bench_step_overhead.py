"""Per-step Python overhead: decode steps of a tiny model, where compute is negligible.

The model is a random Llama-shaped model as deep as the default one (30 layers) but 64 wide, with
a 512-word vocabulary, so a step's time is almost all host work: planning, selection, per-layer
dispatch, gathering, sampling, detokenising. The
same measurement runs on this tree and, in a subprocess, on a baseline commit checked out in a
temporary git worktree (``--baseline REF``), so the ratio comes from one run on one machine.

Measured per configuration: the mean decode step (``decode_s / decode_steps`` from the public
API's stats) over ``--steps`` tokens after a prompt of ``--prompt`` tokens, best of ``--repeats``:
- dense;
- specontext with a budget the context outgrows (sparse steps);
- specontext with a budget above the context (the head runs, every step is dense).

With ``--compile`` this tree is also measured with ``compile_decode="on"`` (torch.compile of the
step; the first, compiling run is the warm-up).

    python bench_edge/bench_step_overhead.py --baseline 3a227c3 --out bench_edge/results/step_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=30, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)


def write_tiny_model(folder: str) -> None:
    """A random tiny llama as a Hugging Face folder (config, safetensors, word-level tokenizer)."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                   "rope_theta": 10000.0, "tie_word_embeddings": False, **SHAPE}, f)
    E, I, V, L = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"], SHAPE["num_hidden_layers"]
    D = E // SHAPE["num_attention_heads"]
    G = SHAPE["num_key_value_heads"]
    g = torch.Generator().manual_seed(0)
    w = {"model.embed_tokens.weight": (V, E), "lm_head.weight": (V, E), "model.norm.weight": (E,)}
    for i in range(L):
        p = f"model.layers.{i}."
        w.update({p + "self_attn.q_proj.weight": (E, E), p + "self_attn.k_proj.weight": (G * D, E),
                  p + "self_attn.v_proj.weight": (G * D, E), p + "self_attn.o_proj.weight": (E, E),
                  p + "mlp.gate_proj.weight": (I, E), p + "mlp.up_proj.weight": (I, E),
                  p + "mlp.down_proj.weight": (E, I), p + "input_layernorm.weight": (E,),
                  p + "post_attention_layernorm.weight": (E,)})
    save_file({k: (1.0 + 0.1 * torch.randn(s, generator=g)) if len(s) == 1 else 0.15 * torch.randn(s, generator=g)
               for k, s in w.items()}, os.path.join(folder, "model.safetensors"))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, V)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)


def write_head(llm, path: str) -> None:
    """A random retrieval head for the tiny model (embedding + both layers' hidden states)."""
    import torch
    from specontext.retrieval.head import RetrievalHead, RetrievalHeadConfig, save_head

    cfg = RetrievalHeadConfig(target=llm.target, input_kind="embedding+hidden", hidden_layers=(0, 1), num_heads=4,
                              num_kv_heads=2, head_dim=16, kv_group_of_head=(0, 0, 1, 1))
    torch.manual_seed(0)
    head = RetrievalHead(cfg)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.3)
    save_head(head, path)


def measure(folder: str, prompt: int, steps: int, repeats: int, extra: dict | None = None, device: str = "cpu",
            configs: tuple[str, ...] | None = None) -> dict:
    """Mean decode step time per configuration on the specontext importable here (seconds);
    ``extra``: more load options for every configuration (e.g. compile_decode); ``configs``: a
    subset of the configurations."""
    import torch
    from torch._dynamo.utils import counters

    import specontext

    torch.set_num_threads(1)
    ids = torch.randint(3, SHAPE["vocab_size"], (prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    head = os.path.join(folder, "head")
    only = configs
    configs = {"dense": dict(sparsity="dense"),
               "specontext_sparse": dict(sparsity="specontext", retrieval_head=head, budget_tokens=prompt // 4),
               "specontext_fits": dict(sparsity="specontext", retrieval_head=head, budget_tokens=2 * (prompt + steps))}
    out = {}
    if not os.path.exists(head + ".json"):
        write_head(specontext.load(folder, device=device), head)
    for name, opts in configs.items():
        if only is not None and name not in only:
            continue
        llm = specontext.load(folder, device=device, **opts, **(extra or {}))
        best = None
        skips = counters["inductor"]["cudagraph_skips"]
        for _ in range(repeats + 1):  # the first run warms up
            result = llm.generate(ids, chat=False, max_new_tokens=steps + 1, ignore_eos=True)
            stats = result.stats
            per_step = stats.decode_s / max(stats.decode_steps, 1)
            best = per_step if best is None else min(best, per_step)
        out[name] = {"step_s": round(best, 6), "sparse_steps": stats.sparsity.get("sparse_steps"),
                     "dense_steps": stats.sparsity.get("dense_steps"), "token_ids": list(result.token_ids),
                     # graphs torch declined to capture (each falls back to the compiled step, uncaptured)
                     "cudagraph_skips": counters["inductor"]["cudagraph_skips"] - skips}
    return out


def run_baseline(ref: str, folder: str, args) -> dict:
    """The same measurement on ``ref``, from a temporary worktree, in a subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = os.path.join(tmp, "baseline")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", tree, ref], check=True, capture_output=True)
        try:
            import specontext.native as native

            env = {**os.environ, "PYTHONPATH": tree, "SPECONTEXT_NATIVE_LIB": native.library_path()}
            code = (f"import sys, json; sys.path.insert(0, {HERE!r}); import bench_step_overhead as b; "
                    f"print(json.dumps(b.measure({folder!r}, {args.prompt}, {args.steps}, {args.repeats})))")
            proc = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True,
                                  check=True)
            return json.loads(proc.stdout.strip().splitlines()[-1])
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", default=None, help="a git ref to measure the same way, for the ratio")
    parser.add_argument("--compile", action="store_true", help="also measure this tree with compile_decode=on")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the GPU check measures eager, compiled and "
                        "captured steps there: --modes off,on,cuda-graph)")
    parser.add_argument("--modes", default=None, help="compile_decode modes to measure this tree with (default: off, "
                        "and on with --compile)")
    parser.add_argument("--configs", default=None, help="a subset of dense,specontext_sparse,specontext_fits")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sys.path.insert(0, HERE)
    from machine import describe

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "tiny")
        write_tiny_model(folder)
        only = tuple(args.configs.split(",")) if args.configs else None
        modes = args.modes.split(",") if args.modes else ["off"] + (["on"] if args.compile else [])
        result = {"benchmark": f"per-step overhead (tiny model, 1 thread, {args.device})", "machine": describe(),
                  "settings": vars(args), "model": SHAPE}
        for mode in modes:
            key = {"off": "this_tree", "on": "this_tree_compiled"}.get(mode, f"this_tree_{mode}")
            try:
                result[key] = measure(folder, args.prompt, args.steps, args.repeats, {"compile_decode": mode},
                                      args.device, only)
            except Exception as exc:  # noqa: BLE001 - one mode failing (e.g. capture) leaves the others
                result[key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            if args.out:  # what was measured so far survives a time limit
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=1)
        eager = result.get("this_tree", {})
        for key in [k for k in result if k.startswith("this_tree_")]:
            for name, row in result[key].items():  # a compiled or captured step must give eager's tokens
                if isinstance(row, dict) and name in eager:
                    row["tokens_equal_eager"] = row["token_ids"] == eager[name]["token_ids"]
        if args.baseline:
            result["baseline"] = {"ref": args.baseline, **run_baseline(args.baseline, folder, args)}
            for mine in [k for k in result if k.startswith("this_tree") and "error" not in result[k]]:
                result[f"ratio_baseline_over_{mine}"] = {
                    k: round(result["baseline"][k]["step_s"] / v["step_s"], 3) for k, v in result[mine].items()}
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
