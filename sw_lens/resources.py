"""Will the model fit? Estimated from its config before any weight is read.

Being killed by the OOM killer halfway through loading a 7B model on a laptop says
nothing; a line that says how much is needed, how much is free, and which --dtype or
--device would fit, does.
"""

import psutil
import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM

from sw_lens.errors import SwLensError

GIB = 2**30
OVERHEAD = 1.2  # activations of a forward, tokenizer, allocator slack


def parameter_count(config, trust_remote_code: bool = False) -> int:
    """Exact, without allocating: the model is built on the meta device (with the model's
    own code when the user trusts it, as the load itself will)."""
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return psutil.virtual_memory().available


def check_fits(
    config, name: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False
) -> None:
    check_count(parameter_count(config, trust_remote_code), name, device, dtype)


def fits(config, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the model `config` describes fits `device` whole (see `check_count`)."""
    return needed_bytes(parameter_count(config), dtype) <= available_bytes(device)


def needed_bytes(n_params: int, dtype: torch.dtype) -> float:
    return n_params * torch.empty((), dtype=dtype).element_size() * OVERHEAD


def check_count(n_params: int, name: str, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse, with what would fit, a model of `n_params` that `device` cannot hold."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    needed = needed_bytes(n_params, dtype)
    free = available_bytes(device)
    if needed <= free:
        return
    half = n_params * 2 * OVERHEAD
    hint = f"try --dtype bfloat16 (~{half / GIB:.1f} GiB)" if itemsize > 2 and half <= free else ""
    if not hint and device.type == "cpu" and torch.cuda.is_available():
        hint = "try --device cuda"
    if not hint:  # the ways that need less than the whole model on one device
        hint = "stream it (--stream on) or spread it over GPUs (--device-map)"
    raise SwLensError(
        f"'{name}' has {n_params / 1e9:.2f}B parameters: ~{needed / GIB:.1f} GiB in "
        f"{str(dtype).removeprefix('torch.')} but {free / GIB:.1f} GiB is free on {device}"
        + (f"; {hint}" if hint else "")
    )
