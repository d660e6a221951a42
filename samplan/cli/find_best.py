"""samplan_find_best: compare the trained models of a dataset (single, cascaded, ensembled, post-processed) on the
same cross-validation folds and write the inference instructions of the best."""
from __future__ import annotations

import sys

from samplan.cli import make_parser, run_cli

EPILOG = """examples:
  samplan_find_best -d 4                                  # every trained model of Dataset004, the folds they share
  samplan_find_best -d 4 -m unet medsam samzeroshot -f 0 1
  samplan_find_best -d 4 --no-run                         # compare only what exists; make nothing
  samplan_find_best -d 4 --cascade-on unet:3d_fullres     # prompted models only on unet 3d_fullres

Candidates: every trained model that predicts without prompts (its final validation per fold), every prompted
model (samzeroshot, a box-trained medsam) cascaded on each of those (on fold k: its fold-k model, or fold all
when it has no training, prompted by the first stage's fold-k validation predictions: no stage saw the case),
and ensembles of every pair and of all (probabilities averaged in the images' geometry); each with and without
keeping the largest connected component of the labels where that does not lower their mean Dice. Missing
validation probabilities and cascade predictions are made (progress bars) unless --no-run. Writes
$SAMPLAN_RESULTS/<dataset>/find_best/find_best.json and inference_instructions.json/.txt beside the models;
samplan_predict -d D --best -i IN -o OUT predicts with the best, samplan_report -d D shows the comparison.
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    p = make_parser("samplan_find_best", __doc__, EPILOG)
    p.add_argument("-d", "--dataset", required=True, help="dataset id (4), full name or bare name")
    p.add_argument("-m", "--methods", nargs="+", default=None, metavar="M", help="only these methods (default: all)")
    p.add_argument("-f", "--folds", nargs="+", default=None, metavar="F",
                   help="compare on these folds (default: those at least half of the candidates have)")
    p.add_argument("--cascade-on", nargs="+", default=None, metavar="M[:C]", help="first stages of the cascades, "
                   "e.g. unet:3d_fullres (default: every model that predicts without prompts)")
    p.add_argument("--no-run", action="store_true", help="make nothing: candidates or folds that lack predictions "
                   "are left out")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="for what is made")
    args = p.parse_args(argv)

    def job() -> None:
        from samplan.paths import resolve_dataset_name, results_root
        from samplan.pipeline.find_best import find_best

        find_best(args.dataset, args.methods, args.folds, run=not args.no_run, device=args.device,
                  cascade_on=args.cascade_on)
        text = results_root() / resolve_dataset_name(args.dataset) / "inference_instructions.txt"
        print(text.read_text())

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
