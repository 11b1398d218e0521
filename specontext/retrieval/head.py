"""The retrieval head: a small Q/K-only attention module that predicts where the target attends.

Shape letters: B batch, T tokens, E target hidden size, H the head's query heads, Gh the head's
own KV heads, G the target's KV heads, D the head's head dim, S cached positions.

The head sees, at position p, the target's embedding of token p and (``input_kind`` =
``embedding+hidden``) a linear fusion of the target's hidden states at position p - 1 taken after
the layers named in ``hidden_layers``: exactly what is known once token p has been sampled and
before the target runs it. Its keys for every position live in its own K-only cache; its scores
are softmax(q . K^T / sqrt(D)) per query head, and query head h votes for target KV head
``kv_group_of_head[h]``.

An artefact is two files side by side: ``NAME.safetensors`` (weights) and ``NAME.json`` (a
:class:`RetrievalHeadConfig`, including the target it belongs to and its weights' fingerprint).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from ..config import ModelConfig, RopeConfig
from ..errors import InputError, ModelFileError, malformed
from ..model.norm import RMSNorm
from ..model.rope import RotaryEmbedding, apply_rotary

FORMAT_VERSION = 1
INPUT_KINDS = ("embedding", "embedding+hidden")
# Tensors hashed into a target fingerprint: the token embedding and the final norm, rounded to
# bfloat16 so the same checkpoint gives the same fingerprint whatever dtype it was loaded in.
FINGERPRINT_TENSORS = ("model.embed_tokens.weight", "model.norm.weight")


def target_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 (hex, first 16 bytes) of the target's embedding and final norm, as bfloat16.

    ``tensors`` are Hugging Face-named checkpoint tensors (any float dtype, CPU).
    """
    digest = hashlib.sha256()
    for name in FINGERPRINT_TENSORS:
        if name not in tensors:
            raise ModelFileError(f"cannot fingerprint the model: tensor {name!r} is missing")
        t = tensors[name]
        digest.update(name.encode() + str(tuple(t.shape)).encode())
        # by rows: no bf16 copy of a whole embedding table at once; GGUF blocks (--weights gguf)
        # are read as the float32 values the other formats load
        chunks = t.float_chunks(4096) if hasattr(t, "float_chunks") else t.detach().split(4096)
        for rows in chunks:
            digest.update(rows.to(device="cpu", dtype=torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:32]


def fingerprint_once(tensors) -> str:
    """:func:`target_fingerprint` of a checkpoint mapping, leaving the fingerprinted tensors in it
    as values: a lazy mapping (a GGUF's ``LazyTensors``) then reads each of them once, here."""
    seen = {name: tensors.pop(name) for name in FINGERPRINT_TENSORS if name in tensors}
    tensors.update(seen)
    return target_fingerprint(seen)


@dataclass(frozen=True)
class TargetInfo:
    """The model a head belongs to; a head is refused by any model whose info differs."""

    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    fingerprint: str
    name: str = ""

    @classmethod
    def of(cls, cfg: ModelConfig, fingerprint: str, name: str = "") -> "TargetInfo":
        return cls(cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                   cfg.head_dim, cfg.vocab_size, fingerprint, name)

    def mismatch(self, other: "TargetInfo") -> str | None:
        """The first field (other than ``name``) that differs, as 'field: ours vs theirs'; else None."""
        for f in fields(self):
            if f.name != "name" and getattr(self, f.name) != getattr(other, f.name):
                return f"{f.name} {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}"
        return None

    def describe(self) -> str:
        label = self.name or self.architecture
        return (f"{label} ({self.num_layers} layers, hidden {self.hidden_size}, {self.num_heads}/{self.num_kv_heads} "
                f"heads, vocab {self.vocab_size}, fingerprint {self.fingerprint[:12]})")


@dataclass(frozen=True)
class RetrievalHeadConfig:
    """Everything needed to rebuild a head and check it against its target.

    Attributes:
        target: the model it was made for.
        input_kind: ``embedding`` or ``embedding+hidden``.
        hidden_layers: target layers whose outputs (0-based) are fused, in fc input order.
        num_heads, num_kv_heads, head_dim: the head's own attention shape.
        kv_group_of_head: for each query head, the target KV head its scores select for.
        rope: the head's rotary parameters (may scale positions beyond what it was trained on).
        rms_norm_eps, qk_bias: norm epsilon; whether q/k projections have a bias.
        trained_context_tokens: the longest sequence it was trained on (the original context
            for ``rope`` scaling when the RoPE config does not name one).
        source: how it was made (``distilled``, ``eagle3``).
        quality: measurements saved with it (free-form numbers).
    """

    target: TargetInfo
    input_kind: str
    hidden_layers: tuple[int, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    kv_group_of_head: tuple[int, ...]
    rope: RopeConfig = field(default_factory=RopeConfig)
    rms_norm_eps: float = 1e-5
    qk_bias: bool = False
    trained_context_tokens: int = 2048
    source: str = "distilled"
    quality: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.input_kind not in INPUT_KINDS:
            raise ModelFileError(f"retrieval head input_kind must be one of {INPUT_KINDS}, got {self.input_kind!r}")
        if self.input_kind == "embedding+hidden" and not self.hidden_layers:
            raise ModelFileError("retrieval head input_kind 'embedding+hidden' needs hidden_layers")
        bad = [i for i in self.hidden_layers if not 0 <= i < self.target.num_layers]
        if bad:
            raise ModelFileError(f"retrieval head hidden_layers has {bad[0]}, outside the target's "
                                 f"{self.target.num_layers} layers")
        if min(self.num_heads, self.num_kv_heads, self.head_dim) < 1 or self.num_heads % self.num_kv_heads:
            raise ModelFileError(f"retrieval head has {self.num_heads} query heads and {self.num_kv_heads} KV heads; "
                                 "both must be >= 1 and the first a multiple of the second")
        if len(self.kv_group_of_head) != self.num_heads:
            raise ModelFileError(f"kv_group_of_head has {len(self.kv_group_of_head)} entries, "
                                 f"the head has {self.num_heads} query heads")
        groups = self.target.num_kv_heads
        per_group = self.num_heads // groups if self.num_heads % groups == 0 else 0
        if not per_group or tuple(self.kv_group_of_head) != tuple(h // per_group for h in range(self.num_heads)):
            raise ModelFileError(
                f"kv_group_of_head must give each of the target's {groups} KV heads an equal, contiguous run of "
                f"query heads (h // {per_group or '?'}); got {list(self.kv_group_of_head)}")
        if self.format_version != FORMAT_VERSION:
            raise ModelFileError(f"retrieval head format_version {self.format_version} is not supported "
                                 f"(this release reads {FORMAT_VERSION})")

    @property
    def input_width(self) -> int:
        e = self.target.hidden_size
        return 2 * e if self.input_kind == "embedding+hidden" else e

    def to_dict(self) -> dict:
        out = asdict(self)
        out["hidden_layers"] = list(self.hidden_layers)
        out["kv_group_of_head"] = list(self.kv_group_of_head)
        rope = out["rope"]
        if rope.get("freq_factors") is not None:
            rope["freq_factors"] = list(rope["freq_factors"])
        return out

    @classmethod
    def from_dict(cls, d: dict, where: str = "retrieval head config") -> "RetrievalHeadConfig":
        try:
            d = dict(d)
            target = TargetInfo(**d.pop("target"))
            rope_d = dict(d.pop("rope", {}))
            if rope_d.get("freq_factors") is not None:
                rope_d["freq_factors"] = tuple(rope_d["freq_factors"])
            rope = RopeConfig(**rope_d)
            return cls(target=target, rope=rope, hidden_layers=tuple(d.pop("hidden_layers", ())),
                       kv_group_of_head=tuple(d.pop("kv_group_of_head")), **d)
        except (KeyError, TypeError) as exc:
            raise ModelFileError(f"{where} is malformed: {' '.join(str(exc).split())}") from None


class RetrievalHead(nn.Module):
    """Q/K projections (plus input norms and the optional hidden-state fusion) of a retrieval head.

    Parameter names follow EAGLE-3 draft checkpoints where they overlap (``fc``, ``hidden_norm``,
    ``input_layernorm``, ``q_proj``, ``k_proj``); the embedding is the target's and is passed in.

    Example::

        head = RetrievalHead(cfg)
        x = head.inputs(embeds, hidden)              # [B, T, E] (+ [B, T, L*E]) -> [B, T, in]
        q, k = head.project(x, positions)            # [B, H, T, D], [B, Gh, T, D]
    """

    def __init__(self, cfg: RetrievalHeadConfig):
        super().__init__()
        self.config = cfg
        e = cfg.target.hidden_size
        self.input_layernorm = RMSNorm(e, cfg.rms_norm_eps)
        if cfg.input_kind == "embedding+hidden":
            self.fc = nn.Linear(len(cfg.hidden_layers) * e, e, bias=False)
            self.hidden_norm = RMSNorm(e, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(cfg.input_width, cfg.num_heads * cfg.head_dim, bias=cfg.qk_bias)
        self.k_proj = nn.Linear(cfg.input_width, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qk_bias)
        self._rotary: dict = {}
        self.path: str | None = None  # the artefact's .json when loaded from one

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def rotary(self, device: torch.device) -> RotaryEmbedding:
        if device not in self._rotary:
            self._rotary[device] = RotaryEmbedding(self.config.rope, self.config.head_dim,
                                                   self.config.trained_context_tokens, device=device)
        return self._rotary[device]

    def inputs(self, embeds: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
        """Head input [B, T, in] from target embeddings [B, T, E] and fused-layer hidden states.

        ``hidden`` is [B, T, L*E]: for each position p, the target's outputs at p - 1 of the
        ``hidden_layers`` concatenated in order (zeros at position 0); ignored for ``embedding``.
        """
        x = self.input_layernorm(embeds)
        if self.config.input_kind == "embedding":
            return x
        return torch.cat([x, self.hidden_norm(self.fc(hidden))], dim=-1)

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Roped queries [B, H, T, D] and keys [B, Gh, T, D] for inputs x [B, T, in] at positions [B, T]."""
        cfg = self.config
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        cos, sin = self.rotary(x.device)(positions, x.dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def group_probs(self, q: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Per-target-KV-head scores over cached positions.

        Args:
            q: [B, H, Tq, D] queries; keys: [B, Gh, S, D] the head's cached keys.
            valid: optional bool [B, 1 or Tq, S], True where a position may be scored.
        Returns:
            [B, G, Tq, S] float32: per query head softmax(q . K^T / sqrt(D)), max over the query
            heads that vote for each target KV head.
        """
        cfg = self.config
        B, H, Tq, D = q.shape
        Gh = cfg.num_kv_heads
        qf = q.reshape(B, Gh, (H // Gh) * Tq, D).float()
        logits = torch.matmul(qf, keys.float().transpose(-1, -2)) * D ** -0.5  # [B, Gh, H/Gh*Tq, S]
        logits = logits.view(B, H, Tq, -1)
        if valid is not None:
            logits = logits.masked_fill(~valid[:, None], float("-inf"))
        probs = logits.softmax(dim=-1).nan_to_num(0.0)
        G = cfg.target.num_kv_heads
        return probs.view(B, G, H // G, Tq, -1).amax(dim=2)


def head_paths(path: str) -> tuple[str, str]:
    """(weights, config) paths of an artefact given either file or the common stem."""
    stem = path
    for ext in (".safetensors", ".json"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    return stem + ".safetensors", stem + ".json"


def save_head(head: RetrievalHead, path: str, dtype: torch.dtype = torch.float32) -> tuple[str, str]:
    """Write ``head`` as ``STEM.safetensors`` (weights in ``dtype``) + ``STEM.json``; returns both paths.

    Each file is written to ``.partial`` first and renamed, so an interrupted save leaves no torn file.
    """
    from safetensors.torch import save_file

    weights_path, config_path = head_paths(path)
    os.makedirs(os.path.dirname(os.path.abspath(weights_path)), exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in head.state_dict().items()}
    save_file(state, weights_path + ".partial", metadata={"format": "specontext-retrieval-head"})
    with open(config_path + ".partial", "w") as f:
        json.dump(head.config.to_dict(), f, indent=2, sort_keys=True)
        f.write("\n")
    umask = os.umask(0)
    os.umask(umask)
    for partial in (weights_path + ".partial", config_path + ".partial"):
        os.chmod(partial, 0o666 & ~umask)  # safetensors creates 0600; give the user's usual mode
    os.replace(weights_path + ".partial", weights_path)
    os.replace(config_path + ".partial", config_path)
    return weights_path, config_path


def read_head_config(path: str) -> RetrievalHeadConfig:
    _, config_path = head_paths(path)
    if not os.path.isfile(config_path):
        raise ModelFileError(f"retrieval head config not found: {config_path} (an artefact is NAME.safetensors "
                             "plus NAME.json)")
    try:
        with open(config_path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"cannot read retrieval head config {config_path}: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"retrieval head config {config_path} must hold a JSON object")
    return RetrievalHeadConfig.from_dict(data, where=config_path)


@malformed("the retrieval head artefact")
def load_head(path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              target: TargetInfo | None = None) -> RetrievalHead:
    """Load an artefact; with ``target`` given, refuse a head made for another model.

    Raises:
        ModelFileError: missing or malformed files, or tensors that do not match the config.
        InputError: the head belongs to a different model than ``target``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg = read_head_config(path)
    if target is not None:
        diff = cfg.target.mismatch(target)
        if diff:
            raise InputError(f"retrieval head {head_paths(path)[1]} was made for {cfg.target.describe()}, not for "
                             f"this model ({diff}); train one with specontext-distill")
    weights_path, _ = head_paths(path)
    if not os.path.isfile(weights_path):
        raise ModelFileError(f"retrieval head weights not found: {weights_path}")
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError) as exc:
        raise ModelFileError(f"cannot read retrieval head weights {weights_path}: {' '.join(str(exc).split())}") from None
    head = RetrievalHead(cfg)
    expected = head.state_dict()
    for name, value in expected.items():
        if name not in state:
            raise ModelFileError(f"retrieval head {weights_path} is missing tensor {name!r}")
        if tuple(state[name].shape) != tuple(value.shape):
            raise ModelFileError(f"retrieval head tensor {name!r} has shape {tuple(state[name].shape)}, "
                                 f"the config implies {tuple(value.shape)}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ModelFileError(f"retrieval head {weights_path} has unexpected tensor {extra[0]!r}")
    head.load_state_dict(state, strict=True)
    head.path = os.path.abspath(head_paths(path)[1])
    return head.to(device=device, dtype=dtype).eval().requires_grad_(False)


HEAD_DIR_ENV_VAR = "SPECONTEXT_HEAD_DIR"
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def user_head_dir() -> str:
    """Where specontext-distill saves heads by default (``$XDG_CACHE_HOME/specontext/heads``)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "specontext", "heads")


def head_search_dirs() -> list[str]:
    """Folders ``auto`` looks in, in order: $SPECONTEXT_HEAD_DIR, the user's heads, the shipped heads."""
    dirs = [d for d in os.environ.get(HEAD_DIR_ENV_VAR, "").split(os.pathsep) if d]
    dirs.append(user_head_dir())
    dirs.append(os.path.join(_PACKAGE_DIR, "models"))  # installed with the package
    dirs.append(os.path.join(os.path.dirname(_PACKAGE_DIR), "models"))  # a source checkout
    return dirs


def iter_head_configs():
    """(path, config) of every readable head artefact in :func:`head_search_dirs`, in search order."""
    for folder in head_search_dirs():
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".json"):
                continue
            path = os.path.join(folder, name)
            try:
                yield path, read_head_config(path)
            except ModelFileError:
                continue  # not a head (or a broken one): auto skips it; naming it explicitly reports why


def find_head(target: TargetInfo) -> str | None:
    """The first artefact in :func:`head_search_dirs` made for ``target`` (its .json path), or None."""
    for path, cfg in iter_head_configs():
        if cfg.target.mismatch(target) is None and os.path.isfile(head_paths(path)[0]):
            return path
    return None


def resolve_head(spec: str, target: TargetInfo, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> RetrievalHead:
    """Load the head named by ``spec`` (a path, or ``auto``) for ``target``.

    Raises:
        InputError: ``auto`` found no head for this model (says how to make one), or the named
            head belongs to another model.
        ModelFileError: the named artefact is missing or malformed.
    """
    if spec == "auto":
        path = find_head(target)
        if path is None:
            raise InputError(
                f"no retrieval head for this model (fingerprint {target.fingerprint[:12]}) in "
                f"{', '.join(head_search_dirs())}; make one with `specontext-distill --model MODEL` (it saves to "
                f"{user_head_dir()}), or pass --retrieval-head PATH")
    else:
        path = spec
    return load_head(path, device=device, dtype=dtype, target=target)
