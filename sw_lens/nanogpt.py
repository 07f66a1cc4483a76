"""nanoGPT checkpoints as Hugging Face GPT-2 models (TransformerLens 4 has no converter).

nanoGPT (karpathy/nanoGPT, ``model.py``) is GPT-2 with three differences that matter:
its ``nn.Linear`` weights are [out, in] where GPT-2's ``Conv1D`` is [in, out], so the
four projection weights are transposed; its MLP uses exact GELU (``nn.GELU()``), not
GPT-2's tanh approximation, so the config asks for ``activation_function="gelu"``; and
with ``bias=False`` it has no biases at all, which GPT-2 expresses as zero biases.
``torch.compile`` prefixes keys with ``_orig_mod.``; the ``attn.bias`` causal-mask
buffers (present when flash attention is unavailable) carry no weights.

Every key and shape is checked before copying: a checkpoint from a fork with options
this converter does not know (RMSNorm, SwiGLU, rotary...) fails naming the keys, never
loads as a silently different model. Super weights keep nanoGPT's own coordinates:
``transformer.h.{l}.mlp.c_proj.weight[row, col]``, the HF ``down_proj`` convention.
"""

import hashlib
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from torch import Tensor
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from sw_lens.errors import SwLensError, untrusted_files
from sw_lens.vocabulary import WeightCoord, stored_index

PREFIX = "_orig_mod."
UNK = "<unk>"
REQUIRED_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
LAYER_KEYS = [
    "ln_1.weight",
    "ln_1.bias",
    "attn.c_attn.weight",
    "attn.c_attn.bias",
    "attn.c_proj.weight",
    "attn.c_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
]


@dataclass
class Checkpoint:
    """A nanoGPT state dict (prefix stripped) with its model_args and training step."""

    state_dict: dict[str, Tensor]
    model_args: dict
    iter_num: int | None
    dataset: str | None  # config["dataset"], where nanoGPT keeps meta.pkl


def read_checkpoint(path: Path) -> Checkpoint:
    """``ckpt.pt`` as nanoGPT's train.py writes it, or a bare state dict with a
    ``model_args.json`` beside it. Loaded with ``weights_only=True``: nothing in the file
    is executed."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise SwLensError(f"cannot read checkpoint {path}: {first}") from None
    if not isinstance(raw, dict):
        raise SwLensError(f"checkpoint {path} holds a {type(raw).__name__}, not a dict")
    if "model" in raw:
        state, args = raw["model"], raw.get("model_args")
        if args is None:
            raise SwLensError(f"checkpoint {path} has a 'model' state dict but no 'model_args'")
        config = raw.get("config") or {}
        if not isinstance(config, dict):
            raise SwLensError(f"checkpoint {path}: 'config' is a {type(config).__name__}")
        dataset = config.get("dataset")
        if dataset is not None and not (isinstance(dataset, str) and _plain_name(dataset)):
            raise SwLensError(
                f"checkpoint {path}: config.dataset {dataset!r:.40} is no folder name"
            )
        iter_num = raw.get("iter_num")
        if iter_num is not None and (not _is_int(iter_num) or iter_num < 0):
            raise SwLensError(f"checkpoint {path}: iter_num {iter_num!r:.40} is no step number")
        return Checkpoint(_state_dict(state, path), _model_args(args, path), iter_num, dataset)
    if all(isinstance(v, Tensor) for v in raw.values()):
        args_file = path.with_name("model_args.json")
        if not args_file.is_file():
            raise SwLensError(
                f"{path} is a bare state dict: put its model_args (n_layer, n_head, n_embd, "
                f"block_size, vocab_size, bias) in {args_file}"
            )
        try:
            args = json.loads(args_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise SwLensError(f"{args_file} is not valid JSON: {err}") from None
        return Checkpoint(_state_dict(raw, path), _model_args(args, args_file), None, None)
    raise SwLensError(f"{path} is neither a nanoGPT checkpoint nor a state dict")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _plain_name(text: str) -> bool:
    """A dataset name used as a folder under data/: no path separators or parents."""
    return bool(text) and "/" not in text and "\\" not in text and text not in (".", "..")


def _state_dict(state, where: Path) -> dict[str, Tensor]:
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise SwLensError(f"{where}: 'model' is not a state dict of named tensors")
    return _strip(state)


def _model_args(args, where: Path) -> dict:
    """nanoGPT's GPTConfig fields, checked: positive integers, n_embd a multiple of
    n_head, bias a bool. Anything else in a file is refused before it sizes a model."""
    if not isinstance(args, dict):
        raise SwLensError(f"{where}: model_args is a {type(args).__name__}, not a table")
    missing = [k for k in REQUIRED_ARGS if k not in args]
    if missing:
        raise SwLensError(f"{where}: model_args lack {', '.join(missing)}")
    for key in REQUIRED_ARGS:
        if not _is_int(args[key]) or args[key] < 1:
            raise SwLensError(
                f"{where}: model_args {key} must be a positive integer, got {args[key]!r:.40}"
            )
    if args["n_embd"] % args["n_head"]:
        raise SwLensError(
            f"{where}: model_args n_embd {args['n_embd']} is not a multiple of n_head "
            f"{args['n_head']}"
        )
    if not isinstance(args.get("bias", True), bool):
        raise SwLensError(f"{where}: model_args bias must be true or false, got {args['bias']!r}")
    return dict(args)


def _strip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop ``torch.compile``'s key prefix and the causal-mask buffers."""
    stripped = {k.removeprefix(PREFIX): v for k, v in state.items()}
    return {k: v for k, v in stripped.items() if not k.endswith(".attn.bias") or v.dim() != 4}


def gpt2_config(model_args: dict) -> GPT2Config:
    """The GPT-2 config of checked model_args (`read_checkpoint`)."""
    a = model_args
    return GPT2Config(
        vocab_size=a["vocab_size"],
        n_positions=a["block_size"],
        n_embd=a["n_embd"],
        n_layer=a["n_layer"],
        n_head=a["n_head"],
        n_inner=4 * a["n_embd"],
        activation_function="gelu",  # nanoGPT's nn.GELU() is exact, not the tanh form
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,  # F.layer_norm's default, which nanoGPT uses
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
    )


def parameter_count(model_args: dict) -> int:
    """Parameters of the GPT-2 model `to_gpt2` builds, by formula: checked before anything
    is allocated (model_args come from the file). Per layer: two LayerNorms (4d),
    attention (4d^2 + 4d) and the MLP (8d^2 + 5d); the unembedding is tied."""
    d, n_layer = model_args["n_embd"], model_args["n_layer"]
    embeddings = (model_args["vocab_size"] + model_args["block_size"]) * d
    return embeddings + n_layer * (12 * d * d + 13 * d) + 2 * d


def expected_keys(model_args: dict) -> set[str]:
    keys = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"}
    keys |= {f"transformer.h.{i}.{k}" for i in range(model_args["n_layer"]) for k in LAYER_KEYS}
    keys.add("transformer.ln_f.bias")
    if not model_args.get("bias", True):
        keys = {k for k in keys if not k.endswith(".bias")}
    return keys


def to_gpt2(checkpoint: Checkpoint) -> GPT2LMHeadModel:
    """The HF GPT-2 model whose forward equals nanoGPT's on this checkpoint."""
    args = checkpoint.model_args
    config = gpt2_config(args)
    state = dict(checkpoint.state_dict)
    lm_head = state.pop("lm_head.weight", None)
    expected = expected_keys(args)
    unexpected, missing = sorted(set(state) - expected), sorted(expected - set(state))
    if unexpected or missing:
        parts = [
            f"unexpected keys {', '.join(unexpected[:6])}" if unexpected else "",
            f"missing keys {', '.join(missing[:6])}" if missing else "",
        ]
        raise SwLensError(
            "not a checkpoint of nanoGPT's GPT (a fork with other options?): "
            + "; ".join(p for p in parts if p)
        )
    if lm_head is not None and (
        lm_head.shape != state["transformer.wte.weight"].shape
        or not torch.equal(lm_head, state["transformer.wte.weight"])
    ):
        raise SwLensError("lm_head.weight differs from transformer.wte.weight; nanoGPT ties them")
    with torch.device("meta"):  # shapes first: model_args must not size a model unchecked
        target = GPT2LMHeadModel(config).state_dict()
    for key, tensor in state.items():
        value = tensor.t() if key.endswith(TRANSPOSED) else tensor
        if value.shape != target[key].shape:
            raise SwLensError(f"{key}: shape {tuple(tensor.shape)} does not fit model_args {args}")
    model = GPT2LMHeadModel(config)
    target = model.state_dict()
    converted = {}
    for key, tensor in state.items():
        converted[key] = (tensor.t() if key.endswith(TRANSPOSED) else tensor).float()
    for key in target:  # bias=False: nanoGPT has none, GPT-2's are zero
        if key.endswith(".bias") and key not in converted:
            converted[key] = torch.zeros_like(target[key])
    converted["lm_head.weight"] = converted["transformer.wte.weight"]
    model.load_state_dict(converted, strict=True)
    return model.eval()


def checkpoint_weight(layer: int, row: int, col: int) -> tuple[str, tuple[int, int]]:
    """Where a super weight lives in the nanoGPT checkpoint: ``c_proj`` is an
    ``nn.Linear``, [out, in], so HF's [row, col] order holds."""
    index = stored_index(WeightCoord(layer, row, col), linear=True)
    return f"transformer.h.{layer}.mlp.c_proj.weight", index


class _PlainUnpickler(pickle.Unpickler):
    """meta.pkl is a pickle, so reading it could run code: allow no globals at all
    (dicts, lists, strings and numbers need none)."""

    def find_class(self, module: str, name: str):
        raise SwLensError(
            f"meta.pkl refers to {module}.{name}; only plain dicts, strings and numbers are "
            f"read from it"
        )


def read_meta(path: Path) -> dict:
    """nanoGPT's character-level vocabulary (``stoi``, ``itos``, ``vocab_size``)."""
    try:
        with open(path, "rb") as f:
            meta = _PlainUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise SwLensError(f"cannot read {path}: {err}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("stoi"), dict):
        raise SwLensError(f"{path} has no 'stoi' vocabulary")
    stoi = meta["stoi"]
    if not stoi:
        raise SwLensError(f"{path}: the 'stoi' vocabulary is empty")
    for ch, i in stoi.items():
        if not isinstance(ch, str) or not ch or not _is_int(i) or i < 0:
            raise SwLensError(
                f"{path}: 'stoi' must map characters to non-negative integer ids, got "
                f"{ch!r:.20} -> {i!r:.20}"
            )
    if len(set(stoi.values())) != len(stoi):
        raise SwLensError(f"{path}: two characters of 'stoi' share an id")
    return meta


def find_meta(checkpoint_path: Path, dataset: str | None) -> Path | None:
    """meta.pkl beside the checkpoint, or in nanoGPT's ``data/<dataset>/`` next to any
    folder above it (train.py runs from the repo root: out-<name>/ckpt.pt and
    data/<dataset>/meta.pkl are siblings)."""
    candidates = [checkpoint_path.with_name("meta.pkl")]
    if dataset:
        candidates += [p / "data" / dataset / "meta.pkl" for p in checkpoint_path.parents]
    return next((p for p in candidates if p.is_file()), None)


def char_tokenizer(meta: dict, directory: Path) -> PreTrainedTokenizerBase:
    """nanoGPT's character vocabulary as an HF tokenizer, saved to `directory` (the bridge
    reloads tokenizers from disk). A character outside the vocabulary becomes ``<unk>``,
    whose id lies past the model's vocabulary, so it is refused before any forward."""
    stoi = dict(meta["stoi"])  # checked by read_meta: str -> distinct int >= 0
    vocab = stoi | {UNK: max(stoi.values()) + 1}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK)
    fast.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def load_tokenizer(
    checkpoint_path: Path, checkpoint: Checkpoint, given: str | None, cache: Path
) -> PreTrainedTokenizerBase:
    """The user's ``--tokenizer`` (meta.pkl, or an HF tokenizer directory or id), else
    nanoGPT's meta.pkl where train.py leaves it, else GPT-2's BPE from the HF cache."""
    meta_path = Path(given) if given and given.endswith(".pkl") else None
    if given is None:
        meta_path = find_meta(checkpoint_path, checkpoint.dataset)
    if meta_path is not None:
        if not meta_path.is_file():
            raise SwLensError(f"tokenizer file {meta_path} does not exist")
        meta = read_meta(meta_path)
        digest = hashlib.sha256(meta_path.read_bytes()).hexdigest()[:16]
        return char_tokenizer(meta, cache / "nanogpt-tokenizers" / digest)
    with untrusted_files(f"cannot load tokenizer '{given}'"):  # e.g. a malformed one
        try:
            return AutoTokenizer.from_pretrained(given or "gpt2")
        except (OSError, ValueError):
            raise SwLensError(
                f"no tokenizer for {checkpoint_path}: no meta.pkl beside it or in "
                f"data/{checkpoint.dataset or '<dataset>'}/, and '{given or 'gpt2'}' is not "
                f"in the HF cache; pass --tokenizer (a meta.pkl, or an HF tokenizer directory)"
            ) from None
