"""Published super-weight coordinates, the layouts they are written in, and a check of
what sw_lens found against them.

The same scalar has four names. The registry (``data/known_super_weights.toml``) uses
one, HF ``nn.Linear`` ``down_proj.weight[row, col]`` ([out, in]), the same as
`WeightCoord`; `sw_lens.vocabulary.to_layout` / `from_layout` convert to and from the
others, so a
coordinate quoted from GPT-2's ``Conv1D``, a nanoGPT checkpoint or TransformerLens
``W_out`` is never transposed by hand. The original project's GPT-2 claim shows why
this matters: "row 447, col 666" in nanoGPT's layout is ``W_out[2][666, 447]``.
"""

import math
from dataclasses import dataclass
from pathlib import Path

from pydantic import model_validator
from transformer_lens.model_bridge import TransformerBridge

from sw_lens.documents import Index, Strict, validate
from sw_lens.errors import SwLensError
from sw_lens.locate import Candidate
from sw_lens.patching import check_coords, weight_value
from sw_lens.results import read_toml
from sw_lens.vocabulary import WeightCoord, describe

REGISTRY = Path(__file__).parent / "data" / "known_super_weights.toml"
CONVENTION = "HF down_proj.weight[row, col] (nn.Linear, [out, in])"


@dataclass(frozen=True)
class KnownWeight:
    coord: WeightCoord
    source: str  # citation
    published: str  # the coordinate as its source wrote it
    value: float | None  # the weight's value, where the source gives it


@dataclass(frozen=True)
class KnownModel:
    name: str
    ids: tuple[str, ...]
    weights: tuple[KnownWeight, ...]


def _key(name: str) -> str:
    """ "meta-llama/Llama-2-7b-hf" and a local folder ".../Llama-2-7b-hf/" -> "llama-2-7b-hf"."""
    return Path(name.rstrip("/")).name.lower()


class _Weight(Strict):
    layer: Index
    row: Index
    col: Index
    source: str
    published: str = ""
    value: float | None = None


class _Model(Strict):
    name: str
    ids: list[str]
    weights: list[_Weight]


class _Source(Strict):
    cite: str


class _Registry(Strict):
    """The registry file's schema: a file given with --registry is untrusted input."""

    sources: dict[str, _Source]
    models: list[_Model]

    @model_validator(mode="after")
    def _cited(self):
        for model in self.models:
            for w in model.weights:
                if w.source not in self.sources:
                    raise ValueError(f"{model.name}: source '{w.source}' is not in [sources]")
        return self


def load_registry(path: Path | str | None = None) -> list[KnownModel]:
    """The registry's models (the packaged file unless `path`), or a one-line error
    naming the entry that is malformed."""
    path = Path(path) if path else REGISTRY
    data = read_toml(path, "registry")
    validate(data, _Registry, f"registry '{path}'")
    return [
        KnownModel(
            model["name"],
            tuple(model["ids"]),
            tuple(
                KnownWeight(
                    WeightCoord(w["layer"], w["row"], w["col"]),
                    data["sources"][w["source"]]["cite"],
                    w.get("published", ""),
                    w.get("value"),
                )
                for w in model["weights"]
            ),
        )
        for model in data["models"]
    ]


def lookup(models: list[KnownModel], name: str) -> KnownModel | None:
    key = _key(name)
    for model in models:
        if key in {_key(i) for i in model.ids} or key == _key(model.name):
            return model
    return None


def check_fits(model: TransformerBridge, known: KnownModel) -> None:
    """A registry coordinate outside the loaded model's shape is an error: either the
    wrong model was matched or the entry is wrong."""
    for w in known.weights:
        try:
            check_coords(model, [w.coord])
        except SwLensError as err:
            raise SwLensError(
                f"registry entry for {known.name} ({w.published or w.coord}): {err}"
            ) from None


@dataclass
class KnownCheck:
    status: str  # "match", "named, not super", "mismatch" or "not in registry"
    message: str
    coord: WeightCoord | None = None  # the registry's weight, or the found one if not in it
    published: str | None = None
    source: str | None = None
    registry_value: float | None = None
    model_value: float | None = None  # the loaded model's weight at `coord`
    value_agrees: bool | None = None  # model_value vs registry_value, where both exist


def _agrees(model_value: float, registry_value: float | None) -> bool | None:
    if registry_value is None:
        return None
    # Sources quote 4-5 significant digits; bfloat16 keeps about 3.
    return math.isclose(model_value, registry_value, rel_tol=5e-3, abs_tol=1e-4)


def check_known(
    model: TransformerBridge, known: KnownModel | None, candidates: list[Candidate]
) -> list[KnownCheck]:
    """Each registry weight of the model against the candidates found (match: found and
    called super; named, not super: the rule names it but zeroing it does little;
    mismatch: not found), then each super weight found that the registry lacks."""
    found = {c.coord: c for c in candidates}
    checks = []
    for w in known.weights if known else ():
        value = weight_value(model, w.coord)
        agrees = _agrees(value, w.value)
        c = found.get(w.coord)
        if c is not None and c.is_super:
            status, what = "match", f"found as a super weight (perplexity x{c.effect:.3g})"
        elif c is not None:
            status, what = "named, not super", f"named by the rule, zeroing it: x{c.effect:.3g}"
        else:
            status, what = "mismatch", "not found"
            same_layer = [str(c.coord) for c in candidates if c.coord.layer == w.coord.layer]
            if same_layer:
                what += f"; found in its layer: {', '.join(same_layer)}"
        stated = "" if w.value is None else f", registry value {w.value:g}"
        value_note = {None: "", True: " (agrees)", False: " (DIFFERS)"}[agrees]
        checks.append(
            KnownCheck(
                status,
                f"{status}: registry {w.coord} [{w.published}; {w.source}]: {what}; "
                f"model value {value:.5g}{stated}{value_note}",
                coord=w.coord,
                published=w.published,
                source=w.source,
                registry_value=w.value,
                model_value=value,
                value_agrees=agrees,
            )
        )
    listed = {w.coord for w in known.weights} if known else set()
    for c in candidates:
        if c.is_super and c.coord not in listed:
            name = "the registry has no entry for this model" if not known else "not listed"
            message = (
                f"not in registry: found {c.coord} = {describe(c.coord, 'tl_w_out')} "
                f"(value {c.value:.5g}); {name}"
            )
            checks.append(KnownCheck("not in registry", message, c.coord, model_value=c.value))
    if not checks:
        message = "not in registry: no entry for this model, and no super weight was found"
        checks.append(KnownCheck("not in registry", message))
    return checks
