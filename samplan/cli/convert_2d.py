"""samplan_convert_2d: convert folders of 2D image/mask pairs (Kvasir-SEG, CVC-ClinicDB, ISIC 2018, ...) into an nnU-Net PNG dataset."""
from __future__ import annotations

import argparse
import sys

from samplan.cli import add_converter_options, make_parser, run_cli

EPILOG = """examples:
  samplan_convert_2d -i Kvasir-SEG -o Dataset510_KvasirSEG                 # images/*.jpg + masks/*.jpg
  samplan_convert_2d -i CVC-ClinicDB -o Dataset511_CVCClinicDB --case-groups cvc_sequences.json
  samplan_convert_2d -i frames/ -o Dataset512_Frames --case-groups "(seq\\d+)_"   # seq01_frame001.png ...
  samplan_convert_2d -i ISIC2018 -o Dataset520_ISIC2018                     # *_Input/ + *_GroundTruth/
  samplan_convert_2d -i data -o ./out/Dataset530_Mine --images img --masks gt --label-name nucleus

Layouts found under -i without --images/--masks: Kvasir-SEG (images/, masks/), CVC-ClinicDB (Original/,
Ground Truth/), ISIC 2018 (*_Input/, *_GroundTruth/ with ISIC_xxx_segmentation.png masks), or one folder
holding both with *_segmentation masks. -o: a DatasetXXX_Name goes into SAMPLAN_RAW, a path is used as is.
Images become 8-bit RGB PNGs {case}_0000.png; masks become 0/1 PNGs, foreground above half the mask's maximum
(0/255, anti-aliased and JPEG masks alike). An image and its mask of different sizes is an error and nothing
is written. --case-groups keeps near-duplicate cases (frames of one video) in one cross-validation fold: a
regular expression whose first group names the group, or a JSON file {group: [case ids]}.
"""


def build_parser() -> argparse.ArgumentParser:
    """Argument parser for samplan_convert_2d."""
    p = make_parser("samplan_convert_2d", __doc__, EPILOG)
    p.add_argument("-i", "--input", required=True, metavar="FOLDER", help="folder holding the images and masks")
    p.add_argument("-o", "--output", required=True, metavar="NAME_OR_DIR", help="DatasetXXX_Name (into SAMPLAN_RAW) or an output folder path")
    p.add_argument("--images", default=None, metavar="DIR", help="image folder inside -i (default: found from the layout)")
    p.add_argument("--masks", default=None, metavar="DIR", help="mask folder inside -i (default: found from the layout)")
    p.add_argument("--mask-suffix", default=None, metavar="SUFFIX",
                   help='mask name = image name + SUFFIX (default: tries "", _segmentation, _Segmentation, _mask)')
    p.add_argument("--label-name", default=None, help="name of label 1 in dataset.json (default: polyp, lesion or foreground by layout)")
    p.add_argument("--case-groups", default=None, metavar="REGEX_OR_JSON",
                   help="cross-validation groups written into dataset.json: a pattern such as \"(seq\\d+)_\" or a JSON file {group: [case ids]}")
    add_converter_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)

    def job() -> None:
        from samplan.dataset.converters.image_pairs import convert_image_pairs

        target = convert_image_pairs(args.input, args.output, images=args.images, masks=args.masks,
                                     mask_suffix=args.mask_suffix, label_name=args.label_name,
                                     case_groups=args.case_groups, num_processes=args.num_processes,
                                     overwrite=args.overwrite)
        print(f"wrote {target}")

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
