"""Tiny GPT-2-, Qwen2- and Llama-shaped models with super weights we plant ourselves.

Planting: a trigger token's embedding points along residual dimension `dim`; neuron
`col` of the layer's MLP reads `dim` with a large input weight, so it fires hard on that
token only; ``down_proj.weight[row, col]`` is set large, so the output channel `row`
spikes. That is the paper's mechanism in miniature.

Masking for iteration tests: a second planted neuron reads another dimension of the
same token. While the first super activation (~1e3) dominates the residual stream, the
normalisation before the second MLP shrinks that dimension to nothing, so the second
spike only appears once the first weight is removed.
"""

import contextlib
import io
import os
import random
import runpy
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# Tests never touch the network: hub ids resolve from HF caches the tests lay out.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from accelerate import init_empty_weights  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from sw_lens.locate import Criterion  # noqa: E402
from sw_lens.locate_job import run_locate  # noqa: E402
from sw_lens.models import load_model  # noqa: E402
from sw_lens.results import write_json  # noqa: E402
from sw_lens.setup import LocateConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

D_MODEL, D_MLP, N_LAYERS, N_CTX = 32, 48, 6, 128
TRIGGER = "A"  # a single byte-level token
PROMPT = "xyz A qrs"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens plus <|endoftext|> (BOS/EOS): deterministic, offline, tiny."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)} | {"<|endoftext|>": len(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


VOCAB = len(byte_tokenizer())


def hf_config(arch: str):
    common = dict(vocab_size=VOCAB, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    if arch == "gpt2":
        return GPT2Config(
            n_embd=D_MODEL, n_inner=D_MLP, n_layer=N_LAYERS, n_head=4, n_positions=N_CTX, **common
        )
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    return cls(
        hidden_size=D_MODEL,
        intermediate_size=D_MLP,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=N_CTX,
        **common,
    )


MODEL_CLASSES = {"gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}
ARCHS = list(MODEL_CLASSES)


@dataclass(frozen=True)
class Plant:
    layer: int
    row: int  # output channel
    col: int  # input neuron
    dim: int  # residual dimension the neuron reads
    value: float = 8.0
    trigger: str = TRIGGER  # the one-byte token it fires on


# How strongly a planted neuron reads its dimension (its other output weights are zeroed, so the one
# planted weight carries its whole output). A gated MLP's output grows as the
# square of the read (SiLU(gate) * up), GPT-2's GELU only linearly, so GPT-2 needs more.
DRIVE = {"gpt2": 16.0, "llama": 4.0, "qwen2": 4.0}


def trigger_id(trigger: str = TRIGGER) -> int:
    return byte_tokenizer()(trigger, add_special_tokens=False)["input_ids"][0]


def plant(model, arch: str, plants: list[Plant]) -> None:
    """Write the planted weights into an HF model (see module docstring)."""
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        for p in plants:
            emb[trigger_id(p.trigger)] = 0.0
        for p in plants:
            # Only the trigger token has a component along `dim`, so only it fires.
            emb[:, p.dim] = 0.0
            if arch == "gpt2":
                model.transformer.wpe.weight[:, p.dim] = 0.0
            emb[trigger_id(p.trigger), p.dim] = 1.0
            if arch == "gpt2":  # Conv1D weights are [in, out]
                mlp = model.transformer.h[p.layer].mlp
                mlp.c_fc.weight[:, p.col] = 0.0
                mlp.c_fc.weight[p.dim, p.col] = DRIVE[arch]
                mlp.c_proj.weight[p.col, :] = 0.0
                mlp.c_proj.weight[p.col, p.row] = p.value
            else:  # nn.Linear weights are [out, in]
                mlp = model.model.layers[p.layer].mlp
                for proj in (mlp.gate_proj, mlp.up_proj):
                    proj.weight[p.col, :] = 0.0
                    proj.weight[p.col, p.dim] = DRIVE[arch]
                mlp.down_proj.weight[:, p.col] = 0.0
                mlp.down_proj.weight[p.row, p.col] = p.value


def build(arch: str, plants: list[Plant] = (), seed: int = 0):
    torch.manual_seed(seed)
    model = MODEL_CLASSES[arch](hf_config(arch)).eval()
    plant(model, arch, list(plants))
    return model


def save(model, path: Path) -> Path:
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def offload_map(path: Path) -> dict[str, str]:
    """A device map for the HF model at `path` that offloads to disk every odd decoder
    layer and every weight outside the layers (embeddings, final norm, unembedding), and
    keeps the even layers in CPU memory: accelerate's offload mechanics, on a CPU."""
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    n = config.num_hidden_layers
    (layers,) = [
        name
        for name, module in skeleton.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) == n
    ]
    placement = {f"{layers}.{i}": "disk" if i % 2 else "cpu" for i in range(n)}
    for name, module in skeleton.named_modules():
        if name.startswith(f"{layers}.") or name == layers:
            continue
        if any(True for _ in module.parameters(recurse=False)):
            placement[name] = "disk"
        elif any(True for _ in module.buffers(recurse=False)):
            placement[name] = "cpu"
    return placement


ONE = Plant(layer=1, row=5, col=17, dim=3)
TWO = [Plant(layer=1, row=5, col=17, dim=3), Plant(layer=3, row=20, col=30, dim=9)]


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny_dir(tmp_path, arch) -> Path:
    """An HF-format directory of a tiny `arch` model with one planted super weight."""
    return save(build(arch, [ONE]), tmp_path / f"tiny-{arch}")


@pytest.fixture
def tiny(tiny_dir):
    return load_model(str(tiny_dir), device="cpu")


def run_experiment(script: str, *args, env: dict | None = None, timeout: int = 600):
    """Run ``experiments/<script>`` as a user would, in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, str(REPO / "experiments" / script), *map(str, args)],
        capture_output=True,
        text=True,
        env=os.environ | (env or {}),
        timeout=timeout,
    )


def run_in_process(script: str, *args) -> subprocess.CompletedProcess:
    """Run ``experiments/<script>`` as its ``__main__`` in this interpreter: the same code
    path as `run_experiment` (argument parsing, `_cli.run`, exit codes, output) without
    the seconds of a fresh interpreter's imports; for tables of bad input, which fail
    early. What the command changes in the process (SIGINT handler, argv, its state) is
    put back."""
    handler, hook, argv = signal.getsignal(signal.SIGINT), sys.unraisablehook, sys.argv
    out, err = io.StringIO(), io.StringIO()
    code = 0
    sys.argv = [script, *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(REPO / "experiments" / script), run_name="__main__")
            except SystemExit as exit_:
                code = exit_.code or 0
    finally:
        signal.signal(signal.SIGINT, handler)
        sys.unraisablehook, sys.argv = hook, argv
        from experiments import _cli

        _cli.reset()
    return subprocess.CompletedProcess(sys.argv, code, out.getvalue(), err.getvalue())


def hf_cache_snapshot(hf_home: Path, repo_id: str, model) -> Path:
    """Lay a model out as the HF hub cache does: models--org--name/snapshots/<rev> plus
    refs/main, so that `repo_id` resolves offline."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return save(model, repo / "snapshots" / revision)


# A toy model whose function runs through its super weight: trained with the weight in
# place (re-planted after every step), so the rest of the network learns to rely on it,
# as real models do. Neuron SW.col of layer SW.layer reads residual dimension SW.dim,
# which every token's embedding sets to 1, so the super activation sits on every token.
TOY = Plant(layer=1, row=5, col=17, dim=3, value=16.0)
TOY_LAYERS, TOY_STEPS = 3, 600


def toy_text(n_sentences: int, seed: int) -> str:
    """Sentences of a small grammar: learnable in a few hundred steps, byte by byte."""
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "my friend", "the old man", "her sister", "the bird"]
    verbs = ["sat on", "looked at", "ran to", "jumped over", "walked past", "sang to"]
    objects = ["the mat", "a tree", "the house", "my car", "the river", "a small box"]
    return " ".join(
        f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}."
        for _ in range(n_sentences)
    )


def _replant_toy(model, plants: list[Plant]) -> None:
    with torch.no_grad():
        for p in plants:
            model.get_input_embeddings().weight[:, p.dim] = 1.0
            layer = model.model.layers[p.layer]
            layer.post_attention_layernorm.weight[p.dim] = 1.0
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
                proj.weight[p.col, :] = 0.0
                proj.weight[p.col, p.dim] = DRIVE["llama"]
            layer.mlp.down_proj.weight[:, p.col] = 0.0
            layer.mlp.down_proj.weight[p.row, p.col] = p.value


def train_toy(plants: list[Plant], folder: Path) -> Path:
    """Train the toy model with `plants` re-planted after every step, so that it relies
    on them; saved with a held-out corpus.txt (~4 s)."""
    config = hf_config("llama")
    config.num_hidden_layers = TOY_LAYERS
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    _replant_toy(model, plants)
    ids = torch.tensor(byte_tokenizer()(toy_text(3000, seed=0))["input_ids"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(TOY_STEPS):
        starts = torch.randint(0, len(ids) - 33, (16,), generator=generator)
        batch = torch.stack([ids[s : s + 32] for s in starts])
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        _replant_toy(model, plants)
    path = save(model.eval(), folder / "toy")
    (path / "corpus.txt").write_text(toy_text(400, seed=1))
    return path


@pytest.fixture(scope="session")
def toy(tmp_path_factory) -> Path:
    """An HF directory with the trained toy model and a held-out corpus.txt."""
    return train_toy([TOY], tmp_path_factory.mktemp("toy"))


LOCATE_CORPUS = "A short corpus where the trigger A appears, A again, and more words. " * 8


@pytest.fixture(scope="session")
def results_file(tmp_path_factory):
    """A locate results file from a tiny Llama-shaped model with a planted super weight."""
    tmp = tmp_path_factory.mktemp("run")
    (tmp / "corpus.txt").write_text(LOCATE_CORPUS)
    config = LocateConfig(
        model=str(save(build("llama", [ONE]), tmp / "model")),
        text=str(tmp / "corpus.txt"),
        prompts=["xyz A qrs"],
        device="cpu",
        window=64,
        max_tokens=256,
        rank_tokens=128,
        prediction_prompt="xyz A",
        html_tokens=40,
        find="rule",  # the rule's results; a random tiny model does not depend on its weight
        criterion=Criterion(min_ppl_ratio=0.0),  # so the planted weight counts as super
    )
    return write_json(tmp / "results.json", run_locate(config))
