#!/usr/bin/python3
"""Turns one bench-viommu.sh run into a table (stdout), a JSON file and a PNG chart.

Inputs: the L0 console log, every line prefixed with the host's wall clock when it arrived, and
L0 QEMU's trace of VT-d invalidation descriptors (`PID@SECS.USECS:vtd_inv_desc_...`, same clock).
A cell (configuration, workload) is the window between the arrival of the L2's `bench begin` and
`bench end` markers; L1's counter snapshots taken at those markers are subtracted.
"""

import argparse
import json
import re
import sys
from collections import defaultdict

# Ours on the VFIO container; with bench-viommu.sh --l1 iommufd also on iommufd (the -iommufd
# configurations). Only the configurations a run has are reported.
CONFIGS = [
    "qemu-viommu",
    "qemu-viommu-ir",
    "ours-strict",
    "ours-strict-iommufd",
    "ours-strict-ir-off",
    "ours-strict-ir-off-iommufd",
    "ours-deferred",
    "ours-deferred-iommufd",
    "qemu",
    "ours",
    "ours-iommufd",
]
LABELS = {
    "qemu-viommu": "QEMU + vIOMMU",
    "qemu-viommu-ir": "QEMU + vIOMMU intremap=on,eim=on",
    "ours-strict": "ours --viommu (strict), container",
    "ours-strict-iommufd": "ours --viommu (strict), iommufd",
    "ours-strict-ir-off": "ours --viommu intremap=off (strict), container",
    "ours-strict-ir-off-iommufd": "ours --viommu intremap=off (strict), iommufd",
    "ours-deferred": "ours --viommu flush=deferred, container",
    "ours-deferred-iommufd": "ours --viommu flush=deferred, iommufd",
    "qemu": "QEMU, no vIOMMU",
    "ours": "ours, no vIOMMU, container",
    "ours-iommufd": "ours, no vIOMMU, iommufd",
}
COLORS = {
    "qemu-viommu": "#d62728",
    "qemu-viommu-ir": "#e377c2",
    "ours-strict": "#1f77b4",
    "ours-strict-iommufd": "#2ca02c",
    "ours-strict-ir-off": "#9467bd",
    "ours-strict-ir-off-iommufd": "#8c564b",
    "ours-deferred": "#17becf",
    "ours-deferred-iommufd": "#98df8a",
    "qemu": "#ff9896",
    "ours": "#aec7e8",
    "ours-iommufd": "#c5b0d5",
}
WORKLOADS = ["dd-4k", "dd-128k", "fio-rand4k"]
WLABELS = {
    "dd-4k": "dd 4 KiB QD1",
    "dd-128k": "dd 128 KiB",
    "fio-rand4k": "fio rand 4 KiB, 2 jobs x QD4",
}
# Stats counters of our engine worth diffing per cell.
ENGINE = [
    "register_write_ns",
    "register_lock_wait_ns",
    "host_dma_ns",
    "descriptors",
    "submissions",
    "waits",
    "host_map_calls",
    "host_unmap_calls",
    "host_mappings_removed",
    "pages_walked",
    "deferred_unmaps",
    "deferred_unmaps_cancelled",
    "deferred_flushes",
    "host_errors",
    "faults",
]
EXITS = ["exits", "mmio_exits", "io_exits", "halt_exits", "irq_exits"]
# Where L1's CPU went (bench-viommu.sh's cpu(), clock ticks of 10 ms).
CPU = ["vmm_guest_ticks", "vmm_user_ticks", "vmm_sys_ticks", "l1_idle_ticks"]
TICK_MS = 10


def fields(text):
    return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)


def parse_log(path):
    """Per config: marker times, end-marker fields, snapshots (begin/end) per workload."""
    cur = None
    cells = defaultdict(lambda: defaultdict(dict))
    exits = {}
    # Per config: nanoseconds per access by where the exit is handled (exit-cost.sh).
    exit_cost = defaultdict(dict)
    with open(path, errors="replace") as f:
        for raw in f:
            ts, _, text = raw.rstrip("\r\n").partition(" ")
            text = text.replace("\r", "")
            try:
                t = float(ts)
            except ValueError:
                continue
            m = re.search(r"@@TB BENCH cfg=(\S+) start", text)
            if m:
                cur = m.group(1)
                continue
            m = re.search(r"@@TB BENCH cfg=(\S+) exit=(\d+)", text)
            if m:
                exits[m.group(1)] = int(m.group(2))
                continue
            m = re.search(r"@@TB L2 exitcost (.*)", text)
            if m and cur:
                f_ = fields(m.group(1))
                if f_.get("ns", "").isdigit():
                    exit_cost[cur.split("#")[0]].setdefault(f_["what"], []).append(int(f_["ns"]))
                continue
            m = re.search(r"@@TB L2 bench (begin|end) (.*)", text)
            if m and cur:
                f_ = fields(m.group(2))
                c = cells[cur][f_["w"]]
                c[m.group(1) + "_t"] = t
                if m.group(1) == "end":
                    c["end"] = f_
                continue
            m = re.search(r"@@TB BENCH snap (.*?) stats=(.*)$", text)
            if m:
                f_ = fields(m.group(1))
                stats = json.loads(m.group(2)) if m.group(2).startswith("{") else {}
                f_["stats"] = stats
                cells[f_["cfg"]][f_["w"]]["snap_" + f_["ev"]] = f_
    return cells, exits, exit_cost


def median(xs):
    xs = sorted(xs)
    return xs[(len(xs) - 1) // 2]


def exit_cost_table(exit_cost):
    """What one 4-byte access costs the L2 under each VMM, by where it is handled (median over
    the rounds)."""
    whats = ["ioapic-write", "vtd-read", "vtd-write"]
    lines = [
        "exit cost, us per access: ioapic-write = exit handled in L1's kernel; vtd-read, vtd-write"
        " = VT-d register (our read-only page, or an exit to the VMM; no VT-d: unassigned MMIO)",
        f"{'config':<26} " + " ".join(f"{w:>12}" for w in whats),
    ]
    for cfg in CONFIGS:
        got = exit_cost.get(cfg)
        if got:
            cols = " ".join(
                f"{median(got[w]) / 1000:>12.2f}" if w in got else f"{'-':>12}" for w in whats
            )
            lines.append(f"{cfg:<14} {cols}")
    return "\n".join(lines)


def parse_trace(path):
    """(time, event name) of every VT-d invalidation descriptor L0 QEMU traced."""
    out = []
    pat = re.compile(r"^\d+@(\d+\.\d+):(vtd_inv_desc\w*)")
    with open(path, errors="replace") as f:
        for line in f:
            m = pat.match(line)
            if m:
                out.append((float(m.group(1)), m.group(2)))
    return out


def classify(ev):
    if ev.startswith("vtd_inv_desc_iotlb"):
        return "iotlb"
    if ev.startswith("vtd_inv_desc_wait"):
        return "wait"
    if ev.startswith("vtd_inv_desc_cc"):
        return "context"
    return "other"


def count_window(trace, t0, t1):
    n = defaultdict(int)
    for t, ev in trace:
        if t0 <= t <= t1:
            n[classify(ev)] += 1
    return dict(n)


def diff(snaps, key, sub=None):
    b, e = snaps.get("snap_begin"), snaps.get("snap_end")
    if not b or not e:
        return None
    vb = (b["stats"] if sub else b).get(key)
    ve = (e["stats"] if sub else e).get(key)
    if vb is None or ve is None:
        return None
    return int(ve) - int(vb)


def cell_row(cfg, w, c, cells, trace):
    """One round of one configuration on one workload."""
    row = {"config": cfg, "workload": w}
    if not c or "end" not in c or "begin_t" not in c:
        row["missing"] = True
        return row
    end = c["end"]
    secs, nbytes = float(end["secs"]), int(end["bytes"])
    ios = nbytes // (131072 if w == "dd-128k" else 4096)
    row.update(
        rc=int(end["rc"]),
        secs=secs,
        bytes=nbytes,
        ios=ios,
        mb_s=round(nbytes / secs / 1e6, 2) if secs > 0 else None,
        iops=round(ios / secs) if secs > 0 else None,
    )
    if "iops" in end:
        row["fio_iops"] = float(end["iops"])
    inv = count_window(trace, c["begin_t"], c["end_t"])
    row["host_iotlb_inv"] = inv.get("iotlb", 0)
    row["host_inv_desc"] = inv
    row["vm_exits"] = {k: diff(c, k) for k in EXITS}
    row["l1_cpu_ticks"] = {k: diff(c, k) for k in CPU}
    if cfg == "ours":
        # No vIOMMU: all guest RAM is mapped once at start, nothing per I/O.
        row["vfio_map"] = row["vfio_unmap"] = 0
        row["vfio_source"] = "no vIOMMU: guest RAM mapped once at start"
    elif cfg.startswith("ours"):
        eng = {k: diff(c, k, sub=True) for k in ENGINE}
        row["engine"] = eng
        row["vfio_map"] = eng["host_map_calls"] or 0
        row["vfio_unmap"] = eng["host_unmap_calls"] or 0
        row["vfio_source"] = "--stats-json"
    else:
        s = cells.get(cfg + "+strace", {}).get(w)
        if s:
            row["vfio_map"] = diff(s, "vfio_map")
            row["vfio_unmap"] = diff(s, "vfio_unmap")
            row["vfio_source"] = "strace (untimed pass)"
    return row


def rounds_of(cells, cfg):
    """The timed boots of `cfg`: CFG#1, CFG#2, ... (or plain CFG from a one-round log)."""
    names = [n for n in cells if n == cfg or n.startswith(cfg + "#")]
    return sorted(names, key=lambda n: int(n.split("#")[1]) if "#" in n else 0)


def build(cells, trace):
    """A row per configuration and workload: the round with the median time, plus every
    round's time."""
    rows = []
    for cfg in CONFIGS:
        for w in WORKLOADS:
            rounds = [cell_row(cfg, w, cells[n].get(w), cells, trace) for n in rounds_of(cells, cfg)]
            done = sorted((r for r in rounds if not r.get("missing")), key=lambda r: r["secs"])
            if not done:
                rows.append({"config": cfg, "workload": w, "missing": True})
                continue
            row = dict(done[(len(done) - 1) // 2])
            row["secs_rounds"] = [r.get("secs") for r in rounds]
            row["rounds_missing"] = sum(1 for r in rounds if r.get("missing"))
            rows.append(row)
    return rows


def per_io(v, ios):
    return "-" if v is None or not ios else f"{v / ios:.2f}"


def vmm_us(r, key="register_write_ns"):
    """Microseconds per I/O our vmm spent handling the VT-d register writes (queue runs and
    host calls included), from its --stats-json; with `key`, the part of it spent waiting for
    the unit's lock or in host DMA calls; "-" where that does not apply."""
    ns = r.get("engine", {}).get(key)
    return "-" if ns is None or not r.get("ios") else f"{ns / r['ios'] / 1000:.1f}"


def table(rows):
    hdr = (
        f"{'workload':<11} {'config':<26} {'secs':>6} {'MB/s':>7} {'IOPS':>6} "
        f"{'VFIO map':>8} {'unmap':>6} {'host IOTLB inv':>14} {'inv/IO':>6} {'exits/IO':>8} "
        f"{'vmm us/IO':>9} {'host':>6} {'wait':>6}  secs per round"
    )
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        if r.get("missing"):
            lines.append(f"{r['workload']:<11} {r['config']:<26} (no result: see the console log)")
            continue

        def n(v):
            return "-" if v is None else str(v)

        iops = r.get("fio_iops", r["iops"])
        lines.append(
            f"{r['workload']:<11} {r['config']:<26} {r['secs']:>6.2f} {r['mb_s']:>7.2f} "
            f"{iops:>6.0f} {n(r.get('vfio_map')):>8} {n(r.get('vfio_unmap')):>6} "
            f"{r['host_iotlb_inv']:>14} {per_io(r['host_iotlb_inv'], r['ios']):>6} "
            f"{per_io(r['vm_exits'].get('exits'), r['ios']):>8} "
            f"{vmm_us(r):>9} {vmm_us(r, 'host_dma_ns'):>6} "
            f"{vmm_us(r, 'register_lock_wait_ns'):>6}  {' '.join(f'{x:.2f}' if x is not None else '-' for x in r['secs_rounds'])}"
        )
    return "\n".join(lines)


def cpu_table(rows):
    """Where L1's one CPU went per I/O, in microseconds: the L2's vCPUs running, the VMM's user
    space, L1's kernel on the VMM's behalf (exits, VFIO), idle."""
    hdr = f"{'workload':<11} {'config':<26} {'guest':>7} {'vmm user':>8} {'kernel':>7} {'idle':>7}  (L1 CPU us/IO)"
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        t = r.get("l1_cpu_ticks") or {}
        if r.get("missing") or t.get("vmm_guest_ticks") is None:
            continue
        us = [per_io(t.get(k) * TICK_MS * 1000 if t.get(k) is not None else None, r["ios"]) for k in CPU]
        lines.append(f"{r['workload']:<11} {r['config']:<26} {us[0]:>7} {us[1]:>8} {us[2]:>7} {us[3]:>7}")
    return "\n".join(lines)


def chart(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["config"], r["workload"]): r for r in rows}
    # Throughput as a share of QEMU without a vIOMMU (the ceiling), so the three workloads, whose
    # MB/s differ 40-fold, read on one axis; the bars are labelled with the MB/s themselves.
    for r in rows:
        ceiling = by.get(("qemu", r["workload"]), {}).get("mb_s")
        if ceiling and r.get("mb_s") is not None:
            r["pct_of_ceiling"] = round(100 * r["mb_s"] / ceiling, 1)
    metrics = [
        ("pct_of_ceiling", "throughput, % of QEMU without vIOMMU (bars labelled in MB/s; higher is better)", False),
        ("host_iotlb_inv", "host IOTLB invalidations (L0 trace; log scale, lower is better)", True),
        ("vfio_calls", "VFIO map + unmap calls (log scale, lower is better)", True),
    ]
    fig, axes = plt.subplots(len(metrics), 1, figsize=(12, 12))
    width = 0.8 / len(CONFIGS)
    for ax, (key, title, log) in zip(axes, metrics):
        for i, cfg in enumerate(CONFIGS):
            xs, ys = [], []
            for j, w in enumerate(WORKLOADS):
                r = by.get((cfg, w), {})
                if key == "vfio_calls":
                    v = None
                    if r.get("vfio_map") is not None and r.get("vfio_unmap") is not None:
                        v = r["vfio_map"] + r["vfio_unmap"]
                else:
                    v = r.get(key)
                if v is None:
                    continue
                xs.append(j + (i - (len(CONFIGS) - 1) / 2) * width)
                ys.append(max(v, 0.5) if log else v)
                label = f"{r['mb_s']:g}" if key == "pct_of_ceiling" else str(v)
                ax.annotate(
                    label,
                    (xs[-1], ys[-1]),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
            ax.bar(xs, ys, width, label=LABELS[cfg], color=COLORS[cfg], edgecolor="black", lw=0.4)
        ax.set_xticks(range(len(WORKLOADS)), [WLABELS[w] for w in WORKLOADS])
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(ncol=len(CONFIGS), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 1.22))
    fig.suptitle("L2 Linux on a passed-through NVMe (nested testbed, one L1 session)", y=0.995)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", required=True)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--png", required=True)
    a = ap.parse_args()
    cells, exits, exit_cost = parse_log(a.log)
    CONFIGS[:] = [c for c in CONFIGS if rounds_of(cells, c)]
    # bench-viommu.sh --workloads: only those that ran.
    WORKLOADS[:] = [w for w in WORKLOADS if any(w in c for c in cells.values())]
    trace = parse_trace(a.trace)
    rows = build(cells, trace)
    print(table(rows))
    print(cpu_table(rows))
    if exit_cost:
        print(exit_cost_table(exit_cost))
    bad = [r for r in rows if r.get("missing") or r.get("rc")]
    result = {
        "vmm_exit": exits,
        "cells": rows,
        "exit_cost_ns": exit_cost,
        "trace_descriptors": len(trace),
    }
    with open(a.json, "w") as f:
        json.dump(result, f, indent=1)
    chart([r for r in rows if not r.get("missing")], a.png)
    print(f"json: {a.json}\nchart: {a.png}\nvmm/QEMU exit codes: {exits}")
    if bad:
        print(f"bench-viommu: {len(bad)} cell(s) missing or failed", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
