"""samplan_convert_dicom: convert every DICOM series under a folder into {case}_0000.nii.gz images (one case per series)."""
from __future__ import annotations

import argparse
import sys

from samplan.cli import add_converter_options, make_parser, run_cli

EPILOG = """examples:
  samplan_convert_dicom -i dicom/ -o imagesTs/            # then: samplan_predict -i imagesTs/ -o out/
  samplan_convert_dicom -i /data/study42 -o nifti/ -np 2 --overwrite

Each series becomes {case}_0000.nii.gz, named after its folder (patientA/CT/ -> CT_0000.nii.gz; folders of one
name in different places -> patientA_CT, patientB_CT; several series in one folder -> CT_1, CT_2 by
SeriesNumber). Slices are ordered by their position (not by file name) and the series' spacing, origin and
direction are kept; a series with missing slices or uneven gaps is refused. The output folder is written
complete or not at all; an existing one is kept unless --overwrite.
"""


def build_parser() -> argparse.ArgumentParser:
    """Argument parser for samplan_convert_dicom."""
    p = make_parser("samplan_convert_dicom", __doc__, EPILOG)
    p.add_argument("-i", "--input", required=True, metavar="DIR", help="folder with DICOM files, searched recursively")
    p.add_argument("-o", "--output", required=True, metavar="IMAGES_DIR", help="folder to write {case}_0000.nii.gz into")
    add_converter_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)

    def job() -> None:
        from samplan.dataset.converters.dicom import convert_dicom

        cases = convert_dicom(args.input, args.output, num_processes=args.num_processes, overwrite=args.overwrite)
        for case, info in cases.items():
            size = "x".join(map(str, info["size"]))
            spacing = "x".join(f"{s:g}" for s in info["spacing"])
            print(f"  {case}_0000.nii.gz  <- {info['source']}  ({info['slices']} file(s), {size} voxels, {spacing} mm)")
        print(f"wrote {len(cases)} series to {args.output}")

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
