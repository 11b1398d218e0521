"""Hugging Face model folders: config.json, safetensors (single or sharded), tokenizer files.

Tensors are opened memory-mapped with safetensors; nothing is ever unpickled (``*.bin`` and
``*.pt`` checkpoints are refused rather than loaded).
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError, safe_open

from ..config import ModelConfig
from ..errors import ModelFileError, malformed


def read_safetensors(folder: str) -> dict[str, torch.Tensor]:
    """Return every tensor of the folder's safetensors checkpoint (memory-mapped, CPU).

    Raises ModelFileError when the index names a missing shard, a file is truncated or has a bad
    header, or only pickle-based checkpoints exist.
    """
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelFileError(f"{index_path} is not a valid safetensors index: {exc}") from None
        shards = sorted(set(weight_map.values()))
    else:
        shards = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
        if not shards:
            pickled = [n for n in os.listdir(folder) if n.endswith((".bin", ".pt", ".pth"))]
            hint = f" (found {pickled[0]}, a pickle-based format specontext never loads)" if pickled else ""
            raise ModelFileError(f"no *.safetensors weights in {folder}{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        path = os.path.join(folder, shard)
        if not os.path.exists(path):
            raise ModelFileError(f"safetensors shard {shard} listed in the index is missing from {folder}")
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelFileError(f"{path} is not a valid safetensors file: {_first_line(exc)}") from None
    return tensors


def read_chat_template(folder: str) -> str | None:
    """Chat template from ``chat_template.jinja`` or ``tokenizer_config.json``, if any."""
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.exists(jinja):
        try:
            with open(jinja, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelFileError(f"cannot read chat template {jinja}: {exc}") from None
    cfg = read_tokenizer_config(folder)
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: use the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def read_tokenizer_config(folder: str) -> dict:
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{path} is not valid JSON: {exc}") from None
    return cfg if isinstance(cfg, dict) else {}


def read_generation_eos(folder: str) -> tuple[int, ...]:
    """EOS ids from generation_config.json (often more than config.json lists)."""
    path = os.path.join(folder, "generation_config.json")
    if not os.path.exists(path):
        return ()
    try:
        with open(path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return ()
    if isinstance(eos, int):
        return (eos,)
    return tuple(e for e in eos if isinstance(e, int)) if isinstance(eos, list) else ()


@malformed("config.json")
def load_hf_config(folder: str) -> ModelConfig:
    return ModelConfig.from_hf_file(os.path.join(folder, "config.json"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
