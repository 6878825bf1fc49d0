"""Every rendering of results: the trainer's console summary, report.md, results.json and curves.png,
and lcr-eval's ``<checkpoint>_eval.json`` / ``.md``.

Data conventions (those of the functions that compute the figures): retrieval rank-1 / rank-5 / mAP
are fractions in [0, 1], as ``retrieval_metrics`` returns them; kNN and linear-probe accuracies are
percentages, as the reference prints them. Every rendering shows all of them in percent.
"""
from __future__ import annotations

import json
import os

# Results key of each retrieval evaluation and the features it ran on.
RETRIEVAL_FEATURES = (("retrieval", "rationale features"), ("retrieval_gap", "GAP features"))
TEST_SELECTED = "selected on the test split, as the reference's authors report"
LINEAR_EVAL = "linear evaluation as the reference's BYOL main.py runs it after training"


def percent(x: float, *, fraction: bool = True) -> str:
    """``x`` in percent with two decimals: 0.1234 -> "12.34". ``fraction=False`` for a figure that is
    a percentage already (12.34 -> "12.34"), which is not divided and multiplied back, so that float
    rounding cannot move its last digit."""
    return f"{100 * x if fraction else x:.2f}"


def _knn_settings(k: int, t: float) -> str:
    return f"k={k}, t={t}"


def training_summary(results: dict) -> str:
    """The figures of a training run (or of ``--eval_from``) as the console lines the trainer prints."""
    skipped = results.get("skipped_steps")
    lines = [f"skipped {skipped} step(s) with a non-finite loss"] if skipped else []
    for key, label in RETRIEVAL_FEATURES:
        if key in results:
            r = results[key]
            lines.append(f"retrieval ({label}): rank-1 {percent(r['rank1'])}  rank-5 {percent(r['rank5'])}  "
                         f"mAP {percent(r['mAP'])}")
    if results.get("selected_on_validation"):
        chosen = results["selected_on_validation"]
        lines.append(f"selected on validation (best validation mAP, epoch {chosen['epoch']}), test figures: "
                     + _figures(chosen["test"]))
    if results.get("retrieval_best"):
        lines.append(f"best over epochs ({TEST_SELECTED}): " + "  ".join(
            f"{k} {percent(v['value'])} (epoch {v['epoch']})" for k, v in results["retrieval_best"].items()))
    if "knn_top1" in results:
        lines.append(f"kNN top-1 ({_knn_settings(results['knn_k'], results['knn_t'])}, GAP features): "
                     f"{percent(results['knn_top1'], fraction=False)}")
    linear = results.get("linear_eval")
    if linear and "top1" in linear:
        lines.append(f"{LINEAR_EVAL} ({linear['epochs']} epochs, {linear['steps']} steps; {linear['accuracy']}): "
                     f"top-1 {percent(linear['top1'], fraction=False)}; weights: {linear['weights']}")
    elif linear:
        lines.append(f"no linear evaluation: {linear['skipped']}")
    lines += reading_guide(results)
    return "\n".join(lines)


def _figures(scores: dict) -> str:
    """Test figures of one epoch: retrieval rank-1 / rank-5 / mAP and kNN top-1, those present."""
    shown = [f"{label} {percent(scores[k])}" for k, label in (("rank1", "rank-1"), ("rank5", "rank-5"), ("mAP", "mAP"))
             if k in scores]
    if "knn_top1" in scores:
        shown.append(f"kNN top-1 {percent(scores['knn_top1'], fraction=False)}")
    return "  ".join(shown)


def _linear_eval_markdown(linear: dict) -> list[str]:
    """The end-of-run linear evaluation: the figure, which weights, how it was averaged and trained."""
    if "top1" not in linear:
        return ["", f"No linear evaluation after training: {linear['skipped']}."]
    first = "warmed" if linear["first_step_warmed"] else "un-warmed, as the reference (fixes.warmup_first_step)"
    top1 = percent(linear["top1"], fraction=False)
    return [
        "", f"Linear evaluation, as the reference's BYOL main.py runs it after training (linear_cub_eval.py): "
        f"**top-1 {top1}%** ({linear['accuracy']})", "",
        f"- weights evaluated: {linear['weights']}",
        f"- accuracy: mean of per-batch accuracies {percent(linear['top1_batch_mean'], fraction=False)}%, over all "
        f"{linear['num_test']} test images {percent(linear['top1_sample_weighted'], fraction=False)}%",
        f"- classifier: Linear on {linear['features']} features, {linear['optimizer']} lr {linear['lr']:g} "
        f"(eval.base_lr {linear['base_lr']:g} x {linear['batch_size']}/256), momentum {linear['momentum']:g}, weight "
        f"decay {linear['weight_decay']:g}, {linear['warmup_epochs']} warmup epoch(s) from {linear['warmup_lr']:g}, "
        f"cosine to {linear['final_lr']:g} per iteration, first step {first}",
        f"- {linear['epochs']} epochs x {linear['steps_per_epoch']} batches of {linear['batch_size']} = "
        f"{linear['steps']} steps on {linear['num_train']} training images; {linear['augmentation']}; "
        f"last epoch's loss {linear['last_epoch_loss']:.4f}",
    ]


def _selection_markdown(results: dict) -> list[str]:
    """Three ways to pick the epoch a figure comes from, side by side: the last, the validation's best, the test's."""
    chosen, split = results["selected_on_validation"], results["validation_split"]
    lines = ["", "Model selection (test-split figures; the table above is the last epoch):", "",
             "| selection | epoch | rank-1 | rank-5 | mAP | kNN top-1 |", "| --- | --- | --- | --- | --- | --- |"]

    def row(label: str, epoch, scores: dict) -> str:
        cells = [percent(scores[k]) if k in scores else "" for k in ("rank1", "rank5", "mAP")]
        knn = percent(scores["knn_top1"], fraction=False) if "knn_top1" in scores else ""
        return f"| {label} | {epoch} | " + " | ".join(cells) + f" | {knn} |"

    last = {k: results[k] for k in ("knn_top1",) if k in results} | results.get("retrieval", {})
    lines.append(row("last epoch", results["epochs"] - 1, last))
    lines.append(row(f"best validation mAP ({percent(chosen['validation']['mAP'])}; selected on {split['images']} "
                     f"images held out of train/, {split['per_class']} per class, never trained on)",
                     chosen["epoch"], chosen["test"]))
    best = results.get("retrieval_best") or {}
    if best:
        cells = [f"{percent(best[k]['value'])} (epoch {best[k]['epoch']})" if k in best else ""
                 for k in ("rank1", "rank5", "mAP")]
        lines.append(f"| best of each metric ({TEST_SELECTED}) | per metric | " + " | ".join(cells) + " |  |")
    return lines


def _times(x: float, base: float) -> str:
    return f"{x / base:.1f}x" if base > 0 else "n/a"


def reading_guide(results: dict) -> list[str]:
    """One sentence per figure on what it means: chance, what the initial weights scored, the gain."""
    lines = []
    n = results.get("num_classes")
    chance = 100 / n if n else None
    if chance is not None:
        lines.append(f"Chance: a guess among the {n} classes scores kNN top-1 and retrieval rank-1 of about "
                     f"{chance:.2f}% (mAP about the same).")
    if "knn_top1" in results:
        knn = results["knn_top1"]
        gain = f", {_times(knn, chance)} chance" if chance is not None else ""
        lines.append(f"kNN top-1 {percent(knn, fraction=False)}%: how often the {results['knn_k']} training images "
                     f"nearest a test image (cosine similarity of pooled backbone features) vote for its class{gain}.")
    retrieval = results.get("retrieval")
    if retrieval:
        lines.append(f"Retrieval rank-1 {percent(retrieval['rank1'])}%, mAP {percent(retrieval['mAP'])}%: each test "
                     "image ranks all the others by their rationale features; rank-1 is how often the first is of its "
                     "class, mAP how high all of its class come.")
    untrained = results.get("untrained")
    if untrained:
        line = (f"Untrained: the same network before its first step scored kNN top-1 "
                f"{percent(untrained['knn_top1'], fraction=False)}%, rank-1 {percent(untrained['rank1'])}%, mAP "
                f"{percent(untrained['mAP'])}%")
        if "knn_top1" in results and retrieval:
            line += (f"; training multiplied kNN top-1 by {_times(results['knn_top1'], untrained['knn_top1'])} and "
                     f"mAP by {_times(retrieval['mAP'], untrained['mAP'])}")
        lines.append(line + ".")
    return lines


def _components_markdown(c: dict) -> list[str]:
    """The path each component took (lcr_fast.selfcheck's record), kernels grouped by path."""
    ops_by_path: dict[str, list[str]] = {}
    for op, path in c["kernels"].items():
        ops_by_path.setdefault(path, []).append(op)
    kernels = "; ".join(f"{path} ({', '.join(ops)})" for path, ops in ops_by_path.items())
    paths = ", ".join(f"{key} {c[key]}" for key in ("data", "precision", "compile") if c.get(key))
    return [f"- components on {c['device']}{' (strict)' if c['strict'] else ''}: {paths}", f"- kernels: {kernels}"]


_VERSION_LABELS = (("python", "Python"), ("torch", "torch"), ("cuda", "CUDA"), ("cudnn", "cuDNN"), ("nccl", "NCCL"),
                   ("triton", "Triton"), ("dali", "DALI"), ("deepspeed", "DeepSpeed"), ("torchvision", "torchvision"),
                   ("lcr_fast", "lcr-fast"))


def _launch_words(run: dict) -> str:
    hosts = ", ".join(run["hosts"])
    return (f"{run['launcher']}, {run['world_size']} rank(s) on {run['nodes']} node(s) (hosts {hosts}), process "
            f"group at {run['master']}")


def _run_markdown(run: dict, earlier: list[dict]) -> list[str]:
    """How the run was started and what it ran on (lcr_fast.run_info's record), and the runs it resumed."""
    devices: dict[str, int] = {}
    for rank in run["ranks"]:
        devices[rank["device"]] = devices.get(rank["device"], 0) + 1
    versions = ", ".join(f"{label} {run['versions'][key]}" for key, label in _VERSION_LABELS
                         if run["versions"].get(key))
    git = run.get("git")
    if git:
        versions += f" (git {git['commit'][:12]}{', with uncommitted changes' if git['dirty'] else ''})"
    lines = ["", "## Run", "", f"- launcher: {_launch_words(run)}",
             "- devices: " + ", ".join(f"{name} x {count}" for name, count in devices.items()),
             f"- versions: {versions}", "- command: `" + " ".join(run["command"]) + "`"]
    if earlier:  # a resumed run: which launch trained which steps
        segments = [*earlier, run]
        for segment, following in zip(segments, [*segments[1:], None]):
            until = f"to {following['first_step']}" if following else "on (this run)"
            lines.append(f"- steps {segment['first_step']} {until}: {_launch_words(segment)}")
    return lines


def _data_markdown(results: dict) -> list[str]:
    """What the run trained on and what it was evaluated on, or why it was not."""
    lines = []
    trained = results.get("training_data")
    if trained:
        kind = f"labeled, {trained['num_classes']} classes" if trained["labeled"] else "unlabeled"
        lines.append(f"- training data: {trained['data_dir']} ({trained['images']} images, {kind})")
    evaluation = results.get("evaluation")
    if evaluation and evaluation.get("skipped"):
        lines.append(f"- evaluation skipped: {evaluation['skipped']}")
    elif evaluation:
        lines.append(f"- evaluation data: {evaluation['data_dir']} (train/: {evaluation['train_images']} images, "
                     f"the kNN bank; test/: {evaluation['test_images']} images; {evaluation['num_classes']} classes)")
    return lines


def training_markdown(results: dict) -> str:
    """report.md: settings, throughput, last losses, the retrieval table, kNN, best epochs, history, pictures."""
    lines = [f"# {results.get('name', 'lcr-fast run')}", ""]
    if "config" in results:
        c = results["config"]
        lines.append(f"- method: {c['model']['name']} + LCR, backbone {c['model']['backbone']}, "
                     f"{c['dataset']['image_size']} px, batch {c['train']['batch_size']}, {results.get('epochs')} "
                     f"epochs ({results.get('steps')} steps)")
    if results.get("throughput_pairs_per_s"):
        lines.append(f"- throughput: {results['throughput_pairs_per_s']:.1f} image pairs/s "
                     "(mean over logged intervals)")
    if results.get("final_losses"):
        losses = ", ".join(f"{k} {v:.4f}" for k, v in results["final_losses"].items())
        lines.append(f"- last logged losses: {losses}")
    lines += _data_markdown(results)
    if results.get("components"):
        lines += _components_markdown(results["components"])
    if any(key in results for key, _ in RETRIEVAL_FEATURES) or results.get("untrained"):
        lines += ["", "| evaluation | rank-1 | rank-5 | mAP |", "| --- | --- | --- | --- |"]
    for key, label in RETRIEVAL_FEATURES:
        if key in results:
            r = results[key]
            lines.append(f"| retrieval, {label} | {percent(r['rank1'])} | {percent(r['rank5'])} | "
                         f"{percent(r['mAP'])} |")
    if results.get("untrained"):
        u = results["untrained"]
        lines.append(f"| retrieval, rationale features, untrained (initial weights) | {percent(u['rank1'])} | "
                     f"{percent(u['rank5'])} | {percent(u['mAP'])} |")
    if "knn_top1" in results:
        lines += ["", f"kNN top-1 ({_knn_settings(results['knn_k'], results['knn_t'])}, GAP features, train split "
                      f"as the bank): **{percent(results['knn_top1'], fraction=False)}%**"]
    if results.get("selected_on_validation"):
        lines += _selection_markdown(results)
    elif results.get("retrieval_best"):
        lines += ["", f"Best epoch of each retrieval metric ({TEST_SELECTED}; the table above is the last epoch):",
                  ""]
        lines += [f"- {k}: {percent(v['value'])} at epoch {v['epoch']}" for k, v in results["retrieval_best"].items()]
    if results.get("linear_eval"):
        lines += _linear_eval_markdown(results["linear_eval"])
    history = results.get("history") or []
    columns = [c for c in ("knn_top1", "rank1", "rank5", "mAP") if any(c in h for h in history)]
    validated = any("validation" in h for h in history)
    if columns:
        extra = " validation kNN top-1 | validation mAP |" if validated else ""
        lines += ["", "| epoch | " + " | ".join(columns) + " |" + extra,
                  "| --- |" + " --- |" * (len(columns) + 2 * validated)]
        for h in history:
            cells = [percent(h[c], fraction=c != "knn_top1") if c in h else "" for c in columns]
            if validated:
                v = h.get("validation", {})
                cells += [percent(v["knn_top1"], fraction=False) if v else "", percent(v["mAP"]) if v else ""]
            lines.append(f"| {h['epoch']} | " + " | ".join(cells) + " |")
    for key, label in (("curves", "training curves"), ("heatmaps", "rationale heatmaps")):
        if results.get(key):
            lines += ["", f"![{label}]({os.path.basename(results[key])})"]
    if results.get("run"):
        lines += _run_markdown(results["run"], results.get("earlier_runs", []))
    guide = reading_guide(results)
    if guide:
        lines += ["", "## What the numbers mean", ""] + [f"- {line}" for line in guide]
    return "\n".join(lines) + "\n"


def _write(results: dict, markdown: str, json_path: str, md_path: str) -> tuple[str, str]:
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(results, f, indent=2)
    with open(md_path, "w") as f:
        f.write(markdown)
    return json_path, md_path


def write_training_report(results: dict, log_dir: str) -> tuple[str, str]:
    """Write ``log_dir/results.json`` and ``log_dir/report.md``; returns their paths."""
    return _write(results, training_markdown(results), os.path.join(log_dir, "results.json"),
                  os.path.join(log_dir, "report.md"))


def plot_curves(metrics_path: str, out_path: str) -> str | None:
    """Loss terms, learning rate and kNN accuracy against the step; None when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    steps = [r for r in rows if "loss" in r]
    if not steps:
        return None
    knn = [r for r in rows if "knn_top1" in r]
    panels = [("loss", "ssl_loss", "rationale_loss"), ("lr",)] + ([("knn_top1",)] if knn else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4))
    for ax, keys in zip(axes, panels):
        source = knn if keys == ("knn_top1",) else steps
        for key in keys:
            ax.plot([r["step"] for r in source], [r[key] for r in source], marker="o" if len(source) < 20 else None,
                    label=key)
        ax.set_xlabel("optimizer step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def evaluation_markdown(results: dict) -> str:
    """lcr-eval's results as a Markdown table, every figure in percent."""
    feats = results["features"]
    lines = [f"# Evaluation of `{os.path.basename(results['checkpoint'])}`", "",
             f"{results['method']} + LCR, {results['backbone']}, {results['image_size']} px, "
             f"{results['num_classes']} classes, {results['num_test']} test"
             + (f" / {results['num_train']} train" if results.get("num_train") else "")
             + (f" (less {results['held_out_per_class']} per class held out for validation by the run)"
                if results.get("held_out_per_class") else "") + " images, "
             f"{feats} features, {results['device']} ({results['precision']}"
             + (", channels_last" if results.get("channels_last") else "") + ").", "",
             "| protocol | features | metric | value (%) |", "| --- | --- | --- | --- |"]
    if "retrieval" in results:
        r = results["retrieval"]
        for metric, label in (("rank1", "rank-1"), ("rank5", "rank-5"), ("mAP", "mAP")):
            lines.append(f"| retrieval (leave-one-out, test split) | {feats} | {label} | {percent(r[metric])} |")
    if "knn" in results:
        r = results["knn"]
        lines.append(f"| kNN ({_knn_settings(r['k'], r['t'])}, train split as the bank) | {feats} | top-1 | "
                     f"{percent(r['top1'], fraction=False)} |")
    if "linear" in results:
        r = results["linear"]
        label = {"cached": "linear probe, cached features (no augmentation; not main_lincls)",
                 "reference": "linear probe, reference protocol (main_lincls)",
                 "lcr": f"{LINEAR_EVAL} (linear_cub_eval.py; {r.get('accuracy')}; {r.get('weights')} weights)"
                 }[r["protocol"]]
        label += f", {r['epochs']} epochs"
        for metric, name in (("top1", "top-1"), ("top5", "top-5")):
            if metric in r:
                lines.append(f"| {label} | {feats} | {name} | {percent(r[metric], fraction=False)} |")
    return "\n".join(lines) + "\n"


def write_evaluation_report(results: dict, out_dir: str, stem: str) -> tuple[str, str]:
    """Write ``out_dir/<stem>_eval.json`` (``results`` plus the two paths, under "json" and
    "markdown") and ``out_dir/<stem>_eval.md``; returns their paths."""
    json_path, md_path = os.path.join(out_dir, f"{stem}_eval.json"), os.path.join(out_dir, f"{stem}_eval.md")
    return _write({**results, "json": json_path, "markdown": md_path}, evaluation_markdown(results), json_path,
                  md_path)
