"""Side-by-side summary: every benchmark group's time and saved bytes relative to 'reference'.

OMP_WAIT_POLICY=PASSIVE: torch.compile's generated CPU kernels bring their own OpenMP thread
team; with the default spin-waiting, the two teams starve each other on a 2-core machine and
every provider after the first compile runs ~10x slower (measured; see NOTES.md).
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from collections import defaultdict  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Compiled-reference rows run last. After the first torch.compile, its kernels' OpenMP team
    stays resident and slows later eager ops on 2 cores even with passive waiting (measured:
    the OGEN synthesis torch path at U = C = 1000 took 0.44 s after the compiled rows, 0.23 s
    in a fresh process), so every other row is timed before any compile happens."""
    def compiled(item):
        callspec = getattr(item, "callspec", None)
        return "compiled" in item.name or (callspec is not None
                                           and callspec.params.get("provider") == "compiled")
    items.sort(key=compiled)  # stable: the rest keep their order


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups = defaultdict(dict)
    for bench in session.benchmarks:
        info = bench.extra_info
        if "provider" in info:
            groups[bench.group or bench.name][info["provider"]] = (bench.stats.median, info)
    write = terminalreporter.write_line
    write("")
    write("vlood_fast: median time and bytes saved for backward (beyond inputs), vs reference")
    write(f"{'group':<44} {'provider':<10} {'median s':>10} {'speedup':>8} {'saved MB':>10} "
          f"{'saved ratio':>11} {'peak MB':>9}")
    for group, rows in sorted(groups.items(), key=lambda kv: str(kv[0])):
        ref_time, ref_info = rows.get("reference", (None, {}))
        ref_saved = ref_info.get("saved_bytes")
        for provider, (median, info) in sorted(rows.items()):
            saved = info.get("saved_bytes")
            speed = f"{ref_time / median:.2f}x" if ref_time else "-"
            saved_mb = f"{saved / 2**20:.2f}" if saved is not None else "-"
            ratio = (f"1/{ref_saved / saved:.0f}" if saved else "0") if ref_saved else "-"
            peak = info.get("peak_bytes")
            peak_mb = f"{peak / 2**20:.1f}" if peak is not None else "-"
            write(f"{group:<44} {provider:<10} {median:>10.4f} {speed:>8} {saved_mb:>10} {ratio:>11} {peak_mb:>9}")
