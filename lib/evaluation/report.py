"""CV summaries (cv.json) and the run report (report.md + PNGs) a competitor looks at."""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lib.core import artifacts as A
from lib.core.errors import PipelineError
from lib.core.io import ID, assert_same_ids, atomic_path, write_text
from lib.evaluation import decision as D
from lib.evaluation import metrics as M
from lib.evaluation import model_card as MC

log = logging.getLogger(__name__)


def oof_arrays(train: pd.DataFrame, oof: pd.DataFrame, classes: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Y one-hot, P probs, fold) aligned on lesion_id, in `train` order."""
    assert_same_ids(train, oof, "OOF vs train")
    o = oof.set_index(ID).loc[train[ID].to_numpy()]
    return (train[[f"y_{c}" for c in classes]].to_numpy(float), o[classes].to_numpy(float),
            train["fold"].to_numpy(int))


def cv_summary(train: pd.DataFrame, oof: pd.DataFrame, classes: list[str], task: str = "multiclass",
               weights: str = "fixed", priors: str | None = None, rule_chosen: bool = False) -> dict:
    """Macro F1 (= Dice) at 0.5 and at tuned thresholds (pooled, and with thresholds from the other
    folds), per class and per fold; multiclass adds argmax F1 and balanced accuracy, binary AUC and
    pAUC above 80% TPR (pooled and per fold), multilabel top-1 / top-3 accuracy. `nesting` labels
    every figure (`nesting_labels`): `weights` / `priors` say how the OOF table's blend weights and
    logit-adjustment priors were fitted, `rule_chosen` that 05 chooses between the rules."""
    Y, P, folds = oof_arrays(train, oof, classes)
    sp = D.foldwise_threshold_spread(Y, P, folds, classes)
    t = sp["pooled_thresholds"]
    out: dict = {
        "n": int(len(Y)), "task": task,
        "macro_dice_05": float(M.macro_dice(Y, P)),
        "macro_dice_tuned_pooled": float(sp["pooled_dice_tuned"]),
        "macro_dice_tuned_cv": float(sp["cv_dice_pooled"]),
        "thresholds": dict(zip(classes, map(float, t))),
        "per_class_dice_tuned": dict(zip(classes, map(float, M.dice_per_class(Y, P, t)))),
        "per_fold": sp["per_fold"].to_dict(orient="records"),
    }
    if task == "binary":
        out["auc"] = float(M.macro_auc(Y, P)) if 0 < Y.sum() < len(Y) else float("nan")
        out["pauc_80"] = float(M.partial_auc(Y[:, 0], P[:, 0]))
        out["per_fold_pauc_80"] = [float(M.partial_auc(Y[folds == k, 0], P[folds == k, 0])) for k in np.unique(folds)]
    if task == "multilabel":
        out["top1_accuracy"] = float(M.topk_accuracy(Y, P, 1))
        out["top3_accuracy"] = float(M.topk_accuracy(Y, P, min(3, len(classes))))
    if task == "multiclass":
        out["macro_f1_argmax"] = float(M.macro_f1_argmax(Y, P))
        out["balanced_accuracy"] = float(M.balanced_accuracy(Y, P))
        hot = D.argmax_decisions(P)
        out["per_class_f1_argmax"] = dict(zip(classes, map(float, M.dice_per_class(Y, hot))))
        out["per_fold_f1_argmax"] = [float(M.macro_f1_argmax(Y[folds == k], P[folds == k]))
                                     for k in np.unique(folds)]
    try:
        if task != "binary":  # binary: `auc` above
            out["macro_auc"] = float(M.macro_auc(Y, P))
    except ValueError:
        pass
    out["nesting"] = nesting_labels(out, weights, priors, rule_chosen)
    return out


# ----------------------------------------------------------------------------- what each figure nests

# cv_summary key -> (its thresholds, the rule it scores); "ranks": a ranking metric, no decision
FIGURES = {
    "macro_dice_05": ("none", "0.5"), "macro_dice_tuned_pooled": ("not nested", "thresholds"),
    "macro_dice_tuned_cv": ("nested", "thresholds"), "per_class_dice_tuned": ("not nested", "thresholds"),
    "per_fold": ("not nested (dice_infold), nested (dice_cv)", "thresholds"),
    "macro_f1_argmax": ("none", "argmax"), "balanced_accuracy": ("none", "argmax"),
    "per_class_f1_argmax": ("none", "argmax"), "per_fold_f1_argmax": ("none", "argmax"),
    "auc": ("none", "ranks"), "macro_auc": ("none", "ranks"), "pauc_80": ("none", "ranks"),
    "per_fold_pauc_80": ("none", "ranks"), "top1_accuracy": ("none", "ranks"), "top3_accuracy": ("none", "ranks"),
}


def nesting(weights: str, thresholds: str, decision: str, priors: str | None = None) -> str:
    """One figure's label: how its blend weights, logit-adjustment priors (when used), thresholds and
    decision rule were fitted, and `honest` only when none of them saw the rows it scores.
    Values: `nested` (fitted without the fold scored), `not nested` (fitted on all OOF rows),
    `fixed` (not fitted: one model, fixed weights, a rule fixed by the recipe), `none` (not used),
    `per rule` (scores one rule while 05 chooses between rules: not the submission's figure)."""
    parts = [f"weights {weights}", *([f"priors {priors}"] if priors else []), f"thresholds {thresholds}",
             f"decision {decision}"]
    honest = not any("not nested" in p or "per rule" in p for p in parts)
    return ", ".join(parts) + (": honest" if honest else ": not honest")


def nesting_labels(cv: dict, weights: str = "fixed", priors: str | None = None, rule_chosen: bool = False) -> dict:
    """`nesting` label of every cv_summary figure present in `cv`."""
    out = {}
    for key, (thr, rule) in FIGURES.items():
        if key in cv:
            decision = "none (ranks)" if rule == "ranks" else f"{'per rule' if rule_chosen else 'fixed'} ({rule})"
            out[key] = nesting(weights, thr, decision, priors)
    return out


def log_cv(name: str, cv: dict) -> None:
    if cv.get("task") == "binary":
        log.info("%s OOF: AUC %.4f | pAUC above 80%% TPR %.4f (max 0.2) | Dice tuned honest-CV %.4f",
                 name, cv.get("auc", float("nan")), cv["pauc_80"], cv["macro_dice_tuned_cv"])
        return
    if cv.get("task") == "multilabel":
        log.info("%s OOF: macro F1 @0.5 %.4f | tuned pooled %.4f | tuned honest-CV %.4f | top-1 %.4f | top-3 %.4f",
                 name, cv["macro_dice_05"], cv["macro_dice_tuned_pooled"], cv["macro_dice_tuned_cv"],
                 cv["top1_accuracy"], cv["top3_accuracy"])
        return
    log.info("%s OOF: macro F1 argmax %.4f | Dice@0.5 %.4f | tuned pooled %.4f | tuned honest-CV %.4f",
             name, cv.get("macro_f1_argmax", float("nan")), cv["macro_dice_05"],
             cv["macro_dice_tuned_pooled"], cv["macro_dice_tuned_cv"])


# ----------------------------------------------------------------------------- report.md + PNGs

DECISIONS = ("argmax", "thresholds", "raw")
HEADLINE = {  # key of the dict given to write_report (a cv_summary; 05 adds the nested_* keys) -> label
    "nested_expected": "05's expected score: the submission's rule, everything fitted without the fold it scores",
    "nested_expected_se": "  its standard error (class-stratified bootstrap of the OOF lesions)",
    "nested_argmax": "Macro F1 at argmax, blend weights and priors from the other folds",
    "nested_argmax_se": "  its standard error (same draws)",
    "nested_thresholds": "Macro Dice, tuned thresholds, blend weights, priors and thresholds from the other folds",
    "nested_thresholds_se": "  its standard error (same draws)",
    "macro_f1_argmax": "Macro F1 at argmax",
    "macro_dice_05": "Macro Dice at 0.5",
    "macro_dice_tuned_pooled": "Macro Dice, tuned thresholds, tuned and scored on the same rows",
    "macro_dice_tuned_cv": "Macro Dice, tuned thresholds from the other folds",
    "balanced_accuracy": "Balanced accuracy",
    "macro_auc": "Macro AUC",
    "auc": "AUC",
    "auc_se": "  its standard error (bootstrap of whole patients, or rows without a patient column)",
    "pauc_80": "Partial AUC above 80% TPR (ISIC 2024 metric, max 0.2)",
    "pauc_80_se": "  its standard error (same draws)",
    "top1_accuracy": "Top-1 accuracy (top class is a true label)",
    "top3_accuracy": "Top-3 accuracy",
}
MEMBER_METRICS = ("macro_f1_argmax", "macro_dice_tuned_cv", "macro_auc", "auc", "pauc_80")
NOTE = (
    "Each figure says how it was fitted: blend weights, logit-adjustment priors, thresholds and the "
    "decision rule are *nested* when fitted without the fold a row belongs to, *not nested* when fitted on "
    "all OOF rows (then the figure is optimistic), *fixed* when not fitted at all. Only a figure with "
    "nothing *not nested* and no *per rule* choice is called honest; in 05 that is the expected score (the "
    "rule, weights, priors and thresholds of fold k all chosen on the other folds). The submission itself "
    "uses the rule, weights and thresholds chosen on all OOF rows (the deployment choice). The confusion "
    "matrix (multiclass only) needs one label per row: with `thresholds` the label is the argmax of p/t over "
    "the classes with p > t, or the plain argmax when no class clears its threshold; per-class Dice and the "
    "score still use the official rule (every class with p > t is positive, after baking t to 0.5).")


def load_histories(output_root: Path, exps: Sequence[str]) -> dict[str, pd.DataFrame]:
    """``{"<exp>/foldK": history}`` from ``output_root/<exp>/fold*/history.csv`` where present
    (folds in numeric order; empty or unreadable files are skipped with a warning)."""
    out: dict[str, pd.DataFrame] = {}
    for exp in exps:
        dirs = [d for d in Path(output_root, exp).glob("fold*") if (d / A.HISTORY).is_file()]
        for d in sorted(dirs, key=lambda d: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", d.name)]):
            try:
                df = pd.read_csv(d / A.HISTORY)
            except (pd.errors.EmptyDataError, pd.errors.ParserError) as e:
                log.warning("skipping %s: %s", d / A.HISTORY, str(e).splitlines()[0])
                continue
            if len(df):
                out[f"{exp}/{d.name}"] = df
    return out


def _fmt(v: Any, nd: int = 4) -> str:
    """Table cell: floats rounded, NaN/None as '-'."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{nd}f}" if isinstance(v, (float, np.floating)) else str(v)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _member_metric(m: dict, key: str) -> Any:
    """A member's metric, at top level or under its ``cv`` dict."""
    return m.get(key, (m.get("cv") or {}).get(key))


def _resolve_thresholds(thresholds: dict[str, float], cv: dict, classes: list[str],
                        y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """The given thresholds; when empty, cv["thresholds"] or freshly tuned ones."""
    th = thresholds or cv.get("thresholds") or {}
    if not th:
        return D.tune_thresholds(y, probs)
    missing = [c for c in classes if c not in th]
    if missing:
        raise PipelineError(f"write_report: thresholds lack classes {missing}")
    return np.array([float(th[c]) for c in classes])


def _save(fig: Any, path: Path) -> Path:
    """Render a Figure to PNG atomically (Agg canvas attached here: no pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def _fig_confusion(figure: Callable, y: np.ndarray, lab: np.ndarray, classes: list[str],
                   decision: str) -> Any:
    k = len(classes)
    has = y.max(axis=1) > 0.5
    cm = np.zeros((k, k), dtype=int)
    np.add.at(cm, (y[has].argmax(axis=1), lab[has]), 1)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = 1.0 + 0.75 * k
    fig = figure(figsize=(size + 1.5, size))
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of true class")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{norm[i, j]:.2f}\n({cm[i, j]})", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), [f"{c} (n={n})" for c, n in zip(classes, cm.sum(axis=1))])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"OOF confusion, decision: {decision} (row-normalized, counts)")
    return fig


def _fig_f1(figure: Callable, f1_arg: np.ndarray, dice_t: np.ndarray, support: np.ndarray,
            classes: list[str]) -> Any:
    k, x = len(classes), np.arange(len(classes))
    fig = figure(figsize=(max(6.0, 0.8 * k + 2), 4))
    ax = fig.subplots()
    if np.isfinite(f1_arg).any():
        ax.bar(x - 0.2, f1_arg, 0.4, label=f"argmax (macro {f1_arg.mean():.3f})")
    ax.bar(x + 0.2, dice_t, 0.4, label=f"tuned thresholds (macro {dice_t.mean():.3f})")
    ax.set_xticks(x, [f"{c}\n(n={n})" for c, n in zip(classes, support)], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("F1 / Dice (OOF)")
    ax.set_title("Per-class F1 on pooled OOF: argmax vs tuned thresholds (optimistic)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _fig_thresholds(figure: Callable, y: np.ndarray, probs: np.ndarray, t: np.ndarray,
                    classes: list[str]) -> Any:
    grid = D.threshold_grid()
    k = len(classes)
    ncol = min(4, k)
    nrow = math.ceil(k / ncol)
    fig = figure(figsize=(3.2 * ncol, 2.5 * nrow))
    axes = fig.subplots(nrow, ncol, sharex=True, sharey=True, squeeze=False).ravel()
    for c, ax in enumerate(axes):
        if c >= k:
            ax.set_axis_off()
            continue
        curve = D.dice_curve(y[:, c], probs[:, c], grid)
        ax.plot(grid, curve, lw=1.3)
        ax.axvline(0.5, color="grey", ls=":", lw=0.8)
        at = M.dice_per_class(y[:, [c]], probs[:, [c]], t[c])[0]
        ax.axvline(t[c], color="tab:red", lw=1)
        ax.plot([t[c]], [at], "o", color="tab:red", ms=4)
        ax.set_title(f"{classes[c]} (n={int((y[:, c] > 0.5).sum())}) t={t[c]:.2f} Dice={at:.3f}",
                     fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    fig.supxlabel("threshold")
    fig.supylabel("Dice (OOF)")
    return fig


def _fig_training(figure: Callable, histories: dict[str, pd.DataFrame]) -> Any | None:
    panels = [("loss", ["train_loss", "val_loss"]), ("val macro F1", ["val_macro_f1"]), ("lr", ["lr"])]
    panels = [(n, cols) for n, cols in panels if any(c in h for h in histories.values() for c in cols)]
    if not histories or not panels:
        return None
    fig = figure(figsize=(4.5 * len(panels), 3.5))
    axes = fig.subplots(1, len(panels), squeeze=False).ravel()
    colors = [f"C{i % 10}" for i in range(len(histories))]
    for ax, (title, cols) in zip(axes, panels):
        for color, (name, h) in zip(colors, histories.items()):
            x = h["epoch"] if "epoch" in h else np.arange(len(h))
            present = [c for c in cols if c in h]
            for col in present:
                ax.plot(x, h[col], color=color, lw=1.2, label=name if col == present[0] else None,
                        ls="--" if title == "loss" and col == "val_loss" else "-")
        ax.set_title(title + (" (solid train, dashed val)" if title == "loss" else ""), fontsize=9)
        ax.set_xlabel("epoch")
        if title == "lr" and all((h["lr"] > 0).all() for h in histories.values() if "lr" in h):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return fig


def _per_fold_table(cv: dict) -> pd.DataFrame | None:
    """Per-fold metrics (fold, f1_argmax?, dice_05, dice_infold, dice_cv) or None."""
    if cv.get("per_fold") is None or not len(cv["per_fold"]):
        return None
    pf = pd.DataFrame(cv["per_fold"]).reset_index(drop=True)
    for key, col in (("per_fold_f1_argmax", "f1_argmax"), ("per_fold_pauc_80", "pauc_80")):
        v = cv.get(key)
        if v is not None and len(v) == len(pf):
            pf.insert(min(2, len(pf.columns)), col, np.asarray(v, dtype=float))
    return pf


def _fig_cv_spread(figure: Callable, pf: pd.DataFrame) -> Any:
    cols = [c for c in ("pauc_80", "f1_argmax", "dice_05", "dice_infold", "dice_cv") if c in pf]
    labels = {"pauc_80": "pAUC\n(max 0.2)", "f1_argmax": "F1 argmax", "dice_05": "Dice@0.5", "dice_infold": "Dice tuned\nin-fold",
              "dice_cv": "Dice tuned\nhonest"}
    fig = figure(figsize=(1.6 * len(cols) + 2, 3.8))
    ax = fig.subplots()
    offs = np.linspace(-0.15, 0.15, len(pf)) if len(pf) > 1 else np.zeros(1)
    for i, c in enumerate(cols):
        v = pf[c].to_numpy(float)
        mu, sd = float(np.mean(v)), float(np.std(v))
        ax.bar(i, mu, 0.6, color=f"C{i}", alpha=0.25)
        ax.errorbar(i, mu, yerr=sd, color="black", capsize=5, lw=1)
        ax.scatter(i + offs, v, color=f"C{i}", s=18, zorder=3)
        ax.annotate(f"{mu:.3f}±{sd:.3f}", (i, mu + sd), textcoords="offset points", xytext=(0, 4),
                    ha="center", fontsize=8)
    ax.set_xticks(range(len(cols)), [labels[c] for c in cols], fontsize=8)
    lo = float(pf[cols].to_numpy(float).min())
    ax.set_ylim(max(0.0, lo - 0.1), 1.0)
    ax.set_ylabel("macro score per fold")
    ax.set_title(f"CV spread over {len(pf)} folds (dots: folds, bar: mean ± std)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _write_figures(img_dir: Path, figs: dict[str, tuple[str, Callable[[], Any]]]) -> list[tuple[str, str]]:
    """Render each (caption, make) figure to img_dir/name; remove the file of one not produced.
    Returns (caption, name) of the figures written."""
    written: list[tuple[str, str]] = []
    for name, (caption, make) in figs.items():
        fig = make()
        if fig is None:
            (img_dir / name).unlink(missing_ok=True)
            log.info("report: no data for %s, skipped", name)
            continue
        _save(fig, img_dir / name)
        written.append((caption, name))
    return written


def _headline(cv: dict) -> str:
    """Headline rows: metric, value and how it was fitted (`cv["nesting"]`; an SE row shares its figure's)."""
    how = cv.get("nesting", {})
    rows = [[lbl, float(cv[k]), how.get(k.removesuffix("_se"), "-")] for k, lbl in HEADLINE.items() if k in cv]
    return _md_table(["metric", "value", "fitted how (weights, priors, thresholds, decision)"], rows)


def _fitted_how(cv: dict, figures: Sequence[tuple[str, str]]) -> str:
    """One line per table column: how its figures were fitted (`cv["nesting"]`)."""
    how = cv.get("nesting", {})
    return "Fitted how: " + "; ".join(f"{name}: {how[k]}" for name, k in figures if k in how) if how else ""


def _members_table(members: list[dict]) -> str:
    """The members' weights and their own OOF metrics (top level or under ``cv``)."""
    if not members:
        return "_no members listed_"
    mcols = [k for k in MEMBER_METRICS if any(_member_metric(m, k) is not None for m in members)]
    return _md_table(["exp", "weight", *mcols],
                     [[m.get("exp", "?"), m.get("weight"), *(_member_metric(m, k) for k in mcols)] for m in members])


def _card_section(card: dict, written: Sequence[tuple[str, str]]) -> str:
    """The report's "Model card" section: what was trained on, the subgroup tables and their plot."""
    d = card["data"]
    parts = [f"Trained on {d['n_lesions']} lesions ({d['format']}, {d['task']}); the full card, with intended use "
             f"and limits, is `{A.MODEL_CARD_MD}` (`{A.MODEL_CARD_JSON}`).", "", MC.subgroup_markdown(card)]
    parts += [f"\n![{cap}]({A.REPORT_DIR}/{name})" for cap, name in written if name == A.FIG_SUBGROUPS]
    parts += ["", "Limits: " + " ".join(card["limits"])]
    return "\n".join(parts)


def stage_times_table(rows: Sequence[dict]) -> str:
    """Markdown table of stage wall times (one row per folder that ran a stage) and their total."""
    def secs(v: Any) -> str:
        return "-" if v is None else f"{float(v):.1f}"

    body = [[f"{r.get('number', '?')} {r.get('stage', '?')}", r.get("exp", "?"), secs(r.get("wall_seconds"))]
            for r in rows]
    total = sum(float(r["wall_seconds"]) for r in rows if r.get("wall_seconds") is not None and not r.get("part"))
    return _md_table(["stage", "exp", "wall seconds"], [*body, ["**total**", "", secs(total)]])


def write_report(folder: Path, train: pd.DataFrame, oof: pd.DataFrame, classes: list[str], cv: dict,
                 thresholds: dict[str, float], decision: str, members: list[dict],
                 histories: dict[str, pd.DataFrame] | None, title: str, task: str = "multiclass",
                 stage_times: list[dict] | None = None, card: dict | None = None) -> Path:
    """Write ``folder/report.md`` and its PNGs in ``folder/report/``; returns the report path.

    ``cv`` is a ``cv_summary`` dict; ``thresholds`` the tuned per-class thresholds (empty: those in
    ``cv``); ``decision`` 'argmax', 'thresholds' or 'raw' (the rule used for the submission; raw =
    blended probabilities as they are, binary tasks); ``task`` multiclass | multilabel | binary
    (the confusion matrix and argmax F1 are multiclass only); ``members`` dicts with ``exp``, ``weight`` and optionally metrics (top level or under ``cv``);
    ``histories`` ``{"<exp>/foldK": DataFrame(epoch, train_loss, val_loss, val_macro_f1, lr)}``
    (any column may be missing; empty or None: no training-curves figure); ``stage_times`` rows
    with ``number``, ``stage``, ``exp``, ``wall_seconds`` (``lib.core.artifacts.stage_times``; None or
    empty: no stage-times section); ``card`` the model card (``lib.evaluation.model_card``; None: no
    "Model card" section, no subgroup plot). Figures use
    matplotlib's Agg canvas directly (no pyplot state); every file is written atomically and
    figures not produced this time are removed so the folder matches the report.
    """
    from matplotlib.figure import Figure

    if decision not in DECISIONS:
        raise PipelineError(f"write_report: decision must be one of {DECISIONS}, got '{decision}'")
    folder = Path(folder)
    img_dir = folder / A.REPORT_DIR
    Y, P, _ = oof_arrays(train, oof, classes)
    t = _resolve_thresholds(thresholds, cv, classes, Y, P)
    support = (Y > 0.5).sum(axis=0).astype(int)
    single_label = task == "multiclass"
    f1_arg = (M.dice_per_class(Y, D.argmax_decisions(P)) if single_label
              else np.full(len(classes), np.nan))  # argmax is a single-label rule
    dice_05 = M.dice_per_class(Y, P)
    dice_t = M.dice_per_class(Y, P, t)
    lab = D.decide_labels(P, t if decision == "thresholds" else None)
    pf = _per_fold_table(cv)

    figs = {A.FIG_CONFUSION: ("OOF confusion matrix", lambda: _fig_confusion(Figure, Y, lab, classes, decision)
                              if single_label else None),
            A.FIG_F1: ("Per-class F1", lambda: _fig_f1(Figure, f1_arg, dice_t, support, classes)),
            A.FIG_THRESHOLDS: ("Dice vs threshold (red: chosen, dotted: 0.5)",
                                     lambda: _fig_thresholds(Figure, Y, P, t, classes)),
            A.FIG_TRAINING: ("Training curves", lambda: _fig_training(Figure, histories or {})),
            A.FIG_CV_SPREAD: ("CV spread over folds", lambda: None if pf is None else _fig_cv_spread(Figure, pf)),
            A.FIG_SUBGROUPS: ("Per-subgroup figures", lambda: None if card is None else MC.fig_subgroups(Figure, card))}
    written = _write_figures(img_dir, figs)

    parts = [f"# {title}", "", f"OOF rows: {len(Y)}, classes: {len(classes)}, decision: **{decision}**", "",
             "## Headline (OOF)", "",
             _headline(cv),
             "", "## Decision and thresholds", "",
             f"Decision used: **{decision}**" + {
                "argmax": " (single label = argmax of p)",
                "thresholds": " (per-class p > t, baked to 0.5 in the submission)",
                "raw": " (blended probabilities submitted as they are"
                       + (": the binary metric ranks them)" if task == "binary" else ")")}[decision],
             "", _md_table(["class", "threshold"], [[c, float(x)] for c, x in zip(classes, t)]),
             "", "## Members", "", _members_table(members), "", "## Per class (OOF)", "",
             _md_table(["class", "support", "F1 argmax", "Dice@0.5", "Dice tuned", "threshold"],
                       [[c, int(n), float(a), float(b), float(d), float(x)]
                        for c, n, a, b, d, x in zip(classes, support, f1_arg, dice_05, dice_t, t)]),
             "", _fitted_how(cv, (("F1 argmax", "per_class_f1_argmax"), ("Dice@0.5", "macro_dice_05"),
                                  ("Dice tuned", "per_class_dice_tuned"))),
             "", "## Per fold", "", _fitted_how(cv, (("per fold", "per_fold"),)), ""]
    parts.append(_md_table(list(pf.columns), pf.to_numpy(object).tolist()) if pf is not None
                 else "_no per-fold results_")
    if stage_times:
        parts += ["", "## Stage times", "", stage_times_table(stage_times)]
    if card is not None:
        parts += ["", "## Model card", "", _card_section(card, written)]
    parts += ["", "## Notes", "", NOTE, "", "## Figures", ""]
    parts += [f"### {cap}\n\n![{cap}]({A.REPORT_DIR}/{name})\n" for cap, name in written if name != A.FIG_SUBGROUPS]
    out = write_text("\n".join(parts).rstrip() + "\n", folder / A.REPORT)
    log.info("report written: %s (%d figures)", out, len(written))
    return out
