"""samplan_train: train one fold of a method on a preprocessed dataset, then predict and evaluate its validation cases."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from samplan.cli import make_parser, run_cli

EPILOG = """examples:
  samplan_train -d 4 -m unet -f 0                          # Dataset004_Hippocampus, default configuration
  samplan_train -d Hippocampus -m unet -f all -c 3d_fullres
  samplan_train -d 4 -m unet -f 0 --epochs 50 --iters-per-epoch 100 --device cpu
  samplan_train -d 4 -m unet -f 0 --c                      # continue exactly where the run stopped
  samplan_train -d 4 -m unet -f 0 --val                    # only redo the final validation
  samplan_train -d 4 -m unet -f 1 --pretrained-weights other/fold_0/checkpoint_final.pth
  samplan_train -d 4 -m samunetr -f 0 --backbone tiny_vit  # override the plan's SAM backbone
  samplan_train -d 4 -m samunetr -f 0 --checkpoint sam_vit_b_01ec64.pth
  samplan_train -d 4 -m medsam -f 0 --unfreeze mask_decoder image_encoder.neck  # train only these parameters
  samplan_train -d 510 -m promise -f 0 --mode apm              # ProMISe without IPS
  samplan_train -d 4 -m unet -f 0 --logger tensorboard     # also log each epoch to fold_0/tensorboard/
  samplan_train -d 4 -m unet -f 0 --num-devices 4          # data-parallel on 4 GPUs (processes started for you)
  torchrun --nproc-per-node 4 $(which samplan_train) -d 4 -m unet -f 0   # the same under torchrun

Outputs: SAMPLAN_RESULTS/<dataset>/<method>__<plans>__<configuration>/fold_<F>/ with checkpoint_latest/best/final.pth,
training_log.txt, progress.png/json and validation/ (predictions of the fold's validation cases + summary.json);
with --logger tensorboard also tensorboard/, with --logger mlflow an MLflow run (its id in tracker.json).
The log shows the running "pseudo Dice" of random validation patches each epoch and, at the end, the real
mean Dice of the whole validation cases.
"""


def _fold(value: str) -> int | str:
    """0..4 (or any fold of a custom splits_final.json) or "all"."""
    if value == "all":
        return value
    try:
        fold = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"fold must be an integer (0..4) or 'all', got {value!r}") from None
    if fold < 0:
        raise argparse.ArgumentTypeError(f"fold must be >= 0, got {fold}")
    return fold


def build_parser() -> argparse.ArgumentParser:
    """Argument parser for samplan_train."""
    p = make_parser("samplan_train", __doc__, EPILOG)
    p.add_argument("-d", "--dataset", required=True, help="dataset id (4), full name (Dataset004_Hippocampus) or bare name (Hippocampus)")
    p.add_argument("-m", "--method", required=True, help="method name, e.g. unet (a typo lists the available ones)")
    p.add_argument("-f", "--fold", required=True, type=_fold, help="cross-validation fold 0..4, or 'all' to train on every case")
    p.add_argument("-c", "--configuration", default=None, help="configuration, e.g. 3d_fullres or 2d (default: the method's first planned one)")
    p.add_argument("--epochs", type=int, default=None, metavar="N", help="number of epochs (default: the method's recipe, 1000 for unet)")
    p.add_argument("--iters-per-epoch", type=int, default=None, metavar="N", help="training iterations per epoch (default: recipe, 250 for unet)")
    p.add_argument("--val-iters", type=int, default=None, metavar="N", help="validation iterations per epoch (default: recipe, 50 for unet)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="device (default: auto = cuda > mps > cpu)")
    p.add_argument("--c", dest="continue_training", action="store_true", help="continue from the fold's latest checkpoint")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"), help="autocast precision (default: auto = fp16 on CUDA; on a CPU bf16 only where a quick probe measures it faster than fp32, else fp32)")
    p.add_argument("--val", dest="only_validate", action="store_true", help="only run the final validation with checkpoint_final")
    p.add_argument("--pretrained-weights", default=None, metavar="FILE", help="initialise from a checkpoint (tensors matching by name and shape; segmentation heads excluded)")
    p.add_argument("--seed", type=int, default=None, metavar="N", help="random seed (default: 12345, or the checkpoint's with --c)")
    p.add_argument("--backbone", default=None, metavar="NAME", help="SAM methods: backbone instead of the plan's (e.g. vit_b, vit_l, vit_h, tiny_vit); recorded in the model folder's plans.json")
    p.add_argument("--checkpoint", default=None, metavar="FILE", help="SAM methods: pretrained backbone weights file instead of the official ones ('none': random); recorded in plans.json")
    p.add_argument("--mode", default=None, choices=["apm", "apm_ips", "ips_oracle"], help="promise: APM only, APM + IPS (the plan's default) or IPS with reference prompts (an oracle); recorded in plans.json")
    p.add_argument("--unfreeze", nargs="+", default=None, metavar="PREFIX", help="medsam: train exactly the parameters whose dotted names start with these prefixes (e.g. mask_decoder image_encoder.neck) instead of the plan's modules; recorded in plans.json")
    p.add_argument("--npz", dest="save_probabilities", action="store_true", help="the final validation also writes "
                   "{case}.npz probabilities in the original geometry (ensembling in samplan_find_best needs them)")
    p.add_argument("--no-val", dest="final_validation", action="store_false", help="skip the final validation after "
                   "training (samplan_train --val runs it later)")
    p.add_argument("--logger", default=None, choices=("none", "tensorboard", "mlflow"), help="also log every epoch's "
                   "losses, pseudo Dice, lr and time to TensorBoard (fold_k/tensorboard/) or MLflow (MLFLOW_TRACKING_URI, "
                   "else fold_k/mlruns); --c continues the same run (default: $SAMPLAN_LOGGER, else none)")
    p.add_argument("--num-devices", type=int, default=1, metavar="N", help="train data-parallel (torch.distributed "
                   "DistributedDataParallel) in N processes, one per CUDA device (gloo CPU processes without CUDA); the "
                   "plan's batch is the global batch, split across them; rank 0 writes the checkpoints; --c continues "
                   "with any N. Under torchrun the processes it started are used instead (default: 1)")
    p.add_argument("-np", "--num-workers", type=int, default=None, metavar="N", help="background data loader processes (0: load in the main process; default: from the device)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in (("backbone", args.backbone), ("checkpoint", args.checkpoint), ("mode", args.mode))
                 if v is not None}
    if args.unfreeze is not None:
        overrides["unfreeze"] = list(args.unfreeze)
    if args.mode is not None and args.method != "promise":
        print(f"error: --mode is a promise option; method {args.method!r} has no modes.", file=sys.stderr)
        return 2
    if args.num_devices < 1:
        print(f"error: --num-devices must be at least 1, got {args.num_devices}.", file=sys.stderr)
        return 2
    if "checkpoint" in overrides and overrides["checkpoint"].lower() != "none":
        overrides["checkpoint"] = str(Path(overrides["checkpoint"]).expanduser().resolve())

    def job() -> None:
        from samplan.pipeline.train import train_fold

        train_fold(
            args.dataset, args.method, args.configuration, args.fold,
            epochs=args.epochs, iters_per_epoch=args.iters_per_epoch, val_iters=args.val_iters, device=args.device,
            continue_training=args.continue_training, only_validate=args.only_validate,
            pretrained_weights=args.pretrained_weights, seed=args.seed, num_workers=args.num_workers, precision=args.precision,
            method_overrides=overrides or None, final_validation=args.final_validation,
            save_probabilities=args.save_probabilities, tracker=args.logger, num_devices=args.num_devices,
        )

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
