"""How extreme a weight is within its own down-projection matrix.

The paper's claim is that a super weight is not merely large: it is an outlier among
millions of weights of the same matrix. We summarise the matrix (mean, std, histogram,
rank of |w|) so the figure can be drawn from the results file alone.
"""

from dataclasses import dataclass

import torch
from transformer_lens.model_bridge import TransformerBridge

from sw_lens.vocabulary import WeightCoord, w_out


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
    with w_out(model, coord.layer) as weight:
        matrix = weight.detach().double()
    value = float(matrix[coord.col, coord.row])
    mean, std = float(matrix.mean()), float(matrix.std())
    counts, edges = torch.histogram(matrix.flatten().cpu(), bins=bins)
    return WeightDistribution(
        layer=coord.layer,
        row=coord.row,
        col=coord.col,
        value=value,
        mean=mean,
        std=std,
        z_score=(value - mean) / std,
        rank=int((matrix.abs() > abs(value)).sum()) + 1,
        n_weights=matrix.numel(),
        edges=edges.tolist(),
        counts=[int(c) for c in counts],
    )
