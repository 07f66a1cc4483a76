"""The coverage matrix: every architecture family a researcher is likely to try, as a
tiny random model built from its transformers config, with a super weight planted in
it; each feature either agrees with plain Hugging Face or refuses in one line.

Per family (and, for the ten families transformers reads from GGUF, as a .gguf file too):
the scan equals forward hooks on the HF down-projection module of an
independently loaded HF model (positions and channels exact, values to 1e-5); the hook
ablation equals zeroing the HF weight (logits to 1e-5, float32); the planted weight is
found at its exact coordinates; the checkpoint coordinate names a tensor entry holding
the weight; the layer-major scan equals the scan or refuses; the prefix-reusing sweep
equals one `evaluate` per ablation; the layer-streamed scan and perplexity
(`sw_lens.stream`, read from the saved checkpoint) equal the in-memory ones; patching a
head and an MLP (circuits) equals the bridge's own hooks; under a device map that
offloads weights to disk and CPU memory, the scan, hook ablations on the fast path and
weight edits equal the in-memory model's. The README's matrix is this file's table.
"""

from pathlib import Path

import pytest
import torch
import transformers as T
from accelerate.utils import has_offloaded_params
from conftest import VOCAB, byte_tokenizer, offload_map, trigger_id
from gguf_writer import write_gguf
from transformers.pytorch_utils import Conv1D

from sw_lens.errors import SwLensError
from sw_lens.fast import down_proj_module, hf_twin
from sw_lens.layer_major import scan_layer_major
from sw_lens.locate import locate
from sw_lens.mediation import Component, exact_patching
from sw_lens.models import load_model
from sw_lens.patching import ablation_hooks, edited_weights, weight_value
from sw_lens.perplexity import Protocol, evaluate, evaluate_sweep, windows
from sw_lens.scan import scan
from sw_lens.stream import StreamedModel, evaluate_streamed, open_streamed, scan_streamed
from sw_lens.vocabulary import WeightCoord, down_proj_parameter, from_layout, to_layout

COMMON = dict(vocab_size=VOCAB, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, pad_token_id=0)
DECODER = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
FAMILIES = {
    # GPT-2's GGUF reader keeps the default MLP width and context: so does this model.
    "gpt2": (T.GPT2Config, dict(n_embd=32, n_layer=4, n_head=4)),
    "gpt_neox": (
        T.GPTNeoXConfig,
        dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4),
    ),
    "llama": (T.LlamaConfig, DECODER),
    "mistral": (T.MistralConfig, DECODER),
    "qwen2": (T.Qwen2Config, DECODER),
    "qwen3": (T.Qwen3Config, DECODER),  # head_dim 128, its default (GGUF does not record it)
    "gemma": (T.GemmaConfig, DECODER | dict(head_dim=8)),
    "gemma2": (T.Gemma2Config, DECODER | dict(head_dim=8)),
    "gemma3": (T.Gemma3TextConfig, DECODER | dict(head_dim=8)),
    "phi3": (T.Phi3Config, DECODER),
    "olmo": (T.OlmoConfig, DECODER),
    "olmo2": (T.Olmo2Config, DECODER),
    "stablelm": (T.StableLmConfig, DECODER),
    "starcoder2": (T.Starcoder2Config, DECODER),
}
# What each family does not support, and the one line that says so.
REFUSED = {"mixtral": "has no MLP down-projection hooks"}
# Rotary decoders only, whose layers a chunked run reproduces:
LAYER_MAJOR_REFUSED = {"gpt2", "gpt_neox", "gemma2", "gemma3"}
PLANT = WeightCoord(layer=1, row=5, col=17)
DIM = 3  # the residual dimension the planted neuron reads; only the trigger has it
PROMPT = "xyz A qrs"


def _layers(model) -> torch.nn.ModuleList:
    n = model.config.num_hidden_layers
    return next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n)


def _mlp_projections(mlp) -> tuple[list[torch.nn.Module], torch.nn.Module]:
    """(the MLP's input projections, its down-projection), whatever the family names them."""
    named = dict(mlp.named_children())
    out = next(named[n] for n in ("down_proj", "c_proj", "dense_4h_to_h") if n in named)
    ins = [
        named[n]
        for n in ("gate_proj", "up_proj", "gate_up_proj", "c_fc", "dense_h_to_4h")
        if n in named
    ]
    return ins, out


def plant(model, coord: WeightCoord, value: float = 8.0) -> None:
    """The paper's mechanism in miniature (as tests/conftest.py does for three families):
    the trigger token alone points along DIM, neuron `col` reads DIM hard, and
    ``down_proj.weight[row, col]`` (in whatever layout) is large."""
    ins, out = _mlp_projections(_layers(model)[coord.layer].mlp)
    d_mlp = out.weight.shape[0] if isinstance(out, Conv1D) else out.weight.shape[1]
    fused = [p for p in ins if 2 * d_mlp in p.weight.shape]  # Phi-3's gate_up_proj
    drive = 4.0 if len(ins) > 1 or fused else 16.0  # a gated read grows as its square
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, DIM] = 0.0
        emb[trigger_id()] = 0.0
        # Unit size after a norm; OLMo 2 feeds the residual to its MLP unnormalised.
        emb[trigger_id(), DIM] = emb.shape[1] ** 0.5
        wpe = getattr(getattr(model, "transformer", None), "wpe", None)  # GPT-2 positions
        if wpe is not None:
            wpe.weight[:, DIM] = 0.0
        for proj in ins:
            rows = [coord.col, coord.col + d_mlp] if proj in fused else [coord.col]
            for r in rows:
                if isinstance(proj, Conv1D):  # [in, out]
                    proj.weight[:, r] = 0.0
                    proj.weight[DIM, r] = drive
                else:
                    proj.weight[r, :] = 0.0
                    proj.weight[r, DIM] = drive
                if getattr(proj, "bias", None) is not None:
                    proj.bias[r] = 0.0
        if isinstance(out, Conv1D):
            out.weight[coord.col, :] = 0.0
            out.weight[coord.col, coord.row] = value
        else:
            out.weight[:, coord.col] = 0.0
            out.weight[coord.row, coord.col] = value


def build(family: str, path):
    config_class, sizes = FAMILIES[family]
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config_class(**sizes, **COMMON)).eval()
    plant(model, PLANT)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    path = build(request.param, tmp_path_factory.mktemp(request.param) / "model")
    reference = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return request.param, load_model(str(path), device="cpu"), reference


def ids(text: str = PROMPT) -> torch.Tensor:
    return torch.tensor(byte_tokenizer()(text, add_special_tokens=False)["input_ids"])


def hf_down_proj(reference, bridge, layer: int) -> tuple[torch.nn.Module, bool]:
    name, linear = down_proj_parameter(bridge, layer)
    return reference.get_submodule(name.removesuffix(".weight")), linear


def test_the_scan_equals_hooks_on_the_hf_down_projection(family):
    _, loaded, reference = family
    text = ids(PROMPT + " and A b")
    found = scan(loaded.bridge, [text], prepend_bos=False)
    seen = {}
    handles = [
        hf_down_proj(reference, loaded.bridge, layer)[0].register_forward_hook(
            lambda m, args, out, layer=layer: seen.__setitem__(layer, (args[0][0], out[0]))
        )
        for layer in range(reference.config.num_hidden_layers)
    ]
    with torch.inference_mode():
        reference(text[None])
    for handle in handles:
        handle.remove()
    for s in found.layers:
        for spike, act in ((s.post, seen[s.layer][0]), (s.mlp_out, seen[s.layer][1])):
            pos, channel = divmod(int(act.abs().argmax()), act.shape[-1])
            assert (spike.pos, spike.channel) == (pos, channel), (s.layer, spike.hook)
            assert spike.value == pytest.approx(float(act[pos, channel]), rel=1e-5, abs=1e-6)


def test_the_hook_ablation_equals_zeroing_the_hf_weight(family):
    _, loaded, reference = family
    text = ids()[None]
    with torch.inference_mode():
        hooked = loaded.bridge.run_with_hooks(
            text, fwd_hooks=ablation_hooks(loaded.bridge, [PLANT])
        )
        module, linear = hf_down_proj(reference, loaded.bridge, PLANT.layer)
        index = (PLANT.row, PLANT.col) if linear else (PLANT.col, PLANT.row)
        saved = module.weight[index].clone()
        module.weight[index] = 0.0
        try:
            edited = reference(text).logits
        finally:
            module.weight[index] = saved
    torch.testing.assert_close(hooked, edited, atol=1e-5, rtol=1e-5)


def test_the_planted_weight_is_found_and_its_checkpoint_entry_holds_it(family):
    name, loaded, reference = family
    result = locate(loaded.bridge, [ids()], prepend_bos=False)
    assert [c.coord for c in result.candidates] == [PLANT], name
    param, index = loaded.checkpoint_weight(PLANT.layer, PLANT.row, PLANT.col)
    assert float(reference.state_dict()[param][index]) == 8.0
    layout = "hf_linear" if down_proj_parameter(loaded.bridge, PLANT.layer)[1] else "gpt2_conv1d"
    assert from_layout(layout, *to_layout(PLANT, layout)) == PLANT
    assert to_layout(PLANT, layout)[1:] == index


def test_the_layer_major_scan_equals_the_scan_or_refuses(family):
    name, loaded, _ = family
    texts = [ids(PROMPT + " and A b")]
    if name in LAYER_MAJOR_REFUSED:
        with pytest.raises(SwLensError, match="use scan.scan") as refused:
            scan_layer_major(loaded.bridge, texts, prepend_bos=False, chunk=4)
        assert "\n" not in str(refused.value)
        return
    streamed = scan(loaded.bridge, texts, prepend_bos=False)
    chunked = scan_layer_major(loaded.bridge, texts, prepend_bos=False, chunk=4)
    for a, b in zip(streamed.layers, chunked.layers, strict=True):
        for x, y in ((a.post, b.post), (a.mlp_out, b.mlp_out)):
            assert (x.pos, x.channel, x.token) == (y.pos, y.channel, y.token), (name, a.layer)
            assert x.value == pytest.approx(y.value, rel=1e-4, abs=1e-5)
        for x, y in ((a.resid_mid, b.resid_mid), (a.added, b.added)):
            assert (x is None) == (y is None) and (x is None or x == pytest.approx(y, abs=1e-4))
        assert a.cancels == b.cancels


def test_the_prefix_reusing_sweep_equals_one_evaluation_per_ablation(family):
    name, loaded, _ = family
    tokens = torch.randint(0, 255, (96,), generator=torch.Generator().manual_seed(0))
    protocol = Protocol(window=32, batch_size=2)
    ablations = [[PLANT], [WeightCoord(3, 0, 0)], [WeightCoord(2, 7, 11)]]
    baseline, swept = evaluate_sweep(loaded.bridge, tokens, protocol, "t", ablations)
    assert baseline.nll == pytest.approx(
        evaluate(loaded.bridge, tokens, protocol, "t").nll, rel=1e-6
    )
    for ablation, result in zip(ablations, swept, strict=True):
        direct = evaluate(loaded.bridge, tokens, protocol, "t", ablation)
        assert result.nll == pytest.approx(direct.nll, rel=1e-6), (name, ablation)


def streamed(loaded) -> StreamedModel:
    return StreamedModel(
        Path(loaded.location), loaded.tokenizer, torch.device("cpu"), torch.float32
    )


def test_the_streamed_scan_equals_the_scan(family):
    name, loaded, _ = family
    model = streamed(loaded)
    assert model.down_proj_name(1) == down_proj_parameter(loaded.bridge, 1)[0]
    texts = [ids(PROMPT + " and A b"), ids("b A")]
    for ablation in ([], [PLANT]):
        hooks = ablation_hooks(loaded.bridge, ablation)
        expected = scan(loaded.bridge, texts, prepend_bos=False, fwd_hooks=hooks)
        found = scan_streamed(model, texts, prepend_bos=False, ablation=ablation)
        for a, b in zip(found.layers, expected.layers, strict=True):
            for x, y in ((a.post, b.post), (a.mlp_out, b.mlp_out)):
                assert (x.text, x.pos, x.channel, x.token) == (y.text, y.pos, y.channel, y.token)
                assert x.value == pytest.approx(y.value, rel=1e-5, abs=1e-6), (name, a.layer)
            assert a.cancels == b.cancels, (name, a.layer)


def test_streamed_perplexity_equals_one_evaluation_per_ablation(family):
    name, loaded, _ = family
    tokens = torch.randint(0, 255, (96,), generator=torch.Generator().manual_seed(0))
    protocol = Protocol(window=32, batch_size=2)
    ablations = [[PLANT], [WeightCoord(3, 0, 0)], [WeightCoord(2, 7, 11), PLANT]]
    baseline, ablated = evaluate_streamed(streamed(loaded), tokens, protocol, "t", ablations)
    expected = evaluate(loaded.bridge, tokens, protocol, "t")
    assert baseline.nll == pytest.approx(expected.nll, rel=1e-5), name
    torch.testing.assert_close(baseline.token_nll, expected.token_nll, rtol=1e-5, atol=1e-6)
    for ablation, result in zip(ablations, ablated, strict=True):
        direct = evaluate(loaded.bridge, tokens, protocol, "t", ablation)
        assert result.nll == pytest.approx(direct.nll, rel=1e-5), (name, ablation)


@pytest.mark.parametrize("name", list(REFUSED))
def test_an_unsupported_family_is_refused_in_one_line(name, tmp_path):
    config = T.MixtralConfig(**DECODER, **COMMON, num_local_experts=2, num_experts_per_tok=1)
    path = tmp_path / name
    T.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    with pytest.raises(SwLensError, match=REFUSED[name]) as refused:
        load_model(str(path), device="cpu")
    assert "\n" not in str(refused.value)


def test_patching_a_head_and_an_mlp_equals_the_bridge_hooks(family):
    """Circuits read each head from the attention's output-projection input: the same
    per-head slices as ``hook_z`` in every family (grouped KV heads, parallel blocks,
    post-norms), and the MLP's output as ``hook_mlp_out`` sees it."""
    from test_circuit import bridge_patched_nll

    name, loaded, _ = family
    tokens = torch.cat([ids(PROMPT + " and A b ") for _ in range(4)])
    protocol = Protocol(window=len(tokens) // 2, batch_size=2)
    cut = windows(tokens, protocol, None)
    parts = [Component(PLANT.layer + 1, 2), Component(PLANT.layer + 1)]
    exact = exact_patching(loaded.bridge, [PLANT], cut, protocol, parts)
    assert exact.zeroed > exact.clean, name
    for c in parts:
        for direction, found in (("denoised", exact.denoised), ("noised", exact.noised)):
            direct = bridge_patched_nll(loaded.bridge, [PLANT], tokens, protocol, c, direction)
            assert found[c] == pytest.approx(direct, abs=1e-5), (name, c, direction)


# Families transformers reads from GGUF (`transformers.integrations.ggml`).
GGUF_FAMILIES = [
    "gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "stablelm",
    "starcoder2",
]  # fmt: skip


@pytest.mark.parametrize("name", GGUF_FAMILIES)
def test_a_gguf_file_gives_the_same_model_and_the_same_finds(name, tmp_path):
    """Written with the gguf package's writer (tests/gguf_writer.py): transformers reads
    back every tensor bit for bit, and sw_lens, loading the .gguf, scans and finds what
    it does on the HF folder."""
    folder = build(name, tmp_path / "model")
    original = T.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    gguf_file = write_gguf(original, byte_tokenizer(), tmp_path / f"{name}.gguf")
    back = T.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=gguf_file.name, dtype=torch.float32
    )
    expected, read = original.state_dict(), back.state_dict()
    assert expected.keys() == read.keys()
    assert all(torch.equal(expected[k], read[k]) for k in expected)
    loaded = load_model(str(gguf_file), device="cpu")
    assert loaded.source == "gguf"
    assert [c.coord for c in locate(loaded.bridge, [ids()], prepend_bos=False).candidates] == [
        PLANT
    ]
    texts = [ids(PROMPT + " and A b")]
    from_folder = scan(load_model(str(folder), device="cpu").bridge, texts, prepend_bos=False)
    assert scan(loaded.bridge, texts, prepend_bos=False) == from_folder
    # Streamed from the .gguf, dequantized one tensor at a time: the same numbers.
    model = open_streamed(str(gguf_file), torch.device("cpu"), torch.float32)
    assert model.weight(PLANT)[0] == 8.0
    found = scan_streamed(model, texts, prepend_bos=False)
    for a, b in zip(found.layers, from_folder.layers, strict=True):
        assert (a.mlp_out.pos, a.mlp_out.channel, a.post.channel) == (
            b.mlp_out.pos,
            b.mlp_out.channel,
            b.post.channel,
        ), name
        assert a.mlp_out.value == pytest.approx(b.mlp_out.value, rel=1e-5, abs=1e-6), name
    tokens = torch.randint(0, 255, (64,), generator=torch.Generator().manual_seed(0))
    protocol = Protocol(window=32, batch_size=2)
    _, (ablated,) = evaluate_streamed(model, tokens, protocol, "t", [[PLANT]])
    expected = evaluate(loaded.bridge, tokens, protocol, "t", [PLANT])
    assert ablated.nll == pytest.approx(expected.nll, rel=1e-5), name


def test_an_offloading_device_map_gives_the_in_memory_numbers(family):
    """Weights offloaded to disk and CPU memory by accelerate (`sw_lens.placement`):
    the scan, weight reads, hook ablations on the fast path and weight edits equal the
    in-memory model's, and an edit ends with its block."""
    name, loaded, _ = family
    placed = load_model(loaded.location, device_map=offload_map(Path(loaded.location)))
    model = placed.bridge
    assert any(has_offloaded_params(m) for m in model.original_model.modules()), name
    assert weight_value(model, PLANT) == weight_value(loaded.bridge, PLANT) == 8.0
    texts = [ids(PROMPT + " and A b")]
    for a, b in zip(
        scan(model, texts, prepend_bos=False).layers,
        scan(loaded.bridge, texts, prepend_bos=False).layers,
        strict=True,
    ):
        assert (a.post.pos, a.post.channel, a.mlp_out.channel) == (
            b.post.pos,
            b.post.channel,
            b.mlp_out.channel,
        )
        assert a.mlp_out.value == pytest.approx(b.mlp_out.value, rel=1e-5), (name, a.layer)
    # The fast path runs the model's own modules, where the model keeps them.
    twin = hf_twin(model)
    assert down_proj_module(model, twin, 1) is model.blocks[1].mlp.out.original_component
    tokens = torch.randint(0, 255, (96,), generator=torch.Generator().manual_seed(0))
    protocol = Protocol(window=32, batch_size=2)
    for ablation in ([], [PLANT], [WeightCoord(2, 7, 11), PLANT]):
        expected = evaluate(loaded.bridge, tokens, protocol, "t", ablation).nll
        assert evaluate(model, tokens, protocol, "t", ablation).nll == pytest.approx(
            expected, rel=1e-6
        ), (name, ablation)
        with edited_weights(model, ablation):
            edited = evaluate(model, tokens, protocol, "t").nll
        assert edited == pytest.approx(expected, rel=1e-6), (name, ablation)
    assert weight_value(model, PLANT) == 8.0  # the edit ended with its block
    ablations = [[PLANT], [WeightCoord(3, 0, 0)]]  # resuming from layer 1 and from layer 3
    _, swept = evaluate_sweep(model, tokens, protocol, "t", ablations)
    _, expected = evaluate_sweep(loaded.bridge, tokens, protocol, "t", ablations)
    for a, b in zip(swept, expected, strict=True):
        assert a.nll == pytest.approx(b.nll, rel=1e-6), name
