"""nanoGPT checkpoints: the converted model's forward equals nanoGPT's, super weights keep
nanoGPT's coordinates, and checkpoints from other forks are refused by name."""

import json

import pytest
import torch
from nanogpt_reference import (
    CHARS,
    GPT,
    TRIGGER,
    encode,
    model_args,
    plant,
    save_checkpoint,
    write_meta,
)

from sw_lens import nanogpt
from sw_lens.errors import SwLensError
from sw_lens.locate import locate
from sw_lens.models import load_model
from sw_lens.nanogpt import read_meta
from sw_lens.patching import ablation_hooks
from sw_lens.vocabulary import WeightCoord

TEXT = "To be, or not to be: that is the Question."


def checkpoint(tmp_path, bias=True, compiled=False, planted=None, vocab_size=None, seed=0):
    torch.manual_seed(seed)
    args = model_args(bias=bias, **({"vocab_size": vocab_size} if vocab_size else {}))
    model = GPT(args).eval()
    if planted:
        plant(model, *planted, trigger_id=CHARS.index(TRIGGER))
    write_meta(tmp_path / "meta.pkl")
    return model, save_checkpoint(tmp_path / "ckpt.pt", model, args, compiled=compiled)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("compiled", [False, True])
def test_converted_logits_equal_nanogpt(tmp_path, bias, compiled):
    reference, path = checkpoint(tmp_path, bias=bias, compiled=compiled)
    loaded = load_model(str(path), device="cpu")
    ids = encode(TEXT)
    with torch.inference_mode():
        ours, theirs = loaded.bridge(ids), reference(ids)
    assert (ours - theirs).abs().max() <= 1e-5
    assert loaded.source == "nanogpt" and loaded.iter_num == 0
    assert loaded.tokenizer.decode(loaded.tokenizer(TEXT)["input_ids"]) == TEXT


def test_padded_vocab_loads_and_a_missing_tokenizer_is_one_line(tmp_path, monkeypatch):
    reference, path = checkpoint(tmp_path, vocab_size=50304)  # nanoGPT's padded GPT-2 vocab
    loaded = load_model(str(path), device="cpu")
    with torch.inference_mode():
        ours, theirs = loaded.bridge(encode(TEXT)), reference(encode(TEXT))
    assert ours.shape[-1] == 50304 and (ours - theirs).abs().max() <= 1e-5
    (tmp_path / "meta.pkl").unlink()

    def not_cached(*args, **kwargs):
        raise OSError("gpt2 is not in the HF cache")

    monkeypatch.setattr(nanogpt.AutoTokenizer, "from_pretrained", not_cached)
    with pytest.raises(SwLensError, match="no tokenizer for .*pass --tokenizer"):
        load_model(str(path), device="cpu")


def test_a_given_char_vocabulary_is_used(tmp_path):
    reference, path = checkpoint(tmp_path)
    meta = (tmp_path / "meta.pkl").rename(tmp_path / "vocab.pkl")
    loaded = load_model(str(path), device="cpu", tokenizer_name=str(meta))
    assert loaded.tokenizer(TEXT)["input_ids"] == encode(TEXT)[0].tolist()


def test_meta_is_found_in_nanogpts_data_folder(tmp_path):
    run = tmp_path / "out-chars"
    run.mkdir()
    _, path = checkpoint(run)
    (run / "meta.pkl").rename(write_meta(tmp_path / "data" / "chars" / "meta.pkl"))
    assert load_model(str(path), device="cpu").tokenizer("ab")["input_ids"] == [
        CHARS.index("a"),
        CHARS.index("b"),
    ]


def test_zeroing_nanogpts_weight_equals_the_hook_ablation(tmp_path):
    reference, path = checkpoint(tmp_path, planted=(1, 5, 17, 3, 8.0))
    loaded = load_model(str(path), device="cpu")
    ids = encode(TEXT)
    hooks = ablation_hooks(loaded.bridge, [WeightCoord(layer=1, row=5, col=17)])
    with torch.inference_mode():
        ours = loaded.bridge.run_with_hooks(ids, fwd_hooks=hooks)
        reference.transformer.h[1].mlp.c_proj.weight[5, 17] = 0.0  # nanoGPT: [out, in]
        theirs = reference(ids)
    assert (ours - theirs).abs().max() <= 1e-5


def test_a_planted_super_weight_is_found_at_its_nanogpt_coordinates(tmp_path):
    _, path = checkpoint(tmp_path, bias=False, compiled=True, planted=(2, 9, 40, 7, 8.0))
    loaded = load_model(str(path), device="cpu")
    ids = torch.tensor(loaded.tokenizer(TEXT)["input_ids"])
    (found,) = locate(loaded.bridge, [ids], prepend_bos=False).candidates
    assert found.coord == WeightCoord(2, 9, 40) and found.value == 8.0
    assert found.post.token == TRIGGER
    assert loaded.checkpoint_weight(2, 9, 40) == ("transformer.h.2.mlp.c_proj.weight", (9, 40))
    assert (found.hf_param, found.hf_index) == ("transformer.h.2.mlp.c_proj.weight", (40, 9))


def test_gpt2_weights_in_nanogpt_naming_give_the_same_coordinates(tmp_path):
    """GPT.from_pretrained('gpt2') in nanoGPT: HF's Conv1D weights transposed into
    nn.Linear, keys unchanged. Loading that state dict finds the same super weight as
    loading the HF model directly (nanoGPT's exact GELU moves numbers, not coordinates)."""
    from conftest import ONE, hf_config, plant, save
    from transformers import GPT2LMHeadModel

    config = hf_config("gpt2")
    config.n_inner = 4 * config.n_embd  # nanoGPT's MLP is always 4x wide
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(config).eval()
    plant(hf, "gpt2", [ONE])
    save(hf, tmp_path / "hf")
    state = {
        k: (v.t() if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else v)
        for k, v in hf.state_dict().items()
    }
    cfg = hf.config
    args = dict(
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_embd=cfg.n_embd,
        block_size=cfg.n_positions,
        bias=True,
        vocab_size=cfg.vocab_size,
        dropout=0.0,
    )
    torch.save({"model": state, "model_args": args}, tmp_path / "gpt2-nanogpt.pt")
    direct = load_model(str(tmp_path / "hf"), device="cpu")
    via_nanogpt = load_model(
        str(tmp_path / "gpt2-nanogpt.pt"), device="cpu", tokenizer_name=str(tmp_path / "hf")
    )
    ids = torch.tensor(direct.tokenizer("xyz A qrs")["input_ids"])
    coords = [
        [c.coord for c in locate(m.bridge, [ids], False).candidates] for m in (direct, via_nanogpt)
    ]
    assert coords[0] == coords[1] == [WeightCoord(ONE.layer, ONE.row, ONE.col)]


def test_unexpected_keys_are_named(tmp_path):
    reference, path = checkpoint(tmp_path)
    raw = torch.load(path, weights_only=True)
    raw["model"]["transformer.h.0.ln_1.scale"] = torch.ones(32)  # an RMSNorm fork
    del raw["model"]["transformer.h.0.ln_1.bias"]
    torch.save(raw, path)
    with pytest.raises(
        SwLensError,
        match="unexpected keys transformer.h.0.ln_1.scale; missing keys transformer.h.0.ln_1.bias",
    ):
        load_model(str(path), device="cpu")


def test_truncated_and_bare_checkpoints(tmp_path):
    _, path = checkpoint(tmp_path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(SwLensError, match="cannot read checkpoint"):
        load_model(str(path), device="cpu")
    torch.manual_seed(0)
    bare = tmp_path / "bare.pt"
    torch.save(GPT(model_args()).state_dict(), bare)
    with pytest.raises(SwLensError, match="bare state dict: put its model_args"):
        load_model(str(bare), device="cpu")


def test_a_malicious_meta_pkl_executes_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"stoi": Exploit()}))
    with pytest.raises(SwLensError, match="only plain dicts, strings and numbers"):
        read_meta(tmp_path / "meta.pkl")
    assert not marker.exists()


def test_locate_runs_on_a_nanogpt_checkpoint_and_reports_its_coordinates(tmp_path):
    from test_cli import run_locate

    _, path = checkpoint(tmp_path, bias=False, planted=(2, 9, 40, 7, 8.0))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("A Quiet question: Quite so. " * 12)
    out = tmp_path / "out"
    done = run_locate(
        "--model",
        path,
        "--text",
        corpus,
        "--prompt",
        "The Queen spoke.",
        "--window",
        "64",
        "--max-tokens",
        "128",
        "--rank-tokens",
        "64",
        "--device",
        "cpu",
        "--out",
        out,
    )
    assert done.returncode == 0, done.stderr
    (found,) = json.loads((out / "results.json").read_text())["candidates"]
    assert found["checkpoint_param"] == "transformer.h.2.mlp.c_proj.weight"
    assert found["checkpoint_index"] == [9, 40] and found["hf_index"] == [40, 9]
    assert "transformer.h.2.mlp.c_proj.weight[9, 40]" in done.stdout


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("truncate", "cannot read checkpoint"),
        ("fork", "unexpected keys transformer.h.1.mlp.c_gate.weight"),
    ],
)
def test_bad_checkpoints_exit_2_with_one_line(tmp_path, damage, expected):
    from test_cli import run_locate

    _, path = checkpoint(tmp_path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:1500])
    else:
        raw = torch.load(path, weights_only=True)
        raw["model"]["transformer.h.1.mlp.c_gate.weight"] = torch.ones(128, 32)  # SwiGLU fork
        torch.save(raw, path)
    done = run_locate("--model", path, "--device", "cpu", "--out", tmp_path / "out")
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    expected = (
        "cannot read checkpoint"
        if damage == "truncate"
        else "unexpected keys transformer.h.1.mlp.c_gate.weight"
    )
    assert line.startswith("error: ") and expected in line
    assert not (tmp_path / "out").exists()
