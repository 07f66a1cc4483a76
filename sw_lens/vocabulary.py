"""The names sw_lens shares with TransformerLens and Hugging Face, declared once.

A super weight is one scalar with several names. `WeightCoord` is ours and the paper's:
HF ``nn.Linear`` ``down_proj.weight[row, col]`` ([out, in]), row the output channel
(d_model), col the input channel (d_mlp). The layouts below are the other names of the
same scalar (GPT-2's ``Conv1D`` and TransformerLens ``W_out`` store [in, out]), and
`down_proj_parameter` finds the HF parameter behind a layer's ``W_out``. The hook names
are TransformerLens's, which users already know.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from jaxtyping import Float
from pydantic import BeforeValidator
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from sw_lens.errors import SwLensError
from sw_lens.placement import resident


@dataclass(frozen=True, order=True)
class WeightCoord:
    """One scalar of a down-projection: HF ``down_proj.weight[row, col]`` in `layer`."""

    layer: int
    row: int  # output channel, d_model
    col: int  # input channel, d_mlp

    @property
    def w_out_index(self) -> tuple[int, int, int]:
        """TransformerLens ``W_out[layer][col, row]``."""
        return (self.layer, self.col, self.row)

    def __str__(self) -> str:
        return f"layer {self.layer} down_proj.weight[{self.row}, {self.col}]"

    def cli_text(self) -> str:
        """``LAYER,ROW,COL``, as ``--weight`` takes it."""
        return f"{self.layer},{self.row},{self.col}"


def _coordinate(value: Any) -> Any:
    """``"LAYER,ROW,COL"`` (a command line) or ``[layer, row, col]`` (a sweep file)."""
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.split(",")]
        except ValueError:
            raise ValueError(f"expected LAYER,ROW,COL integers, got {value!r:.60}") from None
    if isinstance(value, list):
        if len(value) != 3 or not all(type(v) is int and v >= 0 for v in value):
            raise ValueError(f"expected LAYER,ROW,COL non-negative integers, got {value!r:.60}")
        return WeightCoord(*value)
    return value


Coordinate = Annotated[WeightCoord, BeforeValidator(_coordinate)]  # an option's type


# --- hook names: a layer index, or a letter such as "l" for a label ------------------------


def hook_post(layer: int | str) -> str:
    """The down-projection's input (d_mlp)."""
    return f"blocks.{layer}.mlp.hook_post"


def hook_mlp_out(layer: int | str) -> str:
    """The MLP's output as it enters the residual stream (d_model)."""
    return f"blocks.{layer}.hook_mlp_out"


def hook_down_out(layer: int | str) -> str:
    """The down-projection's own output: `hook_mlp_out` unless the architecture
    normalises after the MLP."""
    return f"blocks.{layer}.mlp.out.hook_out"


def hook_resid_mid(layer: int | str) -> str:
    """The residual stream entering the MLP."""
    return f"blocks.{layer}.hook_resid_mid"


def hook_resid_post(layer: int | str) -> str:
    return f"blocks.{layer}.hook_resid_post"


def hook_attn_out(layer: int | str) -> str:
    """The attention's output as it enters the residual stream (d_model)."""
    return f"blocks.{layer}.hook_attn_out"


def hook_pattern(layer: int | str) -> str:
    """Attention probabilities, [batch, head, query, key]."""
    return f"blocks.{layer}.attn.hook_pattern"


def hook_z(layer: int | str) -> str:
    """Each head's output before the output projection, [batch, pos, head, d_head]."""
    return f"blocks.{layer}.attn.hook_z"


# --- layouts: where (row, col) sits in each stored form of the weight ----------------------

# layout -> (what it indexes, whether its index is (col, row) rather than (row, col))
LAYOUTS: dict[str, tuple[str, bool]] = {
    "hf_linear": ("model.layers.{layer}.mlp.down_proj.weight[{i}, {j}]", False),
    "nanogpt_linear": ("transformer.h.{layer}.mlp.c_proj.weight[{i}, {j}]", False),
    "gpt2_conv1d": ("transformer.h.{layer}.mlp.c_proj.weight[{i}, {j}]", True),
    "tl_w_out": ("blocks[{layer}].mlp.W_out[{i}, {j}]", True),
}


def _layout(layout: str) -> tuple[str, bool]:
    if layout not in LAYOUTS:
        raise SwLensError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    return LAYOUTS[layout]


def stored_index(coord: WeightCoord, linear: bool) -> tuple[int, int]:
    """Index of the weight in a tensor stored as ``nn.Linear`` ([out, in]: (row, col))
    or as ``Conv1D`` / ``W_out`` ([in, out]: (col, row))."""
    return (coord.row, coord.col) if linear else (coord.col, coord.row)


def to_layout(coord: WeightCoord, layout: str) -> tuple[int, int, int]:
    """(layer, i, j) such that the weight is ``tensor[i, j]`` of that layout's tensor."""
    return (coord.layer, *stored_index(coord, linear=not _layout(layout)[1]))


def from_layout(layout: str, layer: int, i: int, j: int) -> WeightCoord:
    """The weight at ``tensor[i, j]`` of `layout`'s tensor in `layer`."""
    _, transposed = _layout(layout)
    return WeightCoord(layer, row=j, col=i) if transposed else WeightCoord(layer, row=i, col=j)


def describe(coord: WeightCoord, layout: str) -> str:
    """The weight written in `layout`, e.g. ``blocks[2].mlp.W_out[666, 447]``."""
    layer, i, j = to_layout(coord, layout)
    return _layout(layout)[0].format(layer=layer, i=i, j=j)


def down_proj_parameter(bridge: TransformerBridge, layer: int) -> tuple[str, bool]:
    """The HF parameter behind ``blocks[layer].mlp.W_out`` and whether it is stored as
    ``nn.Linear`` (``down_proj.weight`` is ``W_out.T``; GPT-2's ``Conv1D``:
    ``c_proj.weight`` is ``W_out`` itself).

    Found by storage identity, not by architecture name, so it holds for every model the
    bridge supports.
    """
    with w_out(bridge, layer) as weight:
        for name, param in bridge.original_model.named_parameters():
            if param.data_ptr() == weight.data_ptr() and param.numel() == weight.numel():
                transposed = param.stride() != weight.stride()
                return name.replace("._original_component", ""), transposed
    raise SwLensError(f"layer {layer}: W_out shares storage with no HF parameter")


@contextmanager
def w_out(bridge: TransformerBridge, layer: int) -> Iterator[Float[Tensor, "d_mlp d_model"]]:
    """``blocks[layer].mlp.W_out`` (a view of the HF weight, never a copy), readable and
    writable in place while the block runs, also where a device map offloads it
    (`placement.resident`)."""
    mlp = bridge.blocks[layer].mlp
    with resident(mlp.out):
        yield mlp.W_out


def b_out(bridge: TransformerBridge, layer: int) -> Float[Tensor, "d_model"] | None:
    """``blocks[layer].mlp.b_out`` (None where the model has no such bias), read from the
    HF module now: TransformerLens binds the alias to the tensor of the day the bridge
    was built, which a device map's offload has since replaced. Read it inside `w_out`."""
    return getattr(bridge.blocks[layer].mlp.out, "bias", None)
