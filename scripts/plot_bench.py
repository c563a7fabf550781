"""Draw the ratios of a benchmark results file as one horizontal bar chart per group.

Usage: ``python scripts/plot_bench.py benchmarks/results/<date>-<host>.json`` -> writes the
``.png`` next to it. Each bar is a case's median divided by its group's reference (1.0 = the
reference; lower is better for every group in this suite). hotswap_rt's bars are blue.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path


def main(path: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(Path(path).read_text())
    groups = {g: cases for g, cases in results["medians_s"].items() if cases}
    figure, axes = plt.subplots(len(groups), 1, figsize=(10, 2.2 + 0.9 * sum(map(len, groups.values()))
                                                         / max(len(groups), 1) * len(groups) / 2))
    axes = [axes] if len(groups) == 1 else list(axes)
    for axis, (group, cases) in zip(axes, sorted(groups.items())):
        reference = cases.get(results["references"].get(group, ""), None) or min(cases.values())
        names = list(cases)
        ratios = [cases[n] / reference for n in names]
        axis.barh(range(len(names)), ratios, color=["#4c72b0" if "hotswap_rt" in n else "#999999"
                                                    for n in names])
        axis.set_yticks(range(len(names)), [textwrap.shorten(n, 55) for n in names], fontsize=7)
        axis.axvline(1.0, color="black", linewidth=0.8)
        axis.set_xscale("log")
        axis.set_title(textwrap.shorten(group, 110), fontsize=8)
        for i, ratio in enumerate(ratios):
            axis.text(ratio, i, f" {ratio:.2f}x", va="center", fontsize=7)
    machine = results["machine"]
    figure.suptitle(f"hotswap_rt benchmarks — {machine['processor']}, {machine['cpus']} CPUs, "
                    f"torch {machine['torch']}" + (f", {machine['cuda']}" if machine["cuda"] else ""),
                    fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 0.985))
    out = Path(path).with_suffix(".png")
    figure.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(main(sys.argv[1]))
