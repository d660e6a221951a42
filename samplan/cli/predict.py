"""samplan_predict: segment a folder of images with a trained model; outputs keep the inputs' geometry."""
from __future__ import annotations

import argparse
import sys

from samplan.cli import make_parser, run_cli

EPILOG = """examples:
  samplan_predict -i imagesTs/ -o predictions/                       # the only trained model, all its folds
  samplan_predict -i imagesTs/ -o pred/ -d 4 -m unet -c 3d_fullres -f 0 1 2 3 4
  samplan_predict -i imagesTs/ -o pred/ -d Hippocampus -m unet -f all --checkpoint best --disable-tta
  samplan_predict -i imagesTs/ -o pred/ --save-probabilities --continue --device cpu -np 2
  samplan_predict -i imagesTr/ -o pred/ -m samzeroshot --prompt-strategy oracle --reference-dir labelsTr/
  samplan_predict -i imagesTs/ -o pred/ -m samzeroshot --prompts prompts.json   # points/boxes per case and slice
  samplan_predict -i imagesTs/ -o pred/ -m medsam --prompts-from unet -pc 3d_fullres   # a cascade: unet's boxes
  samplan_predict -i imagesTs/ -o pred/ -d 4 --best     # what samplan_find_best -d 4 chose

Input files are named as in the raw format: {case}_{XXXX}{ending}, one file per channel (XXXX = 0000,
0001, ...; an RGB PNG holds three channels); files with another ending are ignored (a note names them).
A case whose files are unusable (missing channels, damaged, NaN/Inf voxels, 2D for a 3D model) gets no
output; the other cases are predicted, then every such case is listed and the exit status is 2.
Outputs are {case}{ending}; with --save-probabilities also {case}.npz (key "probabilities", float16,
C x Z x Y x X in the input's grid) and {case}.json (properties).
Without -d/-m/-c, the one trained model under SAMPLAN_RESULTS that fits is used; when several fit, they
are listed with the arguments that choose each.
Prompted methods (samzeroshot) need --prompts FILE, or --prompt-strategy with --reference-dir (label maps
{case}{ending}: an oracle protocol, recorded in the output folder's prompts_used.json). Their image embeddings
are cached under the model folder's embedding_cache/ (--no-embedding-cache disables it). With --prompts-from,
another trained model segments the images first (into {output}/prompts_from_{method}__{configuration}/) and
its label maps become the prompts: a cascade, fully automatic, not an oracle.
"""


def build_parser() -> argparse.ArgumentParser:
    """Argument parser for samplan_predict."""
    p = make_parser("samplan_predict", __doc__, EPILOG)
    p.add_argument("-i", "--input", required=True, metavar="DIR", help="folder of input images {case}_{XXXX}{ending}")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the label maps {case}{ending}")
    p.add_argument("-d", "--dataset", default=None, help="dataset id/name of the model (default: the only trained one)")
    p.add_argument("-m", "--method", default=None, help="method of the model, e.g. unet (default: the only trained one)")
    p.add_argument("-c", "--configuration", default=None, help="configuration, e.g. 3d_fullres or 2d (default: the only trained one)")
    p.add_argument("-p", "--plans", default=None, help="plans name of the model (default: any, usually samplanPlans)")
    p.add_argument("-f", "--folds", nargs="+", default=None, metavar="F",
                   help="folds to ensemble: 0 1 2 3 4 or all (default: every fold with the checkpoint)")
    p.add_argument("--best", action="store_true", help="predict with the best candidate of samplan_find_best -d D "
                   "(its inference_instructions.json: a model, a cascade or an ensemble, post-processed)")
    p.add_argument("--checkpoint", default="final", choices=("final", "best", "latest"), help="which checkpoint of each fold (default: final)")
    p.add_argument("--save-probabilities", action="store_true", help="also write {case}.npz probabilities and {case}.json properties")
    p.add_argument("--disable-tta", action="store_true", help="no mirroring test-time augmentation (up to 8x faster in 3D)")
    p.add_argument("--continue", dest="continue_", action="store_true", help="skip cases whose outputs already exist")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="where the network runs (default: auto)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"), help="autocast precision (default: auto = fp16 on CUDA; on a CPU bf16 only where a quick probe measures it faster than fp32, else fp32)")
    p.add_argument("--encoder-engine", default=None, choices=("auto", "torch", "onnx"),
                   help="what runs SAM-family image encoders (samzeroshot, medsam, promise): onnx = ONNX Runtime on the "
                        "CPU (pip install 'samplan[onnx]'; exported once per encoder and cached in $SAMPLAN_CACHE or "
                        "~/.cache/samplan); auto = onnx only on a CPU where it is installed and a one-time probe measured "
                        "it faster (default: $SAMPLAN_ENCODER_ENGINE, else auto)")
    p.add_argument("--part-id", type=int, default=0, metavar="I", help="predict only part I (0-based) of the sorted "
                   "cases, split in --num-parts parts as nnU-Net does: one process per GPU, same output folder "
                   "(default: 0)")
    p.add_argument("--num-parts", type=int, default=1, metavar="N", help="number of parts the cases are split into "
                   "(default: 1, all cases)")
    p.add_argument("-np", "--num-processes", type=int, default=0,
                   help="preprocessing worker processes running ahead of the network (default: 0 = one background "
                        "thread, usually fastest; use N > 0 only when preprocessing is much slower than the network)")
    g = p.add_argument_group("prompted methods (samzeroshot; medsam takes boxes)")
    g.add_argument("--prompts", default=None, metavar="JSON", help="prompts file: points/boxes per case and slice, voxel or world coordinates")
    g.add_argument("--prompt-strategy", default=None, choices=("oracle", "box", "propagate"),
                   help="prompts from --reference-dir label maps: the paper's oracle points, boxes, or one key-slice box propagated (default: oracle)")
    g.add_argument("--reference-dir", default=None, metavar="DIR", help="reference label maps {case}{ending} for --prompt-strategy")
    g.add_argument("--prompts-from", default=None, metavar="METHOD", help="prompts from another trained model (a "
                   "cascade's first stage, e.g. unet): its label maps become boxes/points per label, slice and component")
    g.add_argument("-pc", "--prompts-from-configuration", default=None, metavar="C", help="the first stage's "
                   "configuration (default: its only trained one)")
    g.add_argument("-pf", "--prompts-from-folds", nargs="+", default=None, metavar="F", help="the first stage's folds "
                   "(default: all it has)")
    g.add_argument("--prompts-from-dir", default=None, metavar="DIR", help="first-stage label maps that exist already "
                   "({case}{ending} in the images' geometry) instead of running --prompts-from")
    g.add_argument("--embedding-cache-dir", default=None, metavar="DIR", help="where image embeddings are cached (default: MODEL_DIR/embedding_cache)")
    g.add_argument("--no-embedding-cache", action="store_true", help="always run the image encoder; cache nothing")
    return p


def prompt_source_from_args(args: argparse.Namespace, model_dir, file_ending: str):
    """The PromptSource of the prompt flags (None without any), with its embedding cache."""
    from pathlib import Path

    from samplan.errors import SamplanError
    from samplan.methods.sam_common.embedding_cache import EmbeddingCache
    from samplan.inference.prompted import PromptSource

    if args.prompts_from is not None or args.prompts_from_dir is not None:
        if args.prompts is not None or args.reference_dir is not None:
            raise SamplanError("--prompts-from gives the prompts: drop --prompts / --reference-dir.")
        cache = None if args.no_embedding_cache else EmbeddingCache(Path(args.embedding_cache_dir or Path(model_dir) / "embedding_cache"))
        return model_prompt_source(args, file_ending, cache)
    if args.prompts is None and args.reference_dir is None:
        if args.prompt_strategy is not None:
            raise SamplanError("--prompt-strategy needs --reference-dir (the reference label maps the prompts come from).")
        return None
    cache = None if args.no_embedding_cache else EmbeddingCache(Path(args.embedding_cache_dir or Path(model_dir) / "embedding_cache"))
    return PromptSource(prompts_file=args.prompts, strategy=args.prompt_strategy, reference_dir=args.reference_dir,
                        file_ending=file_ending, embedding_cache=cache)


def model_prompt_source(args: argparse.Namespace, file_ending: str, cache):
    """The ModelPromptSource of --prompts-from (the first stage runs into {output}/prompts_from_{model}/) or of
    --prompts-from-dir (its predictions exist)."""
    from pathlib import Path

    from samplan.inference.model_prompts import ModelPromptSource
    from samplan.inference.model_selection import select_model
    from samplan.inference.predictor import Predictor

    if args.prompts_from is None:
        return ModelPromptSource(args.prompts_from_dir, {"predictions": str(args.prompts_from_dir)},
                                 file_ending=file_ending, embedding_cache=cache)
    first = select_model(args.dataset, args.prompts_from, args.prompts_from_configuration, args.plans, args.checkpoint,
                         input_dir=args.input)
    stage = Predictor.from_model_dir(first.path, folds=args.prompts_from_folds, checkpoint=args.checkpoint,
                                     device=args.device, tta=not args.disable_tta, precision=args.precision,
                                     encoder_engine=args.encoder_engine)
    folds = [str(f) for f in (args.prompts_from_folds or first.folds)]
    description = {"method": stage.method.name, "configuration": stage.configuration, "folds": folds,
                   "checkpoint": args.checkpoint, "model_dir": str(first.path)}
    print(f"prompts from: {first.path} (folds {' '.join(folds)})")
    where = Path(args.output) / f"prompts_from_{stage.method.name}__{stage.configuration}"
    if args.prompts_from_dir is not None:
        where = Path(args.prompts_from_dir)
    return ModelPromptSource(where, description, first_stage=stage, file_ending=file_ending, embedding_cache=cache)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)

    def job() -> None:
        from samplan.errors import SamplanError
        from samplan.inference.input_checks import check_folders
        from samplan.inference.model_selection import load_model_files, select_model
        from samplan.inference.predictor import Predictor

        if args.num_parts < 1 or not 0 <= args.part_id < args.num_parts:
            raise SamplanError(f"--part-id must be in 0..{max(args.num_parts, 1) - 1} and --num-parts at least 1, got "
                               f"--part-id {args.part_id} --num-parts {args.num_parts}.")
        if args.best and args.num_parts > 1:
            raise SamplanError("--best predicts all cases in one process; --part-id/--num-parts work with -m/-c/-f.")
        check_folders(args.input, args.output)  # before a model is loaded or a first stage runs
        if args.best:
            from samplan.pipeline.best_prediction import predict_best

            if args.dataset is None:
                raise SamplanError("--best needs -d DATASET (whose samplan_find_best instructions to follow).")
            outputs = predict_best(args.dataset, args.input, args.output, device=args.device, precision=args.precision,
                                   tta=not args.disable_tta, overwrite=not args.continue_,
                                   encoder_engine=args.encoder_engine)
            print(f"wrote {len(outputs)} label map(s) to {args.output}")
            return
        model = select_model(args.dataset, args.method, args.configuration, args.plans, args.checkpoint, input_dir=args.input)
        print(f"model: {model.path} (folds {' '.join(args.folds or model.folds)}, checkpoint_{args.checkpoint})")
        dataset_json = load_model_files(model.path)[3]  # a damaged model folder is refused here, with the file named
        source = prompt_source_from_args(args, model.path, dataset_json["file_ending"])
        predictor = Predictor.from_model_dir(
            model.path, folds=args.folds, checkpoint=args.checkpoint, device=args.device, tta=not args.disable_tta,
            precision=args.precision, prompt_source=source, encoder_engine=args.encoder_engine,
        )
        outputs = predictor.predict_folder(
            args.input, args.output, save_probabilities=args.save_probabilities,
            overwrite=not args.continue_, num_processes=args.num_processes, part=(args.part_id, args.num_parts),
        )
        print(f"wrote {len(outputs)} label map(s) to {args.output}")

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
