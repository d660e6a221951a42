"""samplan_convert_prostate158: convert the unzipped Prostate158 dataset into an nnU-Net v2 raw dataset in SAMPLAN_RAW."""
from __future__ import annotations

import argparse
import sys

from samplan.cli import add_converter_options, make_parser, run_cli

EPILOG = """examples:
  samplan_convert_prostate158 -i prostate158_train                  # -> Dataset158_Prostate158Anatomy (T2; TZ, PZ)
  samplan_convert_prostate158 -i prostate158 --task tumor           # train + test zips -> Dataset159_Prostate158Tumor
  samplan_convert_prostate158 -i prostate158_train --task anatomy --channels t2 adc dwi -d 160
  samplan_convert_prostate158 -i prostate158_train --task tumor --tumor-label t2 -o ./Dataset161_P158TumorT2

-i holds train.csv/valid.csv (prostate158_train) and/or test.csv (prostate158_test), or those folders. Defaults follow
the dataset paper's baselines: anatomy = T2 with t2_anatomy_reader1 (1 central gland/transition zone, 2 peripheral
zone); tumor = T2, ADC, DWI with adc_tumor_reader1 (1 tumour; cases without one get an empty label). ADC/DWI not on the
T2 grid are resampled onto it (SimpleITK, linear; ADC-drawn labels nearest neighbour) and listed in dataset.json.
train + valid -> imagesTr/labelsTr, test -> imagesTs/labelsTs; the official split is kept in dataset.json.
"""


def build_parser() -> argparse.ArgumentParser:
    """Argument parser for samplan_convert_prostate158."""
    p = make_parser("samplan_convert_prostate158", __doc__, EPILOG)
    p.add_argument("-i", "--input", required=True, metavar="FOLDER", help="unzipped prostate158_train (and/or _test) folder")
    p.add_argument("--task", choices=("anatomy", "tumor"), default="anatomy", help="which labels to convert (default: anatomy)")
    p.add_argument("--channels", nargs="+", choices=("t2", "adc", "dwi"), default=None,
                   help="input channels in order (default: t2 for anatomy; t2 adc dwi for tumor)")
    p.add_argument("--reader", type=int, choices=(1, 2), default=1, help="annotating reader (2 exists for the test cases only)")
    p.add_argument("--tumor-label", choices=("adc", "t2"), default="adc",
                   help="tumor: the lesions drawn on ADC (default, as the paper's baseline) or on T2")
    add_converter_options(p, "default: 158 anatomy, 159 tumor")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)

    def job() -> None:
        from samplan.dataset.converters.prostate158 import convert_prostate158

        target = convert_prostate158(args.input, task=args.task, channels=args.channels, reader=args.reader,
                                     tumor_label=args.tumor_label, dataset_id=args.dataset_id, output=args.output,
                                     num_processes=args.num_processes, overwrite=args.overwrite)
        print(f"wrote {target}")

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
