"""How extreme a weight is within its own down-projection matrix.

The paper's claim is that a super weight is not merely large: it is an outlier among
millions of weights of the same matrix. We summarise the matrix (mean, std, histogram,
rank of |w|) so the figure can be drawn from the results file alone.
"""

from dataclasses import dataclass

import torch
from transformer_lens.model_bridge import TransformerBridge

from sw_lens.patching import weight_value
from sw_lens.vocabulary import WeightCoord


@dataclass
class WeightDistribution:
    layer: int
    row: int
    col: int
    value: float
    mean: float
    std: float
    z_score: float  # (value - mean) / std over the whole matrix
    rank: int  # 1 = largest |w| in the matrix
    n_weights: int
    edges: list[float]  # histogram of all weights of the matrix
    counts: list[int]


def weight_distribution(
    model: TransformerBridge, coord: WeightCoord, bins: int = 201
) -> WeightDistribution:
    w_out = model.blocks[coord.layer].mlp.W_out.detach().double()
    value = weight_value(model, coord)
    mean, std = float(w_out.mean()), float(w_out.std())
    counts, edges = torch.histogram(w_out.flatten().cpu(), bins=bins)
    return WeightDistribution(
        layer=coord.layer,
        row=coord.row,
        col=coord.col,
        value=value,
        mean=mean,
        std=std,
        z_score=(value - mean) / std,
        rank=int((w_out.abs() > abs(value)).sum()) + 1,
        n_weights=w_out.numel(),
        edges=edges.tolist(),
        counts=[int(c) for c in counts],
    )
