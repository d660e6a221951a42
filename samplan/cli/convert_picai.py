"""samplan_convert_picai: convert unpacked PI-CAI images and picai_labels into an nnU-Net v2 raw dataset in SAMPLAN_RAW."""
from __future__ import annotations

import argparse
import sys

from samplan.cli import add_converter_options, make_parser, run_cli

EPILOG = """examples:
  samplan_convert_picai -i images/ -l picai_labels/                 # -> Dataset224_PICAI (human-expert labels)
  samplan_convert_picai -i images/ -l picai_labels/ --labels ai     # -> Dataset225_PICAIwithAIlabels (all 1500 studies)
  samplan_convert_picai -i picai_folds/ -l picai_labels/ -d 230 --interpolation linear -np 2

-i holds {patient_id}/{patient_id}_{study_id}_t2w.mha, _adc.mha, _hbv.mha (the unpacked picai_public_images_fold0..4
zips, or the folder holding those fold folders); -l is the picai_labels repository. As the PI-CAI baseline converts
(picai_prep mha2nnunet): case {patient_id}_{study_id}; channels T2, ADC, HBV; ADC/HBV resampled onto the T2W scan
(cubic B-spline by default) where their grid differs; every label value >= 1 (ISUP >= 2) becomes csPCa lesion 1.
Studies without a human-expert delineation are skipped unless --labels ai (then the AI-derived Bosma22a delineation
is used for them and the case is listed in dataset.json).
"""


def build_parser() -> argparse.ArgumentParser:
    """Argument parser for samplan_convert_picai."""
    p = make_parser("samplan_convert_picai", __doc__, EPILOG)
    p.add_argument("-i", "--input", required=True, metavar="IMAGES", help="folder of the unpacked PI-CAI image folds")
    p.add_argument("-l", "--labels-dir", required=True, metavar="PICAI_LABELS", help="root of the picai_labels repository")
    p.add_argument("--labels", choices=("human", "ai"), default="human",
                   help="human: human-expert delineations only (default); ai: AI-derived ones where no human one exists")
    p.add_argument("--interpolation", choices=("bspline", "linear"), default="bspline",
                   help="resampling of ADC/HBV onto T2W (default: bspline, as picai_prep)")
    add_converter_options(p, "default: 224 human, 225 ai")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)

    def job() -> None:
        from samplan.dataset.converters.picai import convert_picai

        target = convert_picai(args.input, args.labels_dir, labels=args.labels, interpolation=args.interpolation,
                               dataset_id=args.dataset_id, output=args.output, num_processes=args.num_processes,
                               overwrite=args.overwrite)
        print(f"wrote {target}")

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
