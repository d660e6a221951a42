"""samplan_report: one self-contained HTML page (tables, Dice box plots, best/worst overlays, training curves) from
samplan_find_best's find_best.json. Figures are base64 PNGs inside the page so that it opens offline and can be sent
alone; matplotlib draws on Agg canvases owned here, never through pyplot, so no figure state leaks to the caller.
"""
from __future__ import annotations

import base64
import html
import io
import math
import textwrap
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from samplan.dataset.image_io import read_images, read_seg
from samplan.errors import SamplanError
from samplan.evaluation.evaluate import case_dice, difference_text
from samplan.paths import find_best_dir, preprocessed_root, raw_root, resolve_dataset_name
from samplan.utils import atomic_path, load_json

MAX_OVERLAY_CANDIDATES = 12  # 2 PNGs each: keeps the page a few MB even for datasets with many candidates
MAX_BOX_CANDIDATES = 40  # more boxes than this no longer fit a readable figure
DPI = 80
# blue-ish vs orange plus solid vs dashed: distinguishable in colour-vision deficiency and in greyscale prints
REF_COLOUR, PRED_COLOUR = "#00c8ff", "#ff7a00"
FOLD_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")

Report = dict[str, Any]
Job = tuple[int, str, dict[str, Any], float]  # candidate index, "best"/"worst", per_case entry, its mean Dice
esc = html.escape


def _num(x: Any) -> float:
    """A metric as float; null (find_best writes NaN as null) and non-numbers become NaN."""
    try:
        return math.nan if x is None else float(x)
    except (TypeError, ValueError):
        return math.nan


def _fmt(x: Any, digits: int = 4) -> str:
    v = _num(x)
    return "–" if math.isnan(v) else f"{v:.{digits}f}"


def _nanmean(values: Iterable[Any]) -> float:
    vals = [v for v in map(_num, values) if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def _dice_of(entry: dict[str, Any], label: str) -> Any:
    return ((entry.get("metrics") or {}).get(label) or {}).get("Dice")


def label_names(dataset_json: dict[str, Any]) -> dict[str, str]:
    """find_best's label keys ('1', or '(1, 2)' for a region) -> their names in dataset.json."""
    return {str(tuple(v)) if isinstance(v, (list, tuple)) else str(v): str(name)
            for name, v in (dataset_json.get("labels") or {}).items()}


def _label_title(key: str, names: dict[str, str]) -> str:
    return f"{key} ({names[key]})" if key in names else key


def _read_json(path: Path) -> Any:
    """The file's JSON, or None when it is missing or unreadable (e.g. half-written by a running training)."""
    try:
        return load_json(path)
    except (OSError, ValueError):
        return None


def load_find_best(path: Path, dataset: str | int) -> Report:
    """find_best.json, or a SamplanError that says how to make it."""
    if not path.is_file():
        raise SamplanError(f"{path} does not exist: run `samplan_find_best -d {dataset}` first, then samplan_report.")
    report = _read_json(path)
    if not isinstance(report, dict) or not isinstance(report.get("candidates"), list):
        raise SamplanError(f"{path} is not a readable samplan_find_best result (no 'candidates' list); run "
                           f"`samplan_find_best -d {dataset}` again to rewrite it.")
    return report


def _td(text: str) -> str:
    return f'<td class="n">{text}</td>'


def _table(report: Report, head1: str, head2: str, rows: list[list[str]], cls: str = "") -> str:
    """A two-row-header table whose rows follow report["candidates"], the best one highlighted."""
    best = [' class="best"' if c.get("name") == report.get("best") else "" for c in report.get("candidates") or []]
    body = "".join(f"<tr{b}>{''.join(cells)}</tr>" for b, cells in zip(best, rows))
    return (f'<div class="scroll"><table class="{cls}"><thead><tr>{head1}</tr><tr>{head2}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def candidate_table_html(report: Report, names: dict[str, str] | None = None) -> str:
    """The find-best table: one row per candidate (best first, highlighted), per-label metrics, Dice per fold."""
    labels, folds, names = report.get("labels") or [], [str(f) for f in report.get("folds") or []], names or {}
    head1 = "".join(f'<th rowspan="2">{h}</th>' for h in ("#", "kind", "candidate", "fg Dice", "vs best (SE)"))
    head1 += "".join(f'<th colspan="3">label {esc(_label_title(k, names))}</th>' for k in labels)
    head1 += f'<th colspan="{len(folds)}">fg Dice per fold</th>' if folds else ""
    head2 = "<th>Dice</th><th>HD95 [mm]</th><th>NSD</th>" * len(labels) + "".join(f"<th>{esc(f)}</th>" for f in folds)
    rows = []
    for i, c in enumerate(report.get("candidates") or [], 1):
        cells = [_td(str(i)), f"<td>{esc(str(c.get('kind', '')))}</td>",
                 f'<td class="name">{esc(str(c.get("name", "")))}</td>',
                 _td(f'<b>{_fmt((c.get("foreground_mean") or {}).get("Dice"))}</b>'), _td(difference_text(c.get("vs_best")))]
        for m in ((c.get("mean") or {}).get(k) or {} for k in labels):
            cells += [_td(_fmt(m.get("Dice"))), _td(_fmt(m.get("HD95"), 2)), _td(_fmt(m.get("NSD")))]
        rows.append(cells + [_td(_fmt((c.get("per_fold_dice") or {}).get(f))) for f in folds])
    return _table(report, head1, head2, rows)


def fold_table_html(report: Report, names: dict[str, str] | None = None) -> str:
    """Compact table: per candidate, the Dice of every fold and label (mean over the fold's cases, null ignored)."""
    labels, folds, names = report.get("labels") or [], [str(f) for f in report.get("folds") or []], names or {}
    head1 = '<th rowspan="2">candidate</th>' + "".join(f'<th colspan="{len(labels)}">fold {esc(f)}</th>' for f in folds)
    head2 = "".join(f"<th>{esc(_label_title(k, names))}</th>" for k in labels) * len(folds)
    rows = []
    for c in report.get("candidates") or []:
        cells = [f'<td class="name">{esc(str(c.get("name", "")))}</td>']
        for f in folds:
            in_fold = [e for e in c.get("per_case") or [] if str(e.get("fold")) == f]
            cells += [_td(_fmt(_nanmean(_dice_of(e, k) for e in in_fold), 3)) for k in labels]
        rows.append(cells)
    return _table(report, head1, head2, rows, "compact")


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure on its own Agg canvas (constrained layout keeps long tick labels inside)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return FigureCanvasAgg(Figure(figsize=(width, height), layout="constrained")).figure


def figure_to_data_uri(fig: Any, dpi: int = DPI) -> str:
    """The figure as a `data:image/png;base64,...` URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def box_plot(candidates: Sequence[dict[str, Any]], label: str, title: str = "") -> Any:
    """Horizontal boxes of the per-case Dice of `label`, one per candidate, the first candidate on top."""
    wrapped = [textwrap.fill(str(c.get("name", "")), 60) for c in candidates]  # long ensemble names on 2-3 lines
    fig = _figure(11.5, 1.2 + 0.24 * sum(w.count("\n") + 1 for w in wrapped) + 0.12 * len(candidates))
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)  # fixed jitter: the same report twice gives the same picture
    n = len(candidates)
    for i, c in enumerate(candidates):
        values = np.array([_num(_dice_of(e, label)) for e in c.get("per_case") or []])
        values = values[~np.isnan(values)]
        if values.size == 0:
            continue  # every case null for this label: the row stays empty but keeps its name
        ax.boxplot([values], positions=[n - i], orientation="horizontal", widths=0.6, showmeans=True,
                   flierprops={"marker": ""}, medianprops={"color": "#d62728"},
                   meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "black", "markersize": 4})
        ax.scatter(values, n - i + rng.uniform(-0.18, 0.18, values.size), s=14, alpha=0.6, color="#1f77b4", zorder=3)
    ax.set_yticks(range(n, 0, -1), wrapped, fontsize=9)
    ax.set(ylim=(0.4, n + 0.6), xlim=(-0.02, 1.02), xlabel="Dice per validation case (◇ mean, red line median)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title or f"label {label}", fontsize=10)
    return fig


def pick_slice(reference: np.ndarray, prediction: np.ndarray | None = None) -> int:
    """Index along axis 0 of a (Z, Y, X) map with the most reference foreground (else prediction's, else middle)."""
    for seg in (reference, prediction):
        if seg is not None and (seg > 0).any():
            return int(np.argmax((seg > 0).reshape(seg.shape[0], -1).sum(1)))
    return reference.shape[0] // 2


def _mask(seg: np.ndarray, key: str) -> np.ndarray:
    """Pixels of a label ('2') or of a region ('(1, 2)') in a label map."""
    if key.strip().startswith("("):
        return np.isin(seg, [int(v) for v in key.strip().strip("()").split(",") if v.strip()])
    return seg == int(key)


def _display(image: np.ndarray, z: int) -> np.ndarray:
    """Slice z of a (C, Z, Y, X) image in [0, 1]: RGB (Y, X, 3) when it has 3 channels, else grey channel 0."""
    if image.shape[0] == 3:
        rgb = np.moveaxis(image[:, z], 0, -1).astype(np.float32)
        # 8-bit photographs keep their colours; anything else is stretched to the full range
        lo, hi = (0.0, 255.0) if rgb.min() >= 0 and rgb.max() <= 255 else (float(rgb.min()), float(rgb.max()))
        return np.clip((rgb - lo) / max(hi - lo, 1e-8), 0, 1)
    grey = image[0, z].astype(np.float32)
    # percentiles instead of min/max: one hot voxel (CT metal, MR flow) would otherwise grey out the whole slice
    lo, hi = np.percentile(grey, [0.5, 99.5])
    return np.clip((grey - lo) / max(float(hi - lo), 1e-8), 0, 1)


def overlay_figure(image: np.ndarray, reference: np.ndarray, prediction: np.ndarray, labels: Sequence[str],
                   aspect: float = 1.0) -> Any:
    """A 2D image ((Y, X) grey or (Y, X, 3) RGB in [0, 1]) with reference (solid) and predicted (dashed) contours."""
    h, w = image.shape[0] * aspect, image.shape[1]
    scale = 3.6 / max(h, w)  # the longer side 3.6 inches (288 px at 80 dpi): two candidates side by side
    fig = _figure(max(w * scale, 2.6), h * scale + 0.45)
    ax = fig.add_subplot()
    ax.imshow(image, cmap=None if image.ndim == 3 else "gray", vmin=0, vmax=1, interpolation="nearest", aspect=aspect)
    # the reference drawn wider: where the prediction matches it exactly, both stay visible
    for seg, colour, style, lw in ((reference, REF_COLOUR, "solid", 2.2), (prediction, PRED_COLOUR, "dashed", 1.3)):
        for m in (_mask(seg, k) for k in labels):
            if m.any():  # contour() warns on a constant array
                ax.contour(m.astype(np.float32), levels=[0.5], colors=[colour], linewidths=lw, linestyles=style)
    ax.set_axis_off()
    ax.plot([], [], color=REF_COLOUR, lw=1.5, label="reference")  # contours carry no legend entries of their own
    ax.plot([], [], color=PRED_COLOUR, lw=1.5, ls="dashed", label="prediction")
    fig.legend(loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return fig


def curves_figure(progress: dict[str, dict[str, list[Any]]], title: str = "") -> Any:
    """Losses and pseudo Dice per epoch of one model, one colour per fold (lr in a third panel when logged)."""
    panels = [("loss", (("train_loss", "-", "train"), ("val_loss", "--", "val"))),
              ("pseudo Dice (patches)", (("pseudo_dice", ":", "pseudo"), ("ema_pseudo_dice", "-", "EMA")))]
    if any(p.get("lr") for p in progress.values()):
        panels.append(("learning rate", (("lr", "-", "lr"),)))
    fig = _figure(4.2 * len(panels), 3.4)
    for ax, (ylabel, series) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for j, (fold, p) in enumerate(progress.items()):
            for key, style, what in series:
                ys = [_num(v) for v in p.get(key) or [] if isinstance(p.get(key), list)]  # null epochs: gaps
                if ys:
                    ax.plot(range(1, len(ys) + 1), ys, style, color=FOLD_COLOURS[j % len(FOLD_COLOURS)], lw=1.3,
                            label=f"fold {fold} {what}")
        ax.set(xlabel="epoch", ylabel=ylabel)
        ax.grid(alpha=0.3)
        # no legend on the lr panel: its colours are those of the other panels' legends
        if len(series) > 1 and (n := len(ax.get_legend_handles_labels()[0])):
            ax.legend(fontsize=8, ncol=2 if n > 4 else 1)
    fig.suptitle(title, fontsize=11)
    return fig


def trained_models(candidates: Sequence[dict[str, Any]]) -> dict[str, tuple[str, list[str]]]:
    """model_dir -> (title, folds) of every distinct model of the candidates, cascade stages included."""
    out: dict[str, tuple[str, list[str]]] = {}
    todo = [m for c in candidates for m in c.get("members") or []]
    while todo:
        member = todo.pop(0)
        if not isinstance(member, dict) or not member.get("model_dir"):
            continue
        todo.append(member.get("first_stage"))  # a cascade's first stage is a trained model of its own
        plans = "" if member.get("plans_name") in (None, "samplanPlans") else f" ({member['plans_name']})"
        # the model, not the member: a cascade's name also names its first stage
        title = f"{member.get('method')} {member.get('configuration')}{plans}"
        _, folds = out.setdefault(member["model_dir"], (title, []))
        folds += [str(f) for f in member.get("folds") or [] if str(f) not in folds]
    return out


def _figure_html(uri: str, caption: str, alt: str) -> str:
    return f'<figure><img src="{uri}" alt="{esc(alt)}"><figcaption>{caption}</figcaption></figure>'


def _overlay_jobs(candidates: Sequence[dict[str, Any]], labels: Sequence[str]) -> dict[str, list[Job]]:
    """Per case, the overlays to draw of it: each candidate's best and worst case (an all-null case ranks nowhere)."""
    by_case: dict[str, list[Job]] = {}
    for i, c in enumerate(candidates):
        cases = c.get("per_case") or []
        scored = sorted((d, j) for j, e in enumerate(cases) if not math.isnan(d := case_dice(e, labels)))
        picks = [("best", scored[-1]), ("worst", scored[0])] if len(scored) > 1 else [("best", s) for s in scored]
        for which, (d, j) in picks:
            by_case.setdefault(str(cases[j].get("case")), []).append((i, which, cases[j], d))
    return by_case


def overlays_html(dataset: str, candidates: Sequence[dict[str, Any]], labels: Sequence[str], names: dict[str, str],
                  ending: str | None, notes: list[str]) -> str:
    """Overlay figures of the best and worst validation case of each candidate, grouped per candidate."""
    if not ending:
        notes.append(f"no file_ending in {preprocessed_root() / dataset / 'dataset.json'}: overlays skipped")
        return ""
    figures: dict[tuple[int, str], str] = {}
    # one case at a time: its image and reference are read once for every candidate and never all kept in memory
    for case, jobs in _overlay_jobs(candidates, labels).items():
        try:
            ref, props = read_seg(preprocessed_root() / dataset / "gt_segmentations" / f"{case}{ending}")
            image, _ = read_images([raw_root() / dataset / "imagesTr" / f"{case}_0000{ending}"])
        except SamplanError as e:
            notes.append(f"overlay of case {case} skipped: {e}")
            continue
        aspect = props["spacing"][1] / props["spacing"][2]  # pixel height/width: in-plane spacing may differ
        for i, which, entry, mean in jobs:
            c, fold = candidates[i], str(entry.get("fold"))
            try:
                folder = (c.get("folders") or {}).get(fold, f"<no folder for fold {fold} in find_best.json>")
                pred, _ = read_seg(Path(folder) / f"{case}{ending}")
                if pred.shape != ref.shape or image.shape[1:] != ref.shape[1:]:
                    raise SamplanError(f"shapes differ: image {image.shape[1:]}, reference {ref.shape[1:]}, "
                                       f"prediction {pred.shape[1:]}")
                z = pick_slice(ref[0], pred[0])
                fig = overlay_figure(_display(image, z), ref[0, z], pred[0, z], labels, aspect)
            except (SamplanError, ValueError) as e:
                notes.append(f"overlay of {c.get('name')}, case {case} skipped: {e}")
                continue
            per_label = " · ".join(f"{esc(_label_title(k, names))} {_fmt(_dice_of(entry, k), 3)}" for k in labels)
            where = f"fold {esc(fold)}" + (f", slice {z + 1}/{ref.shape[1]}" if ref.shape[1] > 1 else "")
            caption = (f"<b>{which}</b> case {esc(case)} ({where})<br>"
                       f"Dice {per_label} · mean {_fmt(mean, 3)}")
            figures[(i, which)] = _figure_html(figure_to_data_uri(fig), caption, f"{which} case {case}")
    figs = [[figures[(i, w)] for w in ("best", "worst") if (i, w) in figures] for i in range(len(candidates))]
    return "".join(f'<div class="cand"><h3>{i + 1}. {esc(str(c.get("name", "")))}</h3>'
                   f'<div class="row">{"".join(f)}</div></div>' for i, (c, f) in enumerate(zip(candidates, figs)) if f)


def curves_html(candidates: Sequence[dict[str, Any]], notes: list[str]) -> str:
    """Training-curve figures of every distinct trained model that has progress.json files."""
    blocks = []
    for model_dir, (title, folds) in trained_models(candidates).items():
        found = {f: _read_json(Path(model_dir) / f"fold_{f}" / "progress.json") for f in folds}
        progress = {f: d for f, d in found.items() if isinstance(d, dict)}
        if missing := [f for f in folds if f not in progress]:
            notes.append(f"{title}: no progress.json for fold {', '.join(missing)} (untrained methods have none)")
        if progress:
            uri = figure_to_data_uri(curves_figure(progress, title))
            blocks.append(_figure_html(uri, f"{esc(title)}: {esc(model_dir)}", f"curves {title}"))
    return "".join(blocks)


# system fonts only: the page must not fetch anything; figure as a table so its caption wraps at the image's width
CSS = """body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;margin:24px;color:#222}
h1{font-size:22px;margin:0 0 8px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ccc}
h3{font-size:14px;margin:14px 0 4px;word-break:break-word} .small{font-size:12px;color:#777} th{background:#f2f2f2}
table{border-collapse:collapse;font-size:13px} th,td{border:1px solid #ddd;padding:3px 7px} .compact{font-size:12px}
td.n{text-align:right;font-variant-numeric:tabular-nums} td.name{max-width:420px;word-break:break-word}
tr.best td{background:#fff2b8} .scroll{overflow-x:auto} .row{display:flex;flex-wrap:wrap} .notes li{font-size:13px}
figure{display:inline-table;margin:4px 12px 8px 0;vertical-align:top} figcaption{font-size:12px;color:#444;
display:table-caption;caption-side:bottom}
figure img{max-width:100%;height:auto;border:1px solid #eee} .cand{display:inline-block;vertical-align:top;width:620px}
.sw{display:inline-block;width:24px;vertical-align:middle} .meta{font-size:14px}"""


def _notes_html(notes: Sequence[str]) -> str:
    return f'<ul class="notes">{"".join(f"<li>{esc(str(n))}</li>" for n in notes)}</ul>' if notes else ""


def _more(shown: int, total: int) -> str:
    return f'<p class="small">Showing the first {shown} of {total} candidates.</p>' if total > shown else ""


def build_html(report: Report, dataset: str, dataset_json: dict[str, Any], source: Path) -> str:
    """The whole page as a string."""
    labels, names = [str(k) for k in report.get("labels") or []], label_names(dataset_json)
    candidates = report.get("candidates") or []
    notes: list[str] = []
    boxed = candidates[:MAX_BOX_CANDIDATES]
    boxes = "".join(_figure_html(figure_to_data_uri(box_plot(boxed, k, f"label {_label_title(k, names)}")), "",
                                 f"box plot {k}") for k in labels)
    overlays = overlays_html(dataset, candidates[:MAX_OVERLAY_CANDIDATES], labels, names,
                             dataset_json.get("file_ending"), notes)
    curves = curves_html(candidates, notes)
    folds = ", ".join(map(str, report.get("folds") or []))
    label_text = ", ".join(_label_title(k, names) for k in labels)
    legend = (f'<span class="sw" style="border-top:3px solid {REF_COLOUR}"></span> reference, '
              f'<span class="sw" style="border-top:2px dashed {PRED_COLOUR}"></span> prediction')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>samplan report: {esc(dataset)}</title><style>{CSS}</style></head>
<body><header><h1>samplan_find_best report: {esc(dataset)}</h1>
<p class="meta">folds {esc(folds)} · labels {esc(label_text)} · {len(candidates)} candidate(s)<br>
best: <b>{esc(str(report.get('best', '')))}</b></p>{_notes_html([str(n) for n in report.get('notes') or []])}</header>
<h2>Candidates</h2><p class="small">Mean over every validation case of the folds; null (e.g. both masks empty) is
skipped; the best candidate is highlighted.</p>{candidate_table_html(report, names)}
<h3>Dice per fold and label</h3>{fold_table_html(report, names)}
<h2>Dice per case</h2>{_more(MAX_BOX_CANDIDATES, len(candidates))}<div class="row">{boxes}</div>
<h2>Best and worst validation case</h2><p class="small">By the case's mean Dice over labels; the slice with the
most reference foreground; {legend}.</p>{_more(MAX_OVERLAY_CANDIDATES, len(candidates))}{overlays}
<h2>Training curves</h2>{curves or '<p class="small">No progress.json found.</p>'}
<h2>Report notes</h2>{_notes_html(notes) or '<p class="small">none</p>'}
<p class="small">Generated {esc(time.strftime('%Y-%m-%d %H:%M:%S'))} by samplan_report from {esc(str(source))}</p>
</body></html>
"""


def write_report(dataset: str | int, output: str | Path | None = None) -> Path:
    """Write the HTML report of find_best.json (default find_best/report.html beside it); returns its path."""
    name = resolve_dataset_name(dataset)
    source = find_best_dir(name) / "find_best.json"
    report = load_find_best(source, dataset)
    # the preprocessed dataset.json is what find_best used; the raw one serves when the cache was deleted
    metas = (_read_json(root() / name / "dataset.json") for root in (preprocessed_root, raw_root))
    page = build_html(report, name, next((m for m in metas if isinstance(m, dict)), {}), source)
    out = Path(output).expanduser() if output else source.with_name("report.html")
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out
