"""sw_lens: find super weights in language models with TransformerLens and measure them.

Data flows one way: text -> tokens -> scan -> locate / search -> patching -> perplexity
-> results.
"""

from sw_lens.corpora import Corpus, load_corpus, tokenize
from sw_lens.decompose import Decomposition, decompose
from sw_lens.errors import NonFiniteActivation, SwLensError
from sw_lens.layer_major import scan_layer_major
from sw_lens.locate import Candidate, Criterion, LocateResult, locate, rank_by_effect
from sw_lens.models import LoadedModel, load_model
from sw_lens.patching import ablation_hooks, edited_weights
from sw_lens.perplexity import PerplexityResult, Protocol, evaluate, evaluate_sweep
from sw_lens.scan import ScanResult, scan, scan_with_cache
from sw_lens.search import SearchParameters, SearchResult
from sw_lens.vocabulary import WeightCoord

__all__ = [
    "Candidate",
    "Corpus",
    "Criterion",
    "Decomposition",
    "LoadedModel",
    "LocateResult",
    "NonFiniteActivation",
    "PerplexityResult",
    "Protocol",
    "ScanResult",
    "SearchParameters",
    "SearchResult",
    "SwLensError",
    "WeightCoord",
    "ablation_hooks",
    "decompose",
    "edited_weights",
    "evaluate",
    "evaluate_sweep",
    "load_corpus",
    "load_model",
    "locate",
    "rank_by_effect",
    "scan",
    "scan_layer_major",
    "scan_with_cache",
    "tokenize",
]
