"""Models larger than memory: run a checkpoint one decoder layer at a time from disk.

A 70B model does not fit one GPU, but one of its decoder layers does (~1.7 GB in
bfloat16), and so does the residual stream of a few thousand tokens. `StreamedModel`
builds the HF model class on the meta device, materialises the embeddings, final norm
and unembedding, and reads each decoder layer's tensors from the checkpoint only while
that layer runs (safetensors are memory-mapped: a layer in the page cache costs a copy;
a ``.gguf`` file's tensors are dequantized one at a time, `GGUFCheckpoint`).
Every window's residual stream is kept between layers, so each layer is read once per
pass over the whole text rather than once per batch.

Each layer is called exactly as the model's own forward calls it: one forward of the
skeleton with its decoder layers swapped for recorders captures, per batch of windows,
the residual stream entering layer 0 and every layer's arguments (attention mask,
position embeddings, ...; what differs per layer, like Gemma 2's alternating sliding
window, is captured per layer). The final norm and any logit softcapping are the model's
own too: its forward is run once more with the kept residual injected, stopped at the
unembedding, whose product is then taken in vocabulary chunks. The numbers therefore
equal the in-memory fast path (`sw_lens.fast`) to float rounding, which the coverage
matrix checks on tiny models of all fourteen families.

What it computes: the scan's per-layer maxima (`scan_streamed`), and perplexity with
down-projection weights ablated, a baseline and K ablations sharing every layer below
each ablation's earliest layer (`evaluate_streamed`), as `perplexity.evaluate_sweep`
does in memory; as a `locate.RuleModel`, the spike rule and its effect ranking. An
ablation edits the layer's weights as they are read; the checkpoint is never written.
"""

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_module_tensor_to_device
from jaxtyping import Float, Int
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
from transformers.pytorch_utils import Conv1D

from sw_lens import resources
from sw_lens.errors import SwLensError, untrusted_files
from sw_lens.fast import empty_model, input_of
from sw_lens.layer_major import mlp_sublayer
from sw_lens.models import adds_bos, model_folder
from sw_lens.patching import EditedColumns, Restore, by_layer, rows_of
from sw_lens.perplexity import (
    IGNORE,
    PerplexityResult,
    Protocol,
    batches_on,
    measured,
    per_ablation,
    windows,
)
from sw_lens.predictions import top_tokens
from sw_lens.progress import bar
from sw_lens.resources import GIB
from sw_lens.scan import ScanResult, SpikeReducer, check_texts
from sw_lens.vocabulary import WeightCoord, stored_index

# Logits per unembedding product (16 MiB in float32): a window's logits over a 128k
# vocabulary (2 GiB for 4096 tokens) are never one tensor.
LOGIT_CHUNK = 2**22


class Checkpoint:
    """The tensors of an HF safetensors checkpoint (one file, or shards with an index),
    read one at a time; names as the files spell them."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        try:
            if index.is_file():
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                self.files = {name: folder / file for name, file in weight_map.items()}
            elif (folder / "model.safetensors").is_file():
                with safe_open(folder / "model.safetensors", "pt") as f:
                    self.files = dict.fromkeys(f.keys(), folder / "model.safetensors")
            else:
                raise SwLensError(
                    f"'{folder}' has no safetensors weights (model.safetensors or an index): "
                    f"streaming reads those"
                )
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
            raise SwLensError(f"cannot read the checkpoint index in '{folder}': {err}") from None

    def names(self) -> set[str]:
        return set(self.files)

    def tensor(self, name: str, index: tuple[int, int] | None = None) -> Tensor:
        """Tensor `name`, or only its element at `index` (read alone: a weight of a 70B
        model's down-projection without its 470 MB matrix)."""
        try:
            with safe_open(self.files[name], "pt") as f:
                if index is None:
                    return f.get_tensor(name)
                i, j = index
                return f.get_slice(name)[i : i + 1, j : j + 1][0, 0]
        except (OSError, SafetensorError) as err:
            raise SwLensError(f"cannot read '{name}' from {self.files[name]}: {err}") from None


class GGUFCheckpoint:
    """A ``.gguf`` file's tensors under the model's parameter names, each dequantized when
    it is read; llama.cpp's layout (Llama's permuted q/k rows, GPT-2's transposed
    matrices, Gemma's norms stored as 1 + w) is undone by transformers' own tensor
    processors, as its whole-file loader does."""

    def __init__(self, path: Path, skeleton: nn.Module):
        from gguf import GGUFReader, dequantize
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
            read_field,
        )

        self.path, self.dequantize = path, dequantize
        reader = GGUFReader(path)
        config = load_gguf_checkpoint(path)["config"]  # metadata only
        architecture = read_field(reader, "general.architecture")[0]
        self.processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config)
        self.mapping = get_gguf_hf_weights_map(skeleton, self.processor)
        self.mapping.setdefault("output.weight", "lm_head.weight")  # GPT-2's processor
        self.entries = {self.mapping[t.name]: t for t in reader.tensors if t.name in self.mapping}

    def names(self) -> set[str]:
        return set(self.entries)

    def tensor(self, name: str, index: tuple[int, int] | None = None) -> Tensor:
        entry = self.entries[name]
        parsed = {"tensors": {}}
        result = self.processor.process(
            weights=self.dequantize(entry.data, entry.tensor_type),
            name=entry.name,
            tensor_key_mapping=self.mapping,
            parsed_parameters=parsed,
        )
        weights = parsed["tensors"][name] if result.name is None else result.weights
        tensor = torch.from_numpy(np.copy(weights))  # the file's pages are read-only
        return tensor if index is None else tensor[index]


class _Recorded(Exception):
    """Raised once the last decoder layer's arguments are captured: the rest of the
    forward (final norm, unembedding) is not needed."""


@dataclass
class Batch:
    """Windows that run together: the residual stream, and how each layer is called."""

    input_ids: Int[Tensor, "batch pos"]
    targets: Int[Tensor, "batch pos"]
    resid: Float[Tensor, "batch pos d_model"]
    calls: list[tuple[tuple, dict]]  # per layer: its arguments after the hidden states


class StreamedModel:
    """An HF checkpoint folder run one decoder layer at a time (see the module)."""

    def __init__(
        self,
        folder: Path,
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device,
        dtype: torch.dtype,
        name: str | None = None,
        source: str = "local",
    ):
        self.folder, self.tokenizer = Path(folder), tokenizer
        self.device, self.dtype = device, dtype
        self.name, self.source = name or str(folder), source
        self.adds_bos = adds_bos(tokenizer)
        gguf = self.folder.suffix == ".gguf"
        self.config = (
            AutoConfig.from_pretrained(self.folder.parent, gguf_file=self.folder.name)
            if gguf
            else AutoConfig.from_pretrained(self.folder)
        )
        self.config.__dict__.pop("quantization_config", None)  # dequantized as read
        text = self.config.get_text_config()
        self.n_ctx, self.d_vocab = text.max_position_embeddings, text.vocab_size
        self.skeleton = empty_model(self.config).eval()
        self.n_layers = self.config.get_text_config().num_hidden_layers
        self.parent, self.attr, self.prefix = self._layer_list()
        self.layers = getattr(self.parent, self.attr)
        self.down_proj = [self._down_proj(layer) for layer in self.layers]
        if gguf:
            self.checkpoint = GGUFCheckpoint(self.folder, self.skeleton)
            self.keys = {name: name for name in self.checkpoint.names()}
        else:
            self.checkpoint = Checkpoint(self.folder)
            self.keys = self._checkpoint_keys()
        self._check_complete()
        self._load(self.skeleton, "", skip=self.prefix)  # embeddings, final norm, unembedding
        self.skeleton.tie_weights()
        for name, buffer in self.skeleton.named_buffers():
            if buffer.device != device:
                set_module_tensor_to_device(self.skeleton, name, device, value=buffer)

    # --- structure ----------------------------------------------------------------------

    def _layer_list(self) -> tuple[nn.Module, str, str]:
        for path, module in self.skeleton.named_modules():
            for name, child in module.named_children():
                if isinstance(child, nn.ModuleList) and len(child) == self.n_layers:
                    return module, name, f"{path}.{name}." if path else f"{name}."
        raise SwLensError(f"cannot find the {self.n_layers} decoder layers of {self.folder}")

    def _down_proj(self, layer: nn.Module) -> nn.Module:
        """The MLP's output projection: the one linear map inside ``layer.mlp`` that writes
        d_model channels (``down_proj``, GPT-2's ``c_proj``, NeoX's ``dense_4h_to_h``)."""
        d_model = self.config.get_text_config().hidden_size
        mlp = getattr(layer, "mlp", None)
        found = [
            m
            for m in (mlp.modules() if mlp is not None else ())
            if (isinstance(m, nn.Linear) and m.out_features == d_model)
            or (isinstance(m, Conv1D) and m.nf == d_model)
        ]
        if len(found) != 1:
            raise SwLensError(
                f"cannot find the down-projection of {type(layer).__name__} for streaming"
            )
        return found[0]

    def description(self) -> dict:
        """What a results document says about the model (as `LoadedModel.description`)."""
        return {
            "name": self.name,
            "source": self.source,
            "location": str(self.folder),
            "architecture": type(self.skeleton).__name__,
            "n_layers": self.n_layers,
            "d_model": self.config.get_text_config().hidden_size,
            "d_mlp": self.d_mlp(),
            "n_ctx": self.n_ctx,
            "iter_num": None,
        }

    def checkpoint_weight(self, layer: int, row: int, col: int) -> tuple[str, tuple[int, int]]:
        """Where a weight is in the checkpoint file: its tensor's name there, and index."""
        linear = isinstance(self.down_proj[layer], nn.Linear)
        key = self.keys[self.down_proj_name(layer)]
        return key, stored_index(WeightCoord(layer, row, col), linear)

    def d_mlp(self) -> int:
        down = self.down_proj[0]
        return down.in_features if isinstance(down, nn.Linear) else down.weight.shape[0]

    @property
    def w_out_shape(self) -> tuple[int, int]:
        """(d_mlp, d_model): each layer's ``W_out``."""
        return self.d_mlp(), self.config.get_text_config().hidden_size

    def down_proj_name(self, layer: int) -> str:
        module = self.down_proj[layer]
        relative = next(n for n, m in self.layers[layer].named_modules() if m is module)
        return f"{self.prefix}{layer}.{relative}.weight"

    def _checkpoint_keys(self) -> dict[str, str]:
        """Parameter name -> the checkpoint's name for it, renamed as transformers renames
        keys when it loads (``embed_out`` is GPT-NeoX's ``lm_head``; a GPT-2 checkpoint
        may omit the base model's prefix)."""
        transforms = get_model_conversion_mapping(self.skeleton)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        meta = self.skeleton.state_dict()
        keys = {}
        for key in self.checkpoint.names():
            name, converted = rename_source_key(
                key, renamings, converters, self.skeleton.base_model_prefix, meta
            )
            if converted is not None:
                raise SwLensError(
                    f"'{key}' must be converted as it loads ({type(self.skeleton).__name__}); "
                    f"streaming reads tensors as stored: load the model in memory"
                )
            keys[name] = key
        return keys

    def _key(self, name: str) -> str | None:
        return self.keys.get(name)

    def _check_complete(self) -> None:
        """Every tensor of every layer is in the checkpoint: a missing layer fails now,
        before any compute, naming the layer."""
        tied = getattr(self.config.get_text_config(), "tie_word_embeddings", False)
        output = self.skeleton.get_output_embeddings()
        for name, param in self.skeleton.named_parameters():
            if tied and output is not None and param is output.weight:
                continue
            if self._key(name) is None:
                where = name.removeprefix(self.prefix).split(".")[0]
                what = f"layer {where}" if name.startswith(self.prefix) else "the model"
                raise SwLensError(
                    f"the checkpoint in '{self.folder}' lacks {what}'s tensor '{name}'"
                )

    def _load(self, module: nn.Module, prefix: str, skip: str | None = None, edit=None) -> None:
        """Read `module`'s parameters (named `prefix` + their name) onto the device;
        `edit(name, tensor)` may change one as it is read."""
        for name, param in list(module.named_parameters()):
            full = prefix + name
            if skip and full.startswith(skip):
                continue
            key = self._key(full)
            if key is None:  # tied: `tie_weights` points it at the embeddings
                continue
            tensor = self.checkpoint.tensor(key).to(self.dtype)
            if tuple(tensor.shape) != tuple(param.shape):
                raise SwLensError(
                    f"'{key}' in the checkpoint is {tuple(tensor.shape)}, the model expects "
                    f"{tuple(param.shape)}"
                )
            if edit is not None:
                tensor = edit(full, tensor)
            set_module_tensor_to_device(module, name, self.device, value=tensor)

    @contextmanager
    def layer(self, index: int, edits: Mapping[str, Callable] | None = None) -> Iterator[nn.Module]:
        """Decoder layer `index` with its weights read in (and `edits` applied: parameter
        name -> tensor -> tensor), back on the meta device afterwards."""
        layer, prefix = self.layers[index], f"{self.prefix}{index}."
        edits = edits or {}
        self._load(layer, prefix, edit=lambda name, t: edits[name](t) if name in edits else t)
        try:
            yield layer
        finally:
            for name, _ in list(layer.named_parameters()):
                set_module_tensor_to_device(layer, name, "meta")

    def layer_bytes(self) -> int:
        return sum(p.numel() for p in self.layers[0].parameters()) * self.itemsize()

    def other_bytes(self) -> int:
        n = sum(p.numel() for p in self.skeleton.parameters()) - self.n_layers * sum(
            p.numel() for p in self.layers[0].parameters()
        )
        return n * self.itemsize()

    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    # --- as a `locate.RuleModel`: what the rule and the effect ranking need -------------

    def scan(self, texts, prepend_bos: bool, ablation=()) -> ScanResult:
        return scan_streamed(self, texts, prepend_bos, ablation)

    def weight(self, coord: WeightCoord) -> tuple[float, str, bool]:
        """The weight's value (read from the checkpoint), its parameter and whether that
        is stored as nn.Linear."""
        check_streamed_coords(self, [coord])
        name = self.down_proj_name(coord.layer)
        linear = isinstance(self.down_proj[coord.layer], nn.Linear)
        stored = self.checkpoint.tensor(self.keys[name], stored_index(coord, linear))
        return float(stored.to(self.dtype)), name, linear

    @contextmanager
    def w_out(self, layer: int) -> Iterator[Float[Tensor, "d_mlp d_model"]]:
        """Layer `layer`'s down-projection in ``W_out``'s layout, read from the checkpoint
        (a copy: editing it changes nothing)."""
        tensor = self.checkpoint.tensor(self.keys[self.down_proj_name(layer)]).to(self.dtype)
        yield tensor.T if isinstance(self.down_proj[layer], nn.Linear) else tensor

    def check_coords(self, coords: Sequence[WeightCoord]) -> None:
        check_streamed_coords(self, coords)

    def sweep(self, tokens, protocol: Protocol, corpus: str, ablations, desc: str, scale=0.0):
        return evaluate_streamed(self, tokens, protocol, corpus, ablations, scale, desc)

    def next_token_logits(self, contexts, ablation=(), scale=0.0) -> list[Tensor]:
        return next_token_logits(self, contexts, ablation, scale)

    # --- running ------------------------------------------------------------------------

    @contextmanager
    def _swapped(self, replacements: list[nn.Module]) -> Iterator[None]:
        setattr(self.parent, self.attr, nn.ModuleList(replacements))
        try:
            yield
        finally:
            setattr(self.parent, self.attr, self.layers)

    def prepare(self, input_ids: Int[Tensor, "batch pos"], targets=None) -> Batch:
        """The residual stream entering layer 0 and every layer's call arguments, from one
        forward of the skeleton whose layers only record."""
        calls: list[tuple[tuple, dict]] = []
        entering = {}
        last = self.n_layers - 1

        class Recorder(nn.Module):
            def __init__(self, index: int):
                super().__init__()
                self.index = index

            def forward(self, hidden, *args, **kwargs):
                if self.index == 0:
                    entering["resid"] = hidden
                calls.append((args, kwargs))
                if self.index == last:
                    raise _Recorded
                return hidden

        with self._swapped([Recorder(i) for i in range(self.n_layers)]):
            try:
                self.skeleton(input_ids.to(self.device), use_cache=False)
            except _Recorded:
                pass
        return Batch(input_ids, targets, entering["resid"].clone(), calls)

    def final_hidden(self, batch: Batch) -> Float[Tensor, "batch pos d_model"]:
        """The model's own final norm of `batch`'s residual stream: its forward with the
        residual injected after the layers, stopped at the unembedding's input."""

        class Inject(nn.Module):
            def forward(self, hidden, *args, **kwargs):
                return batch.resid

        ids = batch.input_ids.to(self.device)
        with self._swapped([Inject() for _ in range(self.n_layers)]):
            return input_of(
                self.skeleton.get_output_embeddings(),
                lambda: self.skeleton(ids, use_cache=False),
            )

    def softcapped(self, logits: Tensor) -> Tensor:
        """The model's final logit softcapping (Gemma 2), applied as its forward does."""
        cap = getattr(self.config.get_text_config(), "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def token_nll(self, batch: Batch) -> Float[Tensor, "n_scored"]:
        """Each scored token's NLL, the unembedding taken a few vocabulary rows at a time
        (`LOGIT_CHUNK` logits) with a running log-sum-exp (and the model's final logit
        softcapping, if any)."""
        hidden = self.final_hidden(batch)
        targets = batch.targets.to(self.device).flatten()
        scored = targets != IGNORE
        h = hidden.flatten(0, 1)[scored]
        wanted = targets[scored]
        output = self.skeleton.get_output_embeddings()
        lse = torch.full((len(h),), -torch.inf, device=self.device)
        target_logit = torch.zeros(len(h), device=self.device)
        step = max(1, LOGIT_CHUNK // max(1, len(h)))
        for start in range(0, output.weight.shape[0], step):
            rows = slice(start, start + step)
            bias = output.bias[rows] if getattr(output, "bias", None) is not None else None
            logits = self.softcapped(nn.functional.linear(h, output.weight[rows], bias).float())
            lse = torch.logaddexp(lse, logits.logsumexp(-1))
            inside = (wanted >= start) & (wanted < start + logits.shape[1])
            picked = logits.gather(1, (wanted - start).clamp(0, logits.shape[1] - 1)[:, None])
            target_logit = torch.where(inside, picked[:, 0], target_logit)
        return (lse - target_logit).double().cpu()

    def run_layer(
        self, index: int, batches: Sequence[Batch], edits=None, hooks: Callable | None = None
    ) -> None:
        """Layer `index` over every batch, in place; `hooks(layer, batch_index)` may
        register module hooks for one batch and returns their handles."""
        with self.layer(index, edits) as layer:
            for b, batch in enumerate(batches):
                args, kwargs = batch.calls[index]
                handles = hooks(layer, b) if hooks else []
                try:
                    out = layer(batch.resid, *args, **kwargs)
                finally:
                    for handle in handles:
                        handle.remove()
                batch.resid = out[0] if isinstance(out, tuple) else out


def next_token_logits(
    model: StreamedModel,
    contexts: Sequence[Int[Tensor, "pos"]],
    ablation: Sequence[WeightCoord] = (),
    scale: float = 0.0,
) -> list[Float[Tensor, "d_vocab"]]:
    """The logits after each of `contexts`, with `ablation`'s weights multiplied by
    `scale`: every context through each layer while it is read."""
    check_streamed_coords(model, ablation)
    with torch.inference_mode():
        batches = [model.prepare(ids[None]) for ids in contexts]
        edits = scaled_weights(model, ablation, scale)
        for index in bar(range(model.n_layers), desc="next tokens", unit="layer"):
            model.run_layer(index, batches, edits)
        output = model.skeleton.get_output_embeddings()
        return [
            model.softcapped(output(model.final_hidden(b)[0, -1]).float()).cpu() for b in batches
        ]


def top_predictions(
    model: StreamedModel, ids: Int[Tensor, "pos"], ablation: Sequence[WeightCoord] = (), k: int = 5
) -> list[dict]:
    """`predictions.top_predictions` streamed: the k most likely next tokens after `ids`,
    with `ablation`'s weights zeroed."""
    (logits,) = next_token_logits(model, [ids], ablation)
    return top_tokens(model.tokenizer, logits, k)


def open_streamed(name: str, device: torch.device, dtype: torch.dtype) -> StreamedModel:
    """`name` (embedded, local folder, hub id or ``.gguf`` file) ready to stream, with its
    own tokenizer; what it holds is checked before any layer is read."""
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        with untrusted_files(f"cannot stream '{name}'"):
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            return StreamedModel(path.resolve(), tokenizer, device, dtype, name, "gguf")
    source, folder = model_folder(name)
    with untrusted_files(f"cannot stream '{name}'"):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return StreamedModel(folder, tokenizer, device, dtype, name, source)


def evaluate_edited(
    model: StreamedModel,
    tokens: Int[Tensor, "n_tokens"],
    protocol: Protocol,
    corpus: str,
    edits: Mapping[str, Callable[[Tensor], Tensor]],
    desc: str = "streamed",
) -> PerplexityResult:
    """Perplexity with `edits` (parameter name -> tensor -> tensor) applied to each
    weight as its layer is read, e.g. quantization; the checkpoint is never written."""
    batches, cut = _every_layer(model, tokens, protocol, desc, edits)
    with torch.inference_mode():
        return _scored(model, batches, cut, protocol, corpus)


def _every_layer(
    model: StreamedModel,
    tokens: Int[Tensor, "n_tokens"],
    protocol: Protocol,
    desc: str,
    edits: Mapping[str, Callable] | None = None,
    hooks: Callable[[int], Callable | None] = lambda index: None,
) -> tuple[list[Batch], list]:
    """`tokens`' windows through every layer, with `edits` and each layer's `hooks` (see
    `StreamedModel.run_layer`); the batches hold the last layer's residual streams."""
    cut = windows(tokens, protocol, model.tokenizer.bos_token_id)
    batches = _prepared(model, cut, protocol, desc)
    with torch.inference_mode():
        for index in bar(range(model.n_layers), desc=desc, unit="layer"):
            model.run_layer(index, batches, edits, hooks(index))
    return batches, cut


def row_maxima(
    model: StreamedModel, texts: Sequence[Int[Tensor, "pos"]], coords: Sequence[WeightCoord]
) -> dict[tuple[int, int], float]:
    """(layer, row) -> the largest |down-projection output[:, row]| of each weight's
    layer over `texts`, signed (`restore.super_activations`, streamed: the layers up to
    the last one `coords` name are read)."""
    check_streamed_coords(model, coords)
    best: dict[tuple[int, int], float] = {}

    def watching(index: int) -> Callable:
        rows = sorted({c.row for c in coords if c.layer == index})

        def seen(module, args, out: Float[Tensor, "1 pos d_model"]) -> None:
            for row in rows:
                values = out[0, :, row]
                value = float(values[values.abs().argmax()])
                if abs(value) > abs(best.get((index, row), 0.0)):
                    best[index, row] = value

        return lambda layer, b: [model.down_proj[index].register_forward_hook(seen)]

    with torch.inference_mode():
        batches = [model.prepare(ids[None]) for ids in texts]
        for index in range(max(c.layer for c in coords) + 1):
            model.run_layer(index, batches, hooks=watching(index))
    return best


def evaluate_restored(
    model: StreamedModel,
    tokens: Int[Tensor, "n_tokens"],
    protocol: Protocol,
    corpus: str,
    coords: Sequence[WeightCoord],
    restore_above: Restore,
    desc: str = "restored",
) -> PerplexityResult:
    """`perplexity.evaluate` with `coords` zeroed and `restore_above`, streamed: each
    ablated layer is read unedited, and its down-projection's output recomputed with the
    weights zeroed except where the unablated value reaches the threshold
    (`patching.EditedColumns`, built from the layer as it is read)."""
    check_streamed_coords(model, coords)
    grouped = by_layer(coords)
    edits: dict[int, EditedColumns] = {}

    def restoring(index: int) -> Callable | None:
        down = model.down_proj[index]

        def register(layer, b) -> list:
            if index not in edits:
                weight = down.weight.T if isinstance(down, nn.Linear) else down.weight
                edits[index] = EditedColumns(
                    weight, down.bias, grouped[index], 0.0, rows_of(restore_above, index)
                )
            return [
                down.register_forward_hook(lambda m, args, out: edits[index].apply(args[0], out))
            ]

        return register if index in grouped else None

    batches, cut = _every_layer(model, tokens, protocol, desc, hooks=restoring)
    with torch.inference_mode():
        losses = [model.token_nll(b) for b in batches]
    return measured(model.dtype, corpus, protocol, losses, cut, edits)


def scaled_weights(model: StreamedModel, coords: Sequence[WeightCoord], scale: float) -> dict:
    """Per parameter name, the edit that multiplies each weight in `coords` by `scale` as
    the layer is read (a copy: the checkpoint is not touched)."""
    by_name: dict[str, list[WeightCoord]] = {}
    for c in coords:
        by_name.setdefault(model.down_proj_name(c.layer), []).append(c)

    def edit(tensor: Tensor, group: list[WeightCoord]) -> Tensor:
        tensor = tensor.clone()
        linear = isinstance(model.down_proj[group[0].layer], nn.Linear)
        for c in group:
            tensor[stored_index(c, linear)] *= scale
        return tensor

    return {name: (lambda t, g=group: edit(t, g)) for name, group in by_name.items()}


def check_streamed_coords(model: StreamedModel, coords: Sequence[WeightCoord]) -> None:
    d_mlp, d_model = model.w_out_shape
    for c in coords:
        if not (0 <= c.layer < model.n_layers and 0 <= c.row < d_model and 0 <= c.col < d_mlp):
            raise SwLensError(
                f"{c} is out of range ({model.n_layers} layers, d_model {d_model}, d_mlp {d_mlp})"
            )


def _prepared(model: StreamedModel, cut, protocol: Protocol, desc: str) -> list[Batch]:
    with torch.inference_mode():
        return [
            model.prepare(*batch())
            for batch in bar(batches_on(cut, protocol, "cpu"), desc=f"{desc}: embed", unit="batch")
        ]


def _scored(model: StreamedModel, batches, cut, protocol, corpus) -> PerplexityResult:
    losses = [model.token_nll(b) for b in batches]
    return measured(model.dtype, corpus, protocol, losses, cut)


def evaluate_streamed(
    model: StreamedModel,
    tokens: Int[Tensor, "n_tokens"],
    protocol: Protocol,
    corpus: str,
    ablations: Sequence[Sequence[WeightCoord]] = (),
    scale: float | Sequence[float] = 0.0,
    desc: str = "streamed",
) -> tuple[PerplexityResult, list[PerplexityResult]]:
    """A baseline and K ablations (each weight multiplied by `scale`, or by its own
    scale when a sequence is given), as `perplexity.evaluate_sweep` computes them,
    streaming layers from disk: the baseline
    reads every layer once; an ablation whose earliest layer is L forks from the
    baseline's residual stream entering L and reads layers L..n again, before the
    baseline goes on. At most two residual streams exist at a time, whatever K."""
    for coords in ablations:
        check_streamed_coords(model, coords)
    scales = per_ablation(scale, ablations)
    cut = windows(tokens, protocol, model.tokenizer.bos_token_id)
    batches = _prepared(model, cut, protocol, desc)
    forking: dict[int, list[int]] = {}  # layer -> the ablations that start there
    for k, coords in enumerate(ablations):
        if coords:
            forking.setdefault(min(c.layer for c in coords), []).append(k)
    ablated: list[PerplexityResult | None] = [None] * len(ablations)
    with torch.inference_mode():
        for index in bar(range(model.n_layers), desc=f"{desc}: baseline", unit="layer"):
            for k in forking.get(index, []):
                fork = [replace(b, resid=b.resid.clone()) for b in batches]
                edits = scaled_weights(model, ablations[k], scales[k])
                for layer in bar(
                    range(index, model.n_layers), desc=f"{desc}: ablation {k + 1}", unit="layer"
                ):
                    model.run_layer(layer, fork, edits)
                ablated[k] = _scored(model, fork, cut, protocol, corpus)
            model.run_layer(index, batches)
        baseline = _scored(model, batches, cut, protocol, corpus)
    return baseline, [baseline if a is None else a for a in ablated]


def scan_streamed(
    model: StreamedModel,
    texts: Sequence[Int[Tensor, "pos"]],
    prepend_bos: bool,
    ablation: Sequence[WeightCoord] = (),
) -> ScanResult:
    """`scan.scan` streamed: every text through each layer in turn, the down-projection's
    input and output (and the residual entering the MLP, and what it adds) reduced to
    per-layer maxima by the same `scan.SpikeReducer`; `ablation`'s weights zeroed."""
    check_texts(texts)
    check_streamed_coords(model, ablation)
    reducer = SpikeReducer(model.n_layers, model.tokenizer)
    with torch.inference_mode():
        batches = [model.prepare(ids[None]) for ids in texts]
        edits = scaled_weights(model, ablation, 0.0)
        for index in bar(range(model.n_layers), desc="streamed scan", unit="layer"):
            model.run_layer(index, batches, edits, _reducer_hooks(model, reducer, texts, index))
    return reducer.result(prepend_bos, texts)


def _reducer_hooks(model: StreamedModel, reducer: SpikeReducer, texts, index: int):
    def register(layer: nn.Module, text: int) -> list:
        state = {}
        before, after = mlp_sublayer(layer)

        def on_down(module, args, out):
            state.update(post=args[0][0], down=out[0])
            if after is None:
                reduce()

        def reduce(added=None):
            reducer.update(
                index,
                text,
                texts[text],
                post=state.pop("post"),
                mlp_out=state.pop("down"),
                resid_mid=state.pop("resid_mid", None),
                added=added,
            )

        handles = [model.down_proj[index].register_forward_hook(on_down)]
        if before is not None:
            handles.append(
                before.register_forward_pre_hook(lambda m, args: state.update(resid_mid=args[0][0]))
            )
        if after is not None:
            handles.append(after.register_forward_hook(lambda m, args, out: reduce(out[0])))
        return handles

    return register


def streaming_bytes(model: StreamedModel, n_tokens: int, window: int, batch_size: int) -> int:
    """Memory a streamed run holds at its peak: one decoder layer, the model's other
    weights (embeddings, final norm, unembedding), every token's residual stream (twice
    while an ablation forks from it), and one batch's activations inside a layer (the
    MLP's three d_mlp-wide tensors) or at the unembedding (a chunk of logits and its
    temporaries)."""
    residual = 2 * n_tokens * model.config.get_text_config().hidden_size * model.itemsize()
    positions = batch_size * window
    logits = min(LOGIT_CHUNK, positions * model.d_vocab)
    activations = max(positions * 3 * model.d_mlp(), 3 * logits) * 4
    return model.layer_bytes() + model.other_bytes() + residual + activations


def check_streamable(model: StreamedModel, n_tokens: int, window: int, batch_size: int) -> None:
    """Refuse, in one line, a streamed run that would not fit the device either."""
    needed = streaming_bytes(model, n_tokens, window, batch_size)
    free = resources.available_bytes(model.device)
    if needed > free:
        raise SwLensError(
            f"streaming needs ~{needed / GIB:.2f} GiB (one layer, the embeddings, the "
            f"residual stream of {n_tokens} tokens, one batch's activations) but "
            f"{free / GIB:.2f} GiB is free on {model.device}: use fewer --max-tokens or a "
            f"smaller --batch-size"
        )
