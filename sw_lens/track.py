"""Super weights across training checkpoints: when do they appear, and how large are they?

Each checkpoint is loaded, scanned on the same prompts and run through the same rule;
optionally its perplexity is measured with and without what was found. Checkpoints are
processed one at a time, so memory holds one model.
"""

import logging
from dataclasses import asdict
from pathlib import Path

from sw_lens.corpora import load_corpus, tokenize
from sw_lens.documents import SCHEMA_VERSION, Track
from sw_lens.errors import SwLensError
from sw_lens.locate import locate
from sw_lens.models import load_model, resolve_device, resolve_dtype
from sw_lens.perplexity import Protocol, check_window, evaluate
from sw_lens.results import provenance, typed
from sw_lens.setup import LocateConfig, prompt_tokens

log = logging.getLogger(__name__)


def checkpoint_paths(inputs: list[str]) -> list[Path]:
    """Files as given; folders contribute their ``*.pt`` files."""
    paths = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(path.glob("*.pt"))
        elif path.is_file():
            paths.append(path)
        else:
            raise SwLensError(f"checkpoint '{item}' does not exist")
    if not paths:
        raise SwLensError(f"no checkpoints (*.pt) in {', '.join(inputs)}")
    return paths


def track_checkpoint(path: Path, config: LocateConfig, ppl: bool) -> tuple[dict, dict]:
    """The checkpoint's model as results describe it, and its record."""
    loaded = load_model(
        str(path),
        config.device,
        config.dtype,
        tokenizer_name=config.tokenizer,
        device_map=config.device_map,
    )
    model = loaded.bridge
    texts = prompt_tokens(loaded, config.prompts, loaded.adds_bos)
    found = locate(model, texts, loaded.adds_bos, config.criterion, config.iterations)
    layers = found.scans[0].layers
    spike = max(layers, key=lambda s: s.mlp_out.magnitude)
    record = {
        "path": str(path),
        "iter_num": loaded.iter_num,
        "spike": {
            "layer": spike.layer,
            "magnitude": spike.mlp_out.magnitude,
            "post_channel": spike.post.channel,
            "mlp_out_channel": spike.mlp_out.channel,
            "token": spike.mlp_out.token,
        },
        "max_post": [s.post.magnitude for s in layers],
        "max_mlp_out": [s.mlp_out.magnitude for s in layers],
        "candidates": [
            asdict(c.coord)
            | {"value": c.value, "role": c.role, "iteration": c.iteration}
            | dict(
                zip(
                    ("checkpoint_param", "checkpoint_index"),
                    loaded.checkpoint_weight(c.coord.layer, c.coord.row, c.coord.col),
                    strict=True,
                )
            )
            for c in found.candidates
        ],
        "perplexity": None,
    }
    if ppl:
        protocol = Protocol(  # BOS: the model's own convention
            config.window, config.stride, loaded.adds_bos, config.max_tokens, config.batch_size
        )
        check_window(model.cfg.n_ctx, protocol)
        corpus = load_corpus(config.text)
        budget = protocol.max_tokens and max(protocol.max_tokens, protocol.window)
        tokens = tokenize(loaded.tokenizer, corpus.text, model.cfg.d_vocab, budget)
        baseline = evaluate(model, tokens, protocol, corpus.name, desc="baseline")
        creators = [c.coord for c in found.candidates if c.role == "creates"]
        ablated = (
            evaluate(
                model,
                tokens,
                protocol,
                corpus.name,
                creators,
                desc="ablated",
            )
            if creators
            else None
        )
        record["perplexity"] = {
            "baseline": baseline.to_dict(),
            "ablated": ablated and ablated.to_dict(),
        }
    return loaded.description(), record


SHAPE = ("n_layers", "d_model", "d_mlp")


def track(paths: list[Path], config: LocateConfig, ppl: bool = False) -> Track:
    """The track document: one record per checkpoint, in training order, of checkpoints
    of one shape (the model it names is the first)."""
    models, records = [], []
    for path in paths:
        log.info("checkpoint %s", path)
        model, record = track_checkpoint(path, config, ppl)
        if models and [model[k] for k in SHAPE] != [models[0][k] for k in SHAPE]:
            raise SwLensError(
                f"checkpoint '{path}' is not the shape of '{paths[0]}' ({', '.join(SHAPE)}): "
                f"track one model's checkpoints"
            )
        models.append(model)
        records.append(record)
    records.sort(key=lambda r: (r["iter_num"] is None, r["iter_num"] or 0, r["path"]))
    return typed(
        {
            "schema_version": SCHEMA_VERSION,
            "kind": "track",
            "model": models[0],
            "prompts": config.prompts,
            "criterion": config.criterion.to_dict(),
            "checkpoints": records,
            "provenance": provenance(
                resolve_device(config.device), resolve_dtype(config.dtype), config.seed
            ),
        }
    )


CSV_COLUMNS = [
    "iter_num",
    "path",
    "spike_layer",
    "spike_magnitude",
    "post_channel",
    "mlp_out_channel",
    "token",
    "weights",
    "ppl_baseline",
    "ppl_ablated",
    "ppl_protocol",
]


def csv_rows(document: Track) -> list[dict]:
    """One row per checkpoint; weights as ``layer:row,col=value`` joined by ``;``."""
    rows = []
    for r in document.checkpoints:
        ppl, spike = r.perplexity, r.spike
        rows.append(
            {
                "iter_num": r.iter_num,
                "path": r.path,
                "spike_layer": spike.layer,
                "spike_magnitude": spike.magnitude,
                "post_channel": spike.post_channel,
                "mlp_out_channel": spike.mlp_out_channel,
                "token": spike.token,
                "weights": ";".join(
                    f"{c.layer}:{c.row},{c.col}={c.value:.6g}" for c in r.candidates
                ),
                "ppl_baseline": ppl and ppl.baseline.perplexity,
                "ppl_ablated": ppl and ppl.ablated and ppl.ablated.perplexity,
                # A perplexity without its protocol is not a result.
                "ppl_protocol": ppl
                and (
                    f"{ppl.baseline.corpus}, {ppl.baseline.protocol_description}, "
                    f"{ppl.baseline.n_tokens} tokens scored"
                ),
            }
        )
    return rows
