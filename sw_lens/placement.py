"""A model spread over devices by accelerate's ``device_map``: the GPUs of one node, or
CPU and disk offload.

Loading with a device map (`models.load_model`) leaves placement to transformers and
accelerate: each module runs on its own device, and accelerate's hooks move its inputs
there. An *offloaded* module (weights kept in CPU memory or on disk) holds meta
placeholders between calls and loads its weights only around its own forward. sw_lens
reads and edits down-projection weights outside any forward, and runs a second model
over the same weights (the fast twin, `sw_lens.fast`); this module keeps both right:

- `resident`: the weights of offloaded modules stay loaded while a block runs, so they
  can be read and edited in place, and every forward pass in the block uses those same
  tensors. The stored copy (disk, CPU memory) is never written: edits end with the block.
- `share_placement`: the twin runs on the dispatched model's own weight-holding modules
  and hooks, so it computes where the model computes and sees the same edits.
"""

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.hooks import AlignDevicesHook, add_hook_to_module
from accelerate.utils import has_offloaded_params
from torch import nn
from transformers import AutoModelForCausalLM

from sw_lens.errors import SwLensError, untrusted_files

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's own
OFFLOAD = ("cpu", "disk")
DeviceMap = str | dict[str, int | str]


def check_device_map(spec: DeviceMap) -> DeviceMap:
    """One of accelerate's strategies, a dict, or a JSON file of one, mapping module
    names to a GPU (an index or ``cuda:N``), ``cpu`` or ``disk``; checked before
    anything loads."""
    if isinstance(spec, str) and spec in STRATEGIES:
        return spec
    if isinstance(spec, dict):
        mapping, where = spec, "device map"
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise SwLensError(
                f"device map '{spec}' is neither one of {', '.join(STRATEGIES)} nor a JSON file"
            )
        with untrusted_files(f"cannot read device map {path}"):
            mapping = json.loads(path.read_text(encoding="utf-8"))
        where = f"device map {path}"
    if not isinstance(mapping, dict) or not mapping:
        raise SwLensError(f"{where}: expected a JSON object {{module: device}}")
    for module, device in mapping.items():
        valid = (isinstance(device, int) and not isinstance(device, bool) and device >= 0) or (
            isinstance(device, str) and (device in OFFLOAD or _is_cuda(device))
        )
        if not valid:
            raise SwLensError(
                f"{where}: {module!r} -> {device!r}; a device is a GPU index, 'cuda:N', "
                f"'cpu' or 'disk'"
            )
    return mapping


def check_covers(mapping: dict[str, int | str], config, trust_remote_code: bool) -> None:
    """A device map names modules of the model and places every weight: transformers
    loads a map that leaves weights out as if no map had been given."""
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    modules = dict(skeleton.named_modules())
    unknown = sorted(set(mapping) - set(modules))
    if unknown:
        top = ", ".join(name for name, _ in skeleton.named_children())
        raise SwLensError(
            f"device map: the model has no module {unknown[0]!r} (its top modules: {top})"
        )
    placed = [name for name in mapping if name]
    missing = [
        name
        for name, _ in skeleton.named_parameters()
        if "" not in mapping and not any(name.startswith(f"{p}.") for p in placed)
    ]
    if missing:
        raise SwLensError(
            f"device map: no device for {missing[0]} ({len(missing)} weights left out)"
        )


def _is_cuda(device: str) -> bool:
    kind, _, index = device.partition(":")
    return kind == "cuda" and index.isdigit()


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate placed `model` by a device map."""
    return bool(getattr(model, "hf_device_map", None))


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: its hook's device under a device map, else its weights'."""
    hook = getattr(module, "_hf_hook", None)
    if isinstance(hook, AlignDevicesHook) and hook.execution_device is not None:
        return torch.device(hook.execution_device)
    return next(module.parameters()).device


def realized_map(model: nn.Module) -> dict[str, str]:
    """Where each module of a dispatched model was put, as the results record it."""
    return {name: str(device) for name, device in model.hf_device_map.items()}


@contextmanager
def resident(module: nn.Module) -> Iterator[None]:
    """While the block runs, every offloaded module under `module` (itself included)
    keeps its weights loaded on its execution device; nothing to do for the others.
    Nested blocks load nothing twice."""
    with ExitStack() as stack:
        for sub in module.modules():
            if _own_hook(sub) and has_offloaded_params(sub):
                stack.enter_context(_loaded(sub))
        yield


@contextmanager
def _loaded(module: nn.Module) -> Iterator[None]:
    hook = module._hf_hook
    hook.pre_forward(module)  # loads the weights, as before the module's own forward
    hook.offload = False  # forward passes in the block now keep them
    try:
        yield
    finally:
        hook.offload = True
        hook.post_forward(module, None)  # back to meta placeholders


def share_placement(source: nn.Module, twin: nn.Module) -> list[str]:
    """Make `twin`, a model of `source`'s architecture built on the meta device, compute
    where the dispatched `source` computes: the twin takes each of `source`'s modules
    that hold tensors of their own (with their weights, wherever they live, and their
    hooks), and each other module with a hook (a decoder layer moving its inputs to its
    GPU) shares that hook. Names are `source`'s with the bridge's
    ``._original_component`` removed. Returns the twin's modules left without tensors."""
    # Every name: the bridge registers some HF modules under its own names too.
    pairs = [
        (name, module, mine)
        for name, module in source.named_modules(remove_duplicate=False)
        if (mine := _counterpart(twin, name, module)) is not None
    ]
    for name, module, _ in pairs:
        if _holds_tensors(module):
            twin.set_submodule(_plain(name), module)
    # Then the hooks, whose set-up may move the (now shared) tensors below them.
    for _, module, mine in pairs:
        if not _holds_tensors(module) and _own_hook(module):
            add_hook_to_module(mine, module._hf_hook)
    shared = {id(module) for module in source.modules()}
    return [
        name
        for name, module in twin.named_modules()
        if _holds_tensors(module) and id(module) not in shared
    ]


def _counterpart(twin: nn.Module, name: str, module: nn.Module) -> nn.Module | None:
    """The twin's module of the same name and class (None for the bridge's own modules)."""
    try:
        mine = twin.get_submodule(_plain(name))
    except AttributeError:
        return None
    return mine if type(mine) is type(module) else None


def _own_hook(module: nn.Module) -> bool:
    """Whether accelerate hooked `module` itself (a bridge component answers for the HF
    module it wraps)."""
    return "_hf_hook" in vars(module)


def _holds_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(
        True for _ in module.buffers(recurse=False)
    )


def _plain(name: str) -> str:
    return name.replace("._original_component", "")
