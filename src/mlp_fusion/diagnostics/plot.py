"""A PNG of error against ratio: one panel per kernel and one for the output error, one line per method."""

from __future__ import annotations

from pathlib import Path


def plot_rows(rows: list[dict], kernels: tuple[str, ...], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"{k}_error", f"{ {'adam': 'Adam', 'sgd': 'SGD'}[k] } kernel error") for k in kernels] + [
        ("output_error", "output error")
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8))
    methods = list(dict.fromkeys(row["method"] for row in rows))
    for axis, (key, label) in zip(axes if len(panels) > 1 else [axes], panels):
        for method in methods:
            points = sorted((row["ratio"], row[key]) for row in rows if row["method"] == method)
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("kept ratio of the MLP width")
        axis.set_ylabel(f"relative {label}")
        axis.set_title(label)
        if key == "sgd_error":
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
    axes_list = axes if len(panels) > 1 else [axes]
    axes_list[0].legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
