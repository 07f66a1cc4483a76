"""Super weights across training: scan each nanoGPT (or any) checkpoint on the same
prompt and report, per checkpoint by iter_num, the largest down-projection spike and the
super weights the rule finds, with their values. Writes track.json, track.csv and a
figure (spike and super-weight value against training step).
"""

import csv
import io
from pathlib import Path

from experiments._cli import Parser, publish, run
from sw_lens.figures import track_figure
from sw_lens.options import add_options, from_args
from sw_lens.results import check_writable, write_atomic, write_json
from sw_lens.setup import LOADING, RULE, LocateConfig
from sw_lens.track import CSV_COLUMNS, checkpoint_paths, csv_rows, track

CORPUS = ("text", "max_tokens", "window", "stride", "batch_size")


def main() -> None:
    p = Parser(description=__doc__)
    p.add_argument("checkpoints", nargs="+", help="checkpoint files, or folders of *.pt files")
    add_options(
        p, LocateConfig, ("prompt", *LOADING, *RULE, *CORPUS), defaults={"max_tokens": 2048}
    )
    p.add_argument("--ppl", action="store_true", help="also measure perplexity per checkpoint")
    p.add_argument("--out", type=Path, default=Path("out/track"), help="output directory")
    args = p.parse_args()
    check_writable(args.out)
    paths = checkpoint_paths(args.checkpoints)
    document = track(paths, from_args(LocateConfig, args), args.ppl)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(csv_rows(document))

    def write(folder: Path) -> list[Path]:
        table = write_atomic(folder / "track.csv", lambda tmp: tmp.write_text(buffer.getvalue()))
        return [write_json(folder / "track.json", document), table, *track_figure(document, folder)]

    figures = publish(args.out, write)[2:]
    print(f"{'iter_num':>9}  {'largest spike':<32} super weights")
    for row in csv_rows(document):
        spike = f"layer {row['spike_layer']} |out| {row['spike_magnitude']:.1f} ({row['token']!r})"
        print(f"{row['iter_num']!s:>9}  {spike:<32} {row['weights'] or '-'}")
    print(f"\nwrote {args.out / 'track.json'}, track.csv and {len(figures)} figure files")


if __name__ == "__main__":
    run(main)
