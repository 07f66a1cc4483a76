"""Circuits: a tiny GPT-2 built by hand so that exactly one head reads the planted
super-activation token and carries the effect, and patching checked against the
bridge's own hooks on it and on random Llama-shaped models (rotary, grouped KV heads).

The hand-built model (all other weights zero):
- channel 0 marks BOS, channels 1..8 are tokens 0..7 (one-hot embeddings, no positions;
  the unembedding reads them back, so the model predicts the current token again);
- layer 0's MLP neuron 5 fires on BOS only and ``c_proj[5, 20] = 50`` writes ~400 into
  channel 20: the super weight (HF row 20, col 5);
- layer 1 head 0 has a constant query and keys that read channel 20, so it attends to
  BOS (a sink: BOS's value is ~0) while the super activation is there; its values copy
  token identity and its output projection writes token j into token j+3's channel.
  With the super weight zeroed it attends to every earlier token and corrupts the
  prediction (the corpus repeats each token four times). Heads 1..3 are small and random.
"""

import html
import json
from pathlib import Path

import pytest
import torch
from browser import open_page
from conftest import ONE, build, byte_tokenizer, run_experiment, run_in_process, save
from transformers import GPT2Config, GPT2LMHeadModel

from sw_lens.circuit import circuit
from sw_lens.documents import KINDS, validate
from sw_lens.errors import SwLensError
from sw_lens.mediation import Component, attribution_patching, components, exact_patching
from sw_lens.models import load_model
from sw_lens.patching import ablation_hooks
from sw_lens.perplexity import Protocol, evaluate, windows
from sw_lens.results import read_json
from sw_lens.sinks import sink_map
from sw_lens.vocabulary import WeightCoord, hook_mlp_out, hook_pattern, hook_z

BOS = 256
SUPER = WeightCoord(0, 20, 5)
SINK_HEAD = Component(1, 0)


def sink_head_model(path):
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=257, n_embd=32, n_inner=16, n_layer=2, n_head=4, n_positions=64,
        bos_token_id=BOS, eos_token_id=BOS, activation_function="gelu", tie_word_embeddings=False,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for ln in [model.transformer.ln_f] + [
            m for b in model.transformer.h for m in (b.ln_1, b.ln_2)
        ]:
            ln.weight.fill_(1.0)
        model.transformer.ln_f.weight[[0, 20]] = 0.0  # BOS's own prediction is uniform
        wte = model.transformer.wte.weight
        wte[BOS, 0] = 1.0
        for t in range(8):
            wte[t, t + 1] = 10.0  # well above what heads 1..3 add
            model.lm_head.weight[t, t + 1] = 1.0  # predicts the current token again
        mlp = model.transformer.h[0].mlp
        mlp.c_fc.weight[0, 5], mlp.c_fc.bias[5] = 2.0, -3.0
        mlp.c_proj.weight[5, 20] = 50.0
        attn = model.transformer.h[1].attn
        w, b = attn.c_attn.weight, attn.c_attn.bias  # [in, q|k|v]
        b[0] = 10.0  # head 0's query
        w[20, 32] = 1.0  # head 0's key reads the super-activation channel
        for t in range(8):
            w[t + 1, 64 + t] = 1.0  # head 0's value: token identity
            attn.c_proj.weight[t, (t + 3) % 8 + 1] = 5.0
        for head in (1, 2, 3):
            dims = slice(8 * head, 8 * head + 8)
            for part in (0, 32, 64):
                w[:, part + 8 * head : part + 8 * head + 8] = 0.3 * torch.randn(32, 8)
            attn.c_proj.weight[dims] = 0.02 * torch.randn(8, 32)
    return load_model(str(save(model, path)), device="cpu")


def repeated_tokens(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 8, (n // 4,), generator=g).repeat_interleave(4)


PROTOCOL = Protocol(window=32, prepend_bos=True, batch_size=8)


@pytest.fixture(scope="module")
def sink_head(tmp_path_factory):
    return sink_head_model(tmp_path_factory.mktemp("sinkhead") / "model")


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_one_head_carries_the_effect(sink_head):
    model = sink_head.bridge
    before = params_of(model)
    tokens = repeated_tokens(31 * 6)
    cut = windows(tokens, PROTOCOL, BOS)
    prompt = torch.cat([torch.tensor([BOS]), tokens[:12]])
    result = circuit(model, [SUPER], [prompt], cut, PROTOCOL, heads_shown=2)
    exact = result.exact
    assert exact.zeroed - exact.clean > 0.3  # the ablation matters
    heads = [c for c in exact.denoised if c.head is not None]
    assert exact.recovered(SINK_HEAD) > 0.8
    assert max(abs(exact.recovered(c)) for c in heads if c != SINK_HEAD) < 0.1
    assert exact.reproduced(SINK_HEAD) > 0.8
    # The super weight's own MLP restored restores everything, exactly.
    assert exact.recovered(Component(0)) == pytest.approx(1.0, abs=1e-6)
    # The sink map: head 0 of layer 1 lost its sink, the most of any head.
    diff = result.corpus_sinks.difference
    assert result.corpus_sinks.top_heads(1) == [(1, 0)]
    assert result.corpus_sinks.clean[1, 0] > 0.99 and diff[1, 0] > 0.7
    assert diff[0].abs().max() < 1e-6  # layer 0 sits before the super activation
    assert result.pages.heads[0] == (1, 0)
    # Attribution ranks the head first among heads, and its estimate has the right sign.
    attribution = result.attribution
    assert max(heads, key=attribution.estimated) == SINK_HEAD
    assert attribution.clean == pytest.approx(exact.clean, abs=1e-6)
    assert attribution.zeroed == pytest.approx(exact.zeroed, abs=1e-6)
    # The residual story: the channel appears at layer 0 on BOS and the zeroed run lacks it.
    story = result.story
    assert story.position == 0 and story.peak == 0
    assert story.channel_clean[0] > 300 and abs(story.channel_zeroed[0]) < 1
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_sink_mass_equals_a_direct_computation(sink_head):
    model = sink_head.bridge
    ids = torch.cat([torch.tensor([BOS]), repeated_tokens(16)])[None]
    found = sink_map(model, [ids], [SUPER], fraction=0.1)
    assert found.sink_positions == [[0]]
    for hooks, measured in (([], found.clean), (ablation_hooks(model, [SUPER]), found.zeroed)):
        with torch.inference_mode(), model.hooks(fwd_hooks=hooks):
            _, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
        for layer in range(2):
            direct = cache[hook_pattern(layer)][0, :, 1:, 0].mean(-1)  # queries 1.., key BOS
            torch.testing.assert_close(measured[layer], direct, atol=1e-5, rtol=0)


def bridge_patched_nll(model, coords, tokens, protocol, component, direction, t=1.0):
    """The patched run through the bridge's own hooks (one batch of windows): the
    activation cached from the other run is written into ``hook_z`` / ``hook_mlp_out``
    (with `t` < 1, only that share of the difference: value + t * (source - value))."""
    cut = windows(tokens, protocol, model.tokenizer.bos_token_id)
    ids = torch.stack([w.input_ids for w in cut])
    name = hook_mlp_out(component.layer) if component.head is None else hook_z(component.layer)
    source_hooks = ablation_hooks(model, coords) if direction == "noised" else []
    with torch.inference_mode(), model.hooks(fwd_hooks=source_hooks):
        _, cache = model.run_with_cache(ids, names_filter=lambda n: n == name)
    source = cache[name]
    at = slice(None) if component.head is None else component.head

    def patch(value, hook):
        value = value.clone()
        value[:, :, at] += t * (source[:, :, at] - value[:, :, at])
        return value

    ablation = coords if direction == "denoised" else []
    result = evaluate(model, tokens, protocol, "t", ablation, fwd_hooks=[(name, patch)])
    return result.nll


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_patching_equals_the_bridge_hooks(arch, tmp_path):
    model = load_model(str(save(build(arch, [ONE]), tmp_path / arch)), device="cpu").bridge
    coords = [WeightCoord(ONE.layer, ONE.row, ONE.col)]
    tokens = torch.randint(0, 255, (120,), generator=torch.Generator().manual_seed(1))
    protocol = Protocol(window=40, batch_size=8)
    cut = windows(tokens, protocol, None)
    parts = [Component(ONE.layer), Component(ONE.layer + 1, 1), Component(ONE.layer + 2, 3)]
    exact = exact_patching(model, coords, cut, protocol, parts)
    assert exact.zeroed - exact.clean > 1e-3
    for c in parts:
        for direction, found in (("denoised", exact.denoised), ("noised", exact.noised)):
            direct = bridge_patched_nll(model, coords, tokens, protocol, c, direction)
            assert found[c] == pytest.approx(direct, abs=1e-5), (c, direction)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_attribution_is_the_derivative_of_the_patch(arch, tmp_path):
    """The estimate is d L_patched / d t at t = 0, t the share of the clean-zeroed
    difference patched in: checked by a central difference through the bridge's hooks."""
    model = load_model(str(save(build(arch, [ONE]), tmp_path / arch)), device="cpu").bridge
    coords = [WeightCoord(ONE.layer, ONE.row, ONE.col)]
    tokens = torch.randint(0, 255, (120,), generator=torch.Generator().manual_seed(2))
    protocol = Protocol(window=40, batch_size=8)
    cut = windows(tokens, protocol, None)
    estimate = attribution_patching(model, coords, cut, protocol)
    assert set(estimate.attribution) == set(components(model, coords))
    t = 0.02
    for c in (Component(ONE.layer + 1, 2), Component(ONE.layer + 1)):
        up, down = (
            bridge_patched_nll(model, coords, tokens, protocol, c, "denoised", t=s) for s in (t, -t)
        )
        assert estimate.attribution[c] == pytest.approx((up - down) / (2 * t), rel=0.03, abs=1e-5)


def token_text(ids) -> str:
    return byte_tokenizer().decode([int(i) for i in ids])


def run_circuit(model_dir, out, *args):
    corpus = model_dir.parent / "corpus.txt"
    corpus.write_text(token_text(repeated_tokens(400, seed=3)))
    return run_experiment(
        "circuit.py",
        *("--model", model_dir, "--text", corpus, "--out", out, "--device", "cpu"),
        *("--prompt", token_text(repeated_tokens(12, seed=4)), "--prompt-bos", "yes"),
        *("--bos", "yes", "--window", "32", "--circuit-tokens", "248", "--batch-size", "8"),
        *("--weight", "0,20,5", "--heads-shown", "2", *args),
    )


@pytest.fixture(scope="module")
def circuit_run(sink_head, tmp_path_factory):
    out = tmp_path_factory.mktemp("circuit") / "out"
    done = run_circuit(Path(sink_head.name), out)
    assert done.returncode == 0, done.stderr
    return out, done


def test_the_command_writes_a_valid_document_figures_and_a_page(circuit_run):
    out, done = circuit_run
    document = read_json(out / "circuit.json", "circuit")
    top = max(
        (r for r in document.patching.components if r.head is not None),
        key=lambda r: r.recovered,
    )
    assert (top.layer, top.head, top.name) == (1, 0, "blocks.1.attn.hook_z[:, :, 0]")
    assert top.recovered > 0.8
    assert document.attention.heads[0] == [1, 0]
    assert document.patching.exact.n_tokens == 8 * 31  # 248 tokens, BOS per window
    assert "L1 H0" in done.stdout and "Spearman" in done.stdout
    for stem in ("circuit_sinks", "circuit_patching", "circuit_residual"):
        assert (out / f"{stem}.png").is_file() and (out / f"{stem}.pdf").is_file()
    dom, console = open_page(out / "circuit_attention.html")
    assert console == []
    # circuitsvis drew both sets of heads (the table, then each element's head selector
    # and zoomed label) and the prompt's tokens, offline.
    assert dom.count("L1 H0") >= 5
    rendered = dom.split("<body", 1)[1].split("<script", 1)[0]
    tokens = document.attention.tokens
    assert all(html.escape(t, quote=False) in rendered for t in tokens[1:])  # as serialized


def test_a_hostile_circuit_document_stays_text(circuit_run, tmp_path):
    from test_pages import PAYLOAD, assert_inert

    out, _ = circuit_run
    document = json.loads((out / "circuit.json").read_text())
    document["model"]["name"] = PAYLOAD
    document["attention"]["tokens"][1] = PAYLOAD
    document["residual"]["lens_clean"][0] = PAYLOAD
    document["residual"]["token"] = PAYLOAD
    (tmp_path / "circuit.json").write_text(json.dumps(document))
    done = run_experiment("figures.py", tmp_path / "circuit.json")
    assert done.returncode == 0, done.stderr
    assert_inert(tmp_path / "circuit_attention.html")


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("attention", "heads", 0), [1, 4], "a component outside the model"),
        (("patching", "components", 0, "layer"), 2, "a component outside the model"),
        (("attention", "clean", 0, 0), [0.5], "a pattern that is not"),
        (("sinks", "corpus", "clean", 1, 0), 1.5, "less than or equal to 1"),
        (("residual", "norm_zeroed"), [1.0], "a residual story without 2 layers"),
    ],
)
def test_a_corrupt_circuit_document_is_one_line(circuit_run, path, value, message):
    out, _ = circuit_run
    document = json.loads((out / "circuit.json").read_text())
    target = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(SwLensError, match=message):
        validate(document, KINDS["circuit"].schema, "circuit.json")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fraction", "1.5"], "must be above 0 and at most 1"),
        (["--fraction", "nan"], "must be a finite number"),
        (["--circuit-tokens", "0"], "--circuit-tokens: must be a positive integer"),
        (["--weight", "0,40,5"], "row out of range"),
    ],
)
def test_bad_circuit_input_is_one_line_and_writes_nothing(sink_head, tmp_path, args, message):
    out = tmp_path / "out"
    done = run_in_process(
        "circuit.py", "--model", sink_head.name, "--out", out, "--device", "cpu", *args
    )
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error:") and message in line
    assert not out.exists()
