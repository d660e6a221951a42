"""samplan_export_model: pack a trained model folder into one zip archive (with a sha256 manifest) to hand on."""
from __future__ import annotations

import argparse
import sys

from samplan.cli import make_parser, run_cli

EPILOG = """examples:
  samplan_export_model -d 4 -m unet -o hippocampus_unet.zip                 # every fold with checkpoint_final
  samplan_export_model -d Hippocampus -m unet -c 3d_fullres -f 0 1 -o unet_f01.zip
  samplan_export_model -d 1 -m medsam -f all --checkpoint both -o medsam.zip

The model folder is found as samplan_predict finds it (SAMPLAN_RESULTS/<dataset>/<method>__<plans>__<configuration>).
The archive holds plans.json, dataset.json, fingerprint.json, each chosen fold's checkpoint(s) and its small json/txt
files (training log, progress, validation summary), and manifest.json: samplan version, dataset, method,
configuration, folds, the size and sha256 of every member, and the licence of the pretrained weights the network
started from. Install it elsewhere with samplan_install_model ARCHIVE.
"""


def build_parser() -> argparse.ArgumentParser:
    """Argument parser for samplan_export_model."""
    p = make_parser("samplan_export_model", __doc__, EPILOG)
    p.add_argument("-d", "--dataset", required=True, help="dataset id/name of the model")
    p.add_argument("-m", "--method", required=True, help="method of the model, e.g. unet")
    p.add_argument("-c", "--configuration", default=None, help="configuration, e.g. 3d_fullres (default: the only trained one)")
    p.add_argument("-p", "--plans", default=None, help="plans name of the model (default: any, usually samplanPlans)")
    p.add_argument("-f", "--folds", nargs="+", default=None, metavar="F", help="folds to export: 0 1 2 3 4 or all "
                   "(default: every fold with the checkpoint(s))")
    p.add_argument("--checkpoint", default="final", choices=("final", "best", "both"), help="which checkpoint(s) of "
                   "each fold (default: final)")
    p.add_argument("-o", "--output", required=True, metavar="ZIP", help="archive to write, e.g. model.zip")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)

    def job() -> None:
        from samplan.pipeline.model_sharing import export_model

        m = export_model(args.output, args.dataset, args.method, args.configuration, args.folds, args.checkpoint,
                         args.plans)
        size = sum(e["size"] for e in m["files"].values())
        weights = m["pretrained_weights"]
        print(f"wrote {args.output}: {m['dataset_name']} {m['method']} {m['configuration']}, folds {' '.join(m['folds'])}, "
              f"checkpoint {' and '.join(m['checkpoints'])}, {len(m['files'])} files, {size / 1e6:.1f} MB")
        print("pretrained weights: " + (f"{weights['backbone']} ({weights['file']}), licence {weights['licence']}"
                                        if weights else "none (the network started from random weights)"))

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
