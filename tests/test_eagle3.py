"""EAGLE-3 import: a tiny draft with EAGLE-3's tensor names and shapes becomes a retrieval head whose
q and k equal a float32 reference computed straight from the draft's tensors."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from specontext.api import load_model_files
from specontext.errors import InputError, ModelFileError, UnsupportedModelError
from specontext.retrieval.head import TargetInfo, load_head, target_fingerprint
from specontext.tools.eagle3 import default_hidden_layers, import_eagle3, main, resolve_hidden_layers

from conftest import make_hf_model

# The tiny target: 8 layers so EAGLE-3's default layers (1, N//2-1, N-4) = (1, 3, 4) are distinct.
E, VOCAB, TARGET_LAYERS = 48, 96, 8
# The draft: its own head shape (4 query heads, 2 KV heads, head_dim 16 != the target's 8).
H, GH, D, INTER, DRAFT_VOCAB = 4, 2, 16, 64, 32


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("target"))
    make_hf_model("llama", folder, hidden_size=E, num_attention_heads=6, num_key_value_heads=2,
                  num_hidden_layers=TARGET_LAYERS, vocab_size=VOCAB)
    cfg, tensors, _ = load_model_files(folder)
    info = TargetInfo.of(cfg, target_fingerprint(tensors), name="tiny")
    return {"path": folder, "info": info, "embed": tensors["model.embed_tokens.weight"].float()}


def draft_tensors(seed: int = 0, hidden: int = E, dtype=torch.bfloat16, embed: torch.Tensor | None = None) -> dict:
    """EAGLE-3 draft tensors (names and shapes as SafeAILab/EAGLE's cnets.py Model) with random weights."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape, scale=0.15):
        return (scale * torch.randn(shape, generator=g)).to(dtype)

    def norm():
        return (1.0 + 0.2 * torch.randn(hidden, generator=g)).to(dtype)

    t = {
        "fc.weight": w(hidden, 3 * hidden),
        "midlayer.hidden_norm.weight": norm(),
        "midlayer.input_layernorm.weight": norm(),
        "midlayer.self_attn.q_proj.weight": w(H * D, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": w(GH * D, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": w(GH * D, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": w(hidden, H * D),
        "midlayer.post_attention_layernorm.weight": norm(),
        "midlayer.mlp.gate_proj.weight": w(INTER, hidden),
        "midlayer.mlp.up_proj.weight": w(INTER, hidden),
        "midlayer.mlp.down_proj.weight": w(hidden, INTER),
        "norm.weight": norm(),
        "lm_head.weight": w(DRAFT_VOCAB, hidden),
        "d2t": torch.arange(DRAFT_VOCAB, dtype=torch.int64),
        "t2d": torch.arange(VOCAB) < DRAFT_VOCAB,
    }
    if embed is not None:
        t["embed_tokens.weight"] = embed.to(dtype)
    return t


def draft_config(hidden: int = E, **extra) -> dict:
    """config.json as an EAGLE-3 draft ships it (LlamaForCausalLMEagle3, one layer, draft_vocab_size)."""
    cfg = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_act": "silu",
           "hidden_size": hidden, "intermediate_size": INTER, "num_attention_heads": H, "num_key_value_heads": GH,
           "head_dim": D, "num_hidden_layers": 1, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
           "rope_theta": 500000.0, "vocab_size": VOCAB, "draft_vocab_size": DRAFT_VOCAB,
           "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    cfg.update(extra)
    return cfg


def write_draft(folder, tensors: dict, config: dict, shards: int = 1) -> str:
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    if shards == 1:
        save_file(tensors, os.path.join(folder, "model.safetensors"))
        return folder
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, os.path.join(folder, shard))
        weight_map.update({n: shard for n in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return folder


# -- the float32 reference: EAGLE-3's midlayer up to q/k, from the checkpoint tensors --------------


def rms(x, w, eps=1e-5):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x, positions, theta, scale=1.0):
    # x [B, heads, T, D]; half-split rotation as Llama checkpoints; linear scaling divides positions
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = (positions.double()[:, None, :, None] / scale) * inv  # [B, 1, T, D/2]
    cos, sin = ang.cos().float(), ang.sin().float()
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def reference_qk(t: dict, embeds, hidden, positions, theta, scale=1.0):
    f = {k: v.float() for k, v in t.items()}
    B, T, _ = embeds.shape
    fused = hidden @ f["fc.weight"].T
    x = torch.cat([rms(embeds, f["midlayer.input_layernorm.weight"]),
                   rms(fused, f["midlayer.hidden_norm.weight"])], dim=-1)
    q = (x @ f["midlayer.self_attn.q_proj.weight"].T).view(B, T, H, D).transpose(1, 2)
    k = (x @ f["midlayer.self_attn.k_proj.weight"].T).view(B, T, GH, D).transpose(1, 2)
    return rope(q, positions, theta, scale), rope(k, positions, theta, scale)


def numel(t: dict, *names) -> int:
    return sum(t[n].numel() for n in names)


# -- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("rope_extra, theta, scale", [
    ({}, 500000.0, 1.0),
    ({"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 4.0}}, 10000.0, 4.0),
])
def test_head_qk_match_the_draft(tmp_path, target, rope_extra, theta, scale):
    t = draft_tensors()
    draft = write_draft(tmp_path / "draft", t, draft_config(**rope_extra))
    report = import_eagle3(draft, target["info"], str(tmp_path / "head"))
    head = load_head(str(tmp_path / "head"), target=target["info"])
    cfg = head.config
    assert (cfg.source, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == ("eagle3", H, GH, D)
    assert cfg.kv_group_of_head == (0, 0, 1, 1)  # 4 query heads over the target's 2 KV heads
    assert cfg.hidden_layers == report.hidden_layers == (1, 3, 4)
    assert cfg.trained_context_tokens == 256 and cfg.rope.theta == theta

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 5), generator=g)
    embeds = target["embed"][ids]
    hidden = torch.randn(2, 5, 3 * E, generator=g)
    positions = torch.stack([torch.arange(3, 8), torch.arange(200, 205)])  # nonzero, and past 128
    q, k = head.project(head.inputs(embeds, hidden), positions)
    q_ref, k_ref = reference_qk(t, embeds, hidden, positions, theta, scale)
    torch.testing.assert_close(q, q_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(k, k_ref, atol=2e-5, rtol=1e-5)


def test_parameter_reduction(tmp_path, target):
    t = draft_tensors(embed=target["embed"])
    draft = write_draft(tmp_path / "draft", t, draft_config())
    report = import_eagle3(draft, target["info"], str(tmp_path / "head"), target_embed=target["embed"])
    # Hand-counted from the shapes: fc [E, 3E], two norms [E], q [H*D, 2E], k [Gh*D, 2E].
    kept = E * 3 * E + 2 * E + H * D * 2 * E + GH * D * 2 * E
    dropped = {"v_proj": GH * D * 2 * E, "o_proj": E * H * D, "post_attention_layernorm": E,
               "mlp": 3 * INTER * E, "final_norm": E, "lm_head": DRAFT_VOCAB * E}
    assert report.kept_parameters == kept == numel(t, "fc.weight", "midlayer.hidden_norm.weight",
                                                   "midlayer.input_layernorm.weight",
                                                   "midlayer.self_attn.q_proj.weight",
                                                   "midlayer.self_attn.k_proj.weight")
    assert report.dropped_parameters == dropped
    assert report.draft_parameters == kept + sum(dropped.values())
    assert report.parameter_reduction == pytest.approx(1 - kept / (kept + sum(dropped.values())))
    assert report.embedding_parameters == VOCAB * E and report.embedding_matches_target is True
    assert {"d2t", "t2d", "embed_tokens.weight", "lm_head.weight"} <= set(report.dropped_tensors)
    head = load_head(report.config_path, target=target["info"])
    assert head.num_parameters() == kept
    assert head.config.quality == {"eagle3_draft_parameters": report.draft_parameters, "kept_parameters": kept,
                                   "parameter_reduction": pytest.approx(report.parameter_reduction)}
    assert "embed_tokens.weight" not in head.state_dict()


def test_embedding_report(tmp_path, target):
    other = target["embed"] + 0.5
    report = import_eagle3(write_draft(tmp_path / "a", draft_tensors(embed=other), draft_config()),
                           target["info"], str(tmp_path / "a-head"), target_embed=target["embed"])
    assert report.embedding_matches_target is False
    report = import_eagle3(write_draft(tmp_path / "b", draft_tensors(), draft_config()),
                           target["info"], str(tmp_path / "b-head"), target_embed=target["embed"])
    assert report.embedding_matches_target is None and report.embedding_parameters == 0


def test_sharded_checkpoint_gives_the_same_head(tmp_path, target):
    t = draft_tensors(seed=3)
    one = import_eagle3(write_draft(tmp_path / "one", t, draft_config()), target["info"], str(tmp_path / "h1"))
    two = import_eagle3(write_draft(tmp_path / "two", t, draft_config(), shards=3), target["info"],
                        str(tmp_path / "h2"))
    assert one.draft_parameters == two.draft_parameters
    a, b = load_head(one.config_path).state_dict(), load_head(two.config_path).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_layer_conventions():
    n = 32  # Llama 3.1 8B: the EAGLE reference captures the inputs of layers 2, 16, 29
    assert default_hidden_layers(n) == (1, 15, 28)
    assert resolve_hidden_layers({}, n, 3) == ((1, 15, 28), "EAGLE-3 default (1, N//2-1, N-4)")
    nested = {"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 15, 28]}}  # SpecForge: outputs
    assert resolve_hidden_layers(nested, n, 3)[0] == (1, 15, 28)
    top = {"eagle_aux_hidden_state_layer_ids": [2, 16, 29]}  # vLLM: inputs
    assert resolve_hidden_layers(top, n, 3)[0] == (1, 15, 28)
    assert resolve_hidden_layers({**nested, **top}, n, 3)[0] == (1, 15, 28)  # both, consistent
    assert resolve_hidden_layers(top, n, 3, hidden_layers=(0, 5, 9)) == ((0, 5, 9), "given")
    with pytest.raises(InputError, match="disagree"):
        resolve_hidden_layers({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [2, 16, 29]}, **top}, n, 3)
    with pytest.raises(InputError, match="outside the target's 32 layers"):
        resolve_hidden_layers({}, n, 3, hidden_layers=(1, 15, 32))
    with pytest.raises(InputError, match="fuses 3"):
        resolve_hidden_layers({}, n, 3, hidden_layers=(1, 15))
    with pytest.raises(InputError, match="embedding output"):
        resolve_hidden_layers({"eagle_aux_hidden_state_layer_ids": [0, 16, 29]}, n, 3)
    with pytest.raises(InputError, match="--hidden-layers"):
        resolve_hidden_layers({}, 4, 3)  # (1, 1, 0): too shallow for the default


def test_hidden_layers_from_config_and_argument(tmp_path, target):
    t = draft_tensors()
    draft = write_draft(tmp_path / "d", t, draft_config(eagle_config={"eagle_aux_hidden_state_layer_ids": [0, 2, 6]}))
    assert import_eagle3(draft, target["info"], str(tmp_path / "h1")).hidden_layers == (0, 2, 6)
    report = import_eagle3(draft, target["info"], str(tmp_path / "h2"), hidden_layers=(2, 4, 7))
    assert load_head(report.config_path).config.hidden_layers == (2, 4, 7)


def test_pickle_only_folder_is_refused(tmp_path, target):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(draft_config()))
    (folder / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ModelFileError, match="pytorch_model.bin.*safetensors") as exc:
        import_eagle3(str(folder), target["info"], str(tmp_path / "head"))
    assert "\n" not in str(exc.value)
    assert not os.path.exists(tmp_path / "head.json")


def test_hidden_size_mismatch_is_refused(tmp_path, target):
    draft = write_draft(tmp_path / "wide", draft_tensors(hidden=64), draft_config(hidden=64))
    with pytest.raises(InputError, match="hidden_size 64 .* 48"):
        import_eagle3(draft, target["info"], str(tmp_path / "head"))


def test_bad_drafts_are_refused(tmp_path, target):
    t = draft_tensors()
    wrong = dict(t, **{"midlayer.self_attn.k_proj.weight": t["midlayer.self_attn.k_proj.weight"][:-1]})
    with pytest.raises(ModelFileError, match="k_proj.weight"):
        import_eagle3(write_draft(tmp_path / "a", wrong, draft_config()), target["info"], str(tmp_path / "h"))
    with pytest.raises(InputError, match="vocab_size 100"):
        import_eagle3(write_draft(tmp_path / "b", t, draft_config(vocab_size=100)), target["info"], str(tmp_path / "h"))
    extra = dict(t, **{"midlayer.self_attn.q_norm.weight": torch.ones(D)})
    with pytest.raises(UnsupportedModelError, match="q_norm"):
        import_eagle3(write_draft(tmp_path / "c", extra, draft_config()), target["info"], str(tmp_path / "h"))
    # 3 query heads cannot vote for the target's 2 KV heads in equal groups
    odd = draft_tensors()
    odd["midlayer.self_attn.q_proj.weight"] = torch.zeros(3 * D, 2 * E)
    odd["midlayer.self_attn.k_proj.weight"] = torch.zeros(D, 2 * E)
    with pytest.raises(InputError, match="not a multiple of the target's 2 KV heads"):
        import_eagle3(write_draft(tmp_path / "d", odd, draft_config(num_attention_heads=3, num_key_value_heads=1)),
                      target["info"], str(tmp_path / "h"))


def test_head_refuses_another_target(tmp_path, target):
    report = import_eagle3(write_draft(tmp_path / "d", draft_tensors(), draft_config()), target["info"],
                           str(tmp_path / "head"))
    other = dataclasses.replace(target["info"], fingerprint="0" * 32)
    with pytest.raises(InputError, match="fingerprint"):
        load_head(report.config_path, target=other)


def test_cli(tmp_path, target, capsys):
    draft = write_draft(tmp_path / "d", draft_tensors(embed=target["embed"]), draft_config())
    stem = str(tmp_path / "out" / "tiny-eagle3")
    assert main(["--draft", draft, "--model", target["path"], "--output", stem, "--hidden-layers", "1,3,6"]) == 0
    out, err = capsys.readouterr()
    assert "reduction" in out and "equals the target's" in out and err == ""
    head = load_head(stem, target=target["info"])
    assert head.config.hidden_layers == (1, 3, 6)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"x")
    assert main(["--draft", str(pickled), "--model", target["path"], "--output", stem]) == 1
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "safetensors" in lines[0] and "Traceback" not in err

    with pytest.raises(SystemExit) as exc:
        main(["--draft", draft, "--output", stem, "--hidden-layers", "one,two"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--draft", "--model", "--output", "--hidden-layers", "--debug"):
        assert option in help_text
