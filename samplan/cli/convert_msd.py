"""samplan_convert_msd: convert a Medical Segmentation Decathlon task folder into an nnU-Net v2 raw dataset in SAMPLAN_RAW."""
from __future__ import annotations

import argparse
import sys

from samplan.cli import add_converter_options, make_parser, run_cli

EPILOG = """examples:
  samplan_convert_msd -i Task04_Hippocampus              # -> $SAMPLAN_RAW/Dataset004_Hippocampus
  samplan_convert_msd -i Task01_BrainTumour -np 2        # -> Dataset001_BrainTumour with BraTS regions WT/TC/ET
  samplan_convert_msd -i Task05_Prostate -d 105          # -> Dataset105_Prostate (id 5 is taken)
  samplan_convert_msd -i Task01_BrainTumour --no-regions # keep the disjoint labels 1 edema, 2 non-enh., 3 enh.

4D images are split into one 3D file per modality ({case}_0000.nii.gz, _0001, ...; spacing, origin and
direction kept), 3D images and labels are copied, imagesTs is converted too, macOS ._* files are skipped, and
dataset.json is translated (channel_names from "modality", labels inverted to name -> value). The result is
verified before it is renamed into place; an existing dataset is kept unless --overwrite.
"""


def build_parser() -> argparse.ArgumentParser:
    """Argument parser for samplan_convert_msd."""
    p = make_parser("samplan_convert_msd", __doc__, EPILOG)
    p.add_argument("-i", "--input", required=True, metavar="TASK_DIR", help="extracted MSD task folder TaskXX_Name")
    p.add_argument("-d", "--dataset-id", type=int, default=None, metavar="ID", help="dataset id (default: the task number XX)")
    p.add_argument("--no-regions", action="store_true", help="BraTS: keep the disjoint labels instead of the WT/TC/ET regions")
    add_converter_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)

    def job() -> None:
        from samplan.dataset.converters.msd import convert_msd

        target = convert_msd(args.input, dataset_id=args.dataset_id, num_processes=args.num_processes,
                             overwrite=args.overwrite, regions=not args.no_regions)
        print(f"wrote {target}")

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
