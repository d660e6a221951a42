"""samplan_install_model: verify a model archive of samplan_export_model and install it into SAMPLAN_RESULTS."""
from __future__ import annotations

import argparse
import sys

from samplan.cli import make_parser, run_cli

EPILOG = """examples:
  samplan_install_model hippocampus_unet.zip
  SAMPLAN_RESULTS=/data/results samplan_install_model medsam.zip --overwrite

Every member is checked before anything is written: the manifest's schema, member names (no absolute paths, '..'
or links), that archive and manifest list the same files, sizes (zip bombs), every sha256, and the plans format
version. The model then appears as SAMPLAN_RESULTS/<dataset>/<method>__<plans>__<configuration> (with the archive's
manifest.json); predict with samplan_predict. Checkpoints are only hashed here, never loaded.
"""


def build_parser() -> argparse.ArgumentParser:
    """Argument parser for samplan_install_model."""
    p = make_parser("samplan_install_model", __doc__, EPILOG)
    p.add_argument("archive", metavar="ZIP", help="archive written by samplan_export_model")
    p.add_argument("--overwrite", action="store_true", help="replace a model folder of the same name")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)

    def job() -> None:
        from samplan.pipeline.model_sharing import install_model

        m, target = install_model(args.archive, overwrite=args.overwrite)
        weights = m["pretrained_weights"]
        print(f"installed {target} (samplan {m['samplan_version']}; folds {' '.join(m['folds'])}, checkpoint "
              f"{' and '.join(m['checkpoints'])})")
        if weights:
            print(f"pretrained weights: {weights.get('backbone')} ({weights.get('file')}), licence {weights.get('licence')}")
        print(f"predict with: samplan_predict -i IN -o OUT -d {m['dataset_name']} -m {m['method']} -c {m['configuration']}"
              + (f" -p {m['plans_name']}" if m["plans_name"] != "samplanPlans" else ""))

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
