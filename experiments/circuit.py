"""How the super weights act inside the model. Zeroes them and measures: which heads lose
their attention sink (the super-activation token), which heads and MLPs carry the loss
increase (exact activation patching both ways, and attribution patching with the
agreement between the two), and the super-activation token's residual stream and logit
lens per layer. Writes circuit.json, three figures and an attention page
(circuit_attention.html, opens offline).
"""

from experiments._cli import experiment, print_header, run, save_results
from sw_lens.figures import circuit_figure
from sw_lens.studies import CircuitOptions, circuit_study
from sw_lens.summaries import circuit_summary


def main() -> None:
    args, prepared, options = experiment(__doc__, CircuitOptions)
    document = circuit_study(prepared, options)
    print_header(document)
    print(circuit_summary(document))
    save_results(args, "circuit", document, circuit_figure)


if __name__ == "__main__":
    run(main)
