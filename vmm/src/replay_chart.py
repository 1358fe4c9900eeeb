#!/usr/bin/python3
"""The chart of `vmm replay --png` (vmm/src/replay.rs runs it): per recording, host calls,
host flushes and the engine's ns per descriptor of each policy. Args: JSON PNG."""
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
data = json.load(open(sys.argv[1]))
recs = data["recordings"]
names = [r["trace"] for r in recs]
pols = ["per-leaf", "strict", "deferred"]
colors = {"per-leaf": "#d62728", "strict": "#1f77b4", "deferred": "#17becf"}
labels = {"per-leaf": "per-leaf (QEMU-like)", "strict": "ours strict", "deferred": "ours deferred"}
metrics = [("calls", "host map+unmap calls", True), ("flushes", "host IOTLB flushes", True),
           ("ns_per_desc", "engine ns per descriptor", False)]
fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
w = 0.8 / len(pols)
for ax, (key, title, log) in zip(axes, metrics):
    for i, p in enumerate(pols):
        vals = [next(x[key] for x in r["policies"] if x["policy"] == p) for r in recs]
        xs = [k + (i - 1) * w for k in range(len(recs))]
        bars = ax.bar(xs, [max(v, 0.5) if log else v for v in vals], w, color=colors[p], label=labels[p])
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.0f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(recs)))
    ax.set_xticklabels(names, rotation=20)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
axes[0].legend(fontsize=8)
fig.suptitle("vmm replay: the same recorded guest streams under each policy")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
