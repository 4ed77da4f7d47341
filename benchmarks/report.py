"""Turn pytest-benchmark JSON into the README's tables and plots.

    .venv/bin/python -m pytest benchmarks/ --benchmark-json=bench.json
    .venv/bin/python benchmarks/report.py bench.json --out benchmarks/results

Writes ``<out>/report.md`` (one table per op: median time, speedup vs the reference, bytes
saved for backward, peak memory) and ``<out>/<op>.png`` (time and memory against the number of
classes, log-log, forward+backward). Rows where the reference is faster are kept and marked.
"""
import argparse
import json
import pathlib
from collections import defaultdict

PROVIDER_ORDER = ["reference", "compiled", "torch", "triton", "gemm_floor"]
MODE_ORDER = ["forward", "backward", "forward+backward", "step"]


def _fmt_time(seconds):
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def _fmt_bytes(n):
    if n is None:
        return "-"
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def load(path):
    """Rows: one dict per benchmark with op, shape, mode, provider, median and memory fields."""
    data = json.loads(pathlib.Path(path).read_text())
    rows = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "provider" not in info:
            continue
        rows.append(dict(op=info.get("op", bench["group"]), shape=tuple(info.get("shape", ())),
                         mode=info.get("mode", "forward+backward"), provider=info["provider"],
                         median=bench["stats"]["median"], saved=info.get("saved_bytes"),
                         peak=info.get("peak_bytes"), env=info.get("env", {})))
    return rows, data.get("machine_info", {})


def _order(value, order):
    return order.index(value) if value in order else len(order)


def markdown(rows) -> str:
    groups = defaultdict(dict)
    for r in rows:
        groups[(r["op"], r["shape"], r["mode"])][r["provider"]] = r
    lines = []
    for op in sorted({k[0] for k in groups}):
        lines += [f"### {op}", "",
                  "| shape | mode | provider | median | vs reference | saved for backward | peak memory |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        keys = sorted((k for k in groups if k[0] == op),
                      key=lambda k: (k[1], _order(k[2], MODE_ORDER)))
        for key in keys:
            providers = groups[key]
            ref = providers.get("reference")
            for name in sorted(providers, key=lambda p: _order(p, PROVIDER_ORDER)):
                r = providers[name]
                if ref and name != "reference":
                    ratio = ref["median"] / r["median"]
                    versus = f"{ratio:.2f}x" + (" (reference faster)" if ratio < 1 else "")
                else:
                    versus = "1.00x" if name == "reference" else "-"
                shape = " x ".join(map(str, key[1]))
                lines.append(f"| {shape} | {key[2]} | {name} | {_fmt_time(r['median'])} | {versus} "
                             f"| {_fmt_bytes(r['saved'])} | {_fmt_bytes(r['peak'])} |")
        lines.append("")
    return "\n".join(lines)


def plots(rows, out_dir: pathlib.Path):
    """One PNG per op with several class counts: time and memory vs classes, log-log."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    by_op = defaultdict(list)
    for r in rows:
        if r["mode"] in ("forward+backward", "step") and len(r["shape"]) >= 2:
            by_op[r["op"]].append(r)
    for op, op_rows in sorted(by_op.items()):
        if len({r["shape"] for r in op_rows}) < 2:
            continue
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
        for provider in sorted({r["provider"] for r in op_rows}, key=lambda p: _order(p, PROVIDER_ORDER)):
            pts = sorted((r["shape"][1], r["median"], r["saved"] if r["peak"] is None else r["peak"])
                         for r in op_rows if r["provider"] == provider)
            ax_t.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=provider)
            mem = [(p[0], p[2]) for p in pts if p[2]]
            if mem:
                ax_m.plot([m[0] for m in mem], [m[1] / 2**20 for m in mem], "o-", label=provider)
        ax_t.set(xscale="log", yscale="log", xlabel="classes (K)", ylabel="median time (s)",
                 title=f"{op}: forward + backward")
        ax_m.set(xscale="log", yscale="log", xlabel="classes (K)",
                 ylabel="MB (peak if measured, else saved for backward)", title=f"{op}: memory")
        for ax in (ax_t, ax_m):
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.tight_layout()
        slug = "".join(c if c.isalnum() else "_" for c in op).strip("_")
        path = out_dir / f"{slug}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="pytest-benchmark --benchmark-json output")
    parser.add_argument("--out", default="benchmarks/results", help="output folder")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    rows, machine = load(args.json)
    if not rows:
        raise SystemExit(f"{args.json}: no vlood_fast benchmark rows (extra_info.provider missing)")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = rows[0]["env"]
    where = env.get("gpu") or f"{env.get('cpu', machine.get('cpu', {}).get('brand_raw', 'CPU'))}, " \
                              f"{env.get('threads', '?')} threads"
    header = (f"Measured on {where}; torch {env.get('torch', '?')}. Medians; ratios are the "
              f"reference's median over the provider's, from the same run.\n\n")
    (out / "report.md").write_text(header + markdown(rows))
    print(f"wrote {out / 'report.md'}")
    if not args.no_plots:
        for path in plots(rows, out):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
