"""The run report: results.json, a Markdown summary (report.md) and a training-curve picture."""
from __future__ import annotations

import json
import os


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def markdown(results: dict) -> str:
    lines = [f"# {results.get('name', 'lcr-fast run')}", ""]
    if "config" in results:
        c = results["config"]
        lines += [
            f"- method: {c['model']['name']} + LCR, backbone {c['model']['backbone']}, {c['dataset']['image_size']} px, "
            f"batch {c['train']['batch_size']}, {results.get('epochs')} epochs ({results.get('steps')} steps)",
        ]
    if results.get("throughput_pairs_per_s"):
        lines.append(f"- throughput: {results['throughput_pairs_per_s']:.1f} image pairs/s (mean over logged intervals)")
    if results.get("final_losses"):
        losses = ", ".join(f"{k} {v:.4f}" for k, v in results["final_losses"].items())
        lines.append(f"- last logged losses: {losses}")
    lines += ["", "| evaluation | rank-1 | rank-5 | mAP |", "| --- | --- | --- | --- |"]
    for key, label in (("retrieval", "retrieval, rationale features"), ("retrieval_gap", "retrieval, GAP features")):
        if key in results:
            r = results[key]
            lines.append(f"| {label} | {_pct(r['rank1'])} | {_pct(r['rank5'])} | {_pct(r['mAP'])} |")
    if "knn_top1" in results:
        lines += ["", f"kNN top-1 (k={results.get('knn_k')}, t=0.1, GAP features, train split as the bank): "
                      f"**{results['knn_top1']:.2f}%**"]
    if results.get("retrieval_best"):
        lines += ["", "Best epoch of each retrieval metric (selected on the test split, as the reference's authors "
                      "report MoCo runs; the table above is the last epoch):", ""]
        lines += [f"- {k}: {_pct(v['value'])} at epoch {v['epoch']}" for k, v in results["retrieval_best"].items()]
    history = results.get("history") or []
    columns = [c for c in ("knn_top1", "rank1", "rank5", "mAP") if any(c in h for h in history)]
    if columns:
        lines += ["", "| epoch | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
        for h in history:
            cells = [(f"{h[c]:.2f}" if c == "knn_top1" else _pct(h[c])) if c in h else "" for c in columns]
            lines.append(f"| {h['epoch']} | " + " | ".join(cells) + " |")
    for key, label in (("curves", "training curves"), ("heatmaps", "rationale heatmaps")):
        if results.get(key):
            lines += ["", f"![{label}]({os.path.basename(results[key])})"]
    return "\n".join(lines) + "\n"


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
            ax.plot([r["step"] for r in source], [r[key] for r in source], marker="o" if len(source) < 20 else None, label=key)
        ax.set_xlabel("optimizer step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def write_report(results: dict, log_dir: str) -> tuple[str, str]:
    os.makedirs(log_dir, exist_ok=True)
    json_path, md_path = os.path.join(log_dir, "results.json"), os.path.join(log_dir, "report.md")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=2)
    with open(md_path, "w") as f:
        f.write(markdown(results))
    return json_path, md_path
