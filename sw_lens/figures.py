"""Figures drawn from a results document only, never from a model.

Because they read the saved JSON, figures can be restyled and regenerated in seconds
(``experiments/figures.py``) without loading the model again.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or wanted
import matplotlib.pyplot as plt  # noqa: E402

from sw_lens.results import write_atomic  # noqa: E402

HOOKS = {
    "post": ("down_proj_input_max", "max |blocks.{l}.mlp.hook_post|", "down-projection input"),
    "mlp_out": ("down_proj_output_max", "max |blocks.{l}.hook_mlp_out|", "down-projection output"),
}


def layer_maxima(document: dict, out_dir: Path, log_scale: bool = True) -> list[Path]:
    """The original project's two plots: per layer, the largest |down-projection input|
    and |output| on the scanned prompt, with the super-weight layers marked."""
    layers = document["scan"]["layers"]
    marks = {c["layer"]: c for c in document["super_weights"] or document["candidates"]}
    paths = []
    for key, (stem, ylabel, what) in HOOKS.items():
        xs = [s["layer"] for s in layers]
        ys = [abs(s[key]["value"]) for s in layers]
        fig, ax = plt.subplots(figsize=(6.0, 3.2), layout="constrained")
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, color="tab:blue")
        for layer, c in marks.items():
            spike = layers[layer][key]
            channel = c["col"] if key == "post" else c["row"]
            ax.plot([layer], [abs(spike["value"])], marker="o", color="tab:red", markersize=6)
            ax.annotate(
                f"layer {layer}, channel {channel}\ntoken {spike['token']!r}",
                (layer, abs(spike["value"])),
                textcoords="offset points",
                xytext=(6, -4),
                fontsize=7,
                va="top",
            )
        if log_scale:
            ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel.replace("{l}", "l"))
        ax.set_title(f"{document['model']['name']}: max |{what}| per layer", fontsize=9)
        prompts = "; ".join(document["scan"]["prompts"])
        bos = "BOS prepended" if document["scan"]["prepend_bos"] else "no BOS"
        fig.text(0.01, -0.02, f"prompt: {prompts!r} ({bos})", fontsize=6, va="top")
        path = Path(out_dir) / f"{stem}.png"
        write_atomic(
            path, lambda tmp, fig=fig: fig.savefig(tmp, dpi=150, bbox_inches="tight", format="png")
        )
        plt.close(fig)
        paths.append(path)
    return paths
