"""samplan_convert_covid19ct: convert the unpacked COVID-19-CT-Seg zips (zenodo 3757476) into an nnU-Net v2 raw dataset."""
from __future__ import annotations

import argparse
import sys

from samplan.cli import add_converter_options, make_parser, run_cli

EPILOG = """examples:
  samplan_convert_covid19ct -i COVID-19-CT-Seg/                           # -> Dataset190_COVID19CTSegInfection
  samplan_convert_covid19ct -i COVID-19-CT-Seg/ --labels lungs            # -> Dataset191 (left lung 1, right lung 2)
  samplan_convert_covid19ct -i COVID-19-CT-Seg/ --labels lungs --merge-lungs          # -> Dataset192 (lung 1)
  samplan_convert_covid19ct -i COVID-19-CT-Seg/ --labels lungs_and_infection --intensities keep -d 195

-i holds COVID-19-CT-Seg_20cases/ and Lung_Mask/, Infection_Mask/, Lung_and_Infection_Mask/ (or Kaggle's ct_scans/,
lung_mask/, ...). Intensities: the 10 radiopaedia scans are published clipped to [-1250, 250] HU and scaled to [0, 255],
the 10 coronacases scans in HU. lung-window (default) maps the HU scans the same way, as the dataset's authors
recommend, so that all share one scale; keep writes both scales as published. Either way each scan's scale is found
from its values and recorded in dataset.json ("intensities"). Cases are named after their mask files; the two scans of
radiopaedia cases 10 and 29 share a cross-validation group.
"""


def build_parser() -> argparse.ArgumentParser:
    """Argument parser for samplan_convert_covid19ct."""
    p = make_parser("samplan_convert_covid19ct", __doc__, EPILOG)
    p.add_argument("-i", "--input", required=True, metavar="FOLDER", help="folder holding the unpacked zips")
    p.add_argument("--labels", choices=("infection", "lungs", "lungs_and_infection"), default="infection",
                   help="which masks to convert (default: infection)")
    p.add_argument("--merge-lungs", action="store_true", help="one label 'lung' instead of 'left lung' and 'right lung'")
    p.add_argument("--intensities", choices=("lung-window", "keep"), default="lung-window",
                   help="lung-window: map HU scans to the published [0, 255] lung window (default); keep: as published")
    add_converter_options(p, "default: 190 infection, 191 lungs, 192 merged lungs, 193 lungs+infection, 194 merged")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)

    def job() -> None:
        from samplan.dataset.converters.covid19ct import convert_covid19ct

        target = convert_covid19ct(args.input, labels=args.labels, merge_lungs=args.merge_lungs,
                                   intensities=args.intensities, dataset_id=args.dataset_id, output=args.output,
                                   num_processes=args.num_processes, overwrite=args.overwrite)
        print(f"wrote {target}")

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
