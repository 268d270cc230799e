"""The end-to-end benchmark's report: markdown tables and matplotlib plots from the results dict."""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

MESH_ROWS = ("registration", "enrollment", "stats", "notifier", "kinesalite", "postgresql")
CPU_ROWS = (*MESH_ROWS, "postgresql other databases", "mesh", "mesh without other databases", "smtp sink",
            "load client", "sync register", "baseline")
TITLES = {"postgresql": "PostgreSQL", "sqlite": "SQLite"}
MESH_TARGET_MS = 4.0


def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _pair(spread: dict[str, Any] | None, digits: int) -> str:
    if not spread or spread.get("p50") is None:
        return "–"
    return f"{_num(float(spread['p50']), digits)} / {_num(float(spread['p99']), digits)}"


def _refusals(refusals: dict[str, int]) -> str:
    return ", ".join(f"{code} {count:,}" for code, count in sorted(refusals.items())) or "0"


def _load(phase: dict[str, Any]) -> str:
    if phase.get("fraction_of_ceiling") is None:
        return f"closed loop, {phase.get('concurrency') or 32} in flight"
    return f"{phase['offered_rate']:,.0f}/s ({phase['fraction_of_ceiling']:.0%} of ceiling)"


def _planned(config: dict[str, Any]) -> str:
    if config.get("phases"):
        return f"{', '.join(f'{f:.0%}' for f in config['phases'])} of the empty-call ceiling"
    return f"{', '.join(f'{r:,g}/s' for r in config['rates'])}"


def _drain(phase: dict[str, Any]) -> str:
    backlog = phase["backlog"]
    if backlog["drained"]:
        text = f"yes, {_num(phase['drained_after_burst_s'], 1)} s"
        if backlog.get("drain_note"):
            text += f" ({backlog['drain_note']})"
        return text
    return f"**no** (not within {_num(phase['drain_limit_s'])} s)"


def _last_email(phase: dict[str, Any]) -> str:
    if phase.get("last_email_after_burst_s") is None:
        return f"not within {_num(phase['drain_limit_s'])} s"
    return f"{_num(phase['last_email_after_burst_s'], 1)} s"


def database_section(kind: str, entry: dict[str, Any]) -> list[str]:
    lines = [f"## {TITLES.get(kind, kind)}", ""]
    if "error" in entry:
        lines += [f"**Failed:** `{entry['error'][:600]}`", ""]
    mesh, sync = entry.get("mesh"), entry.get("sync")
    if not mesh:
        return lines
    ceiling = mesh["ceiling"]["calls_per_second"]
    burst = mesh.get("closed_loop")
    sync_burst = (sync or {}).get("closed_loop")
    lines.append(f"Empty-call ceiling (Health/Check on registration, 64 in flight): **{ceiling:,.0f} calls/s**.")
    if burst:
        lines.append(f"Closed-loop Register, 32 in flight, {burst['seconds']:.0f} s: "
                     f"**{burst['calls_per_second']:,.0f} calls/s = {burst['ratio_to_ceiling']:.0%} of the ceiling** "
                     f"(target ≥ 60%), refusals {_refusals(burst['refusals'])}, p50 / p99 "
                     f"{_pair(burst['latency_ms'], 1)} ms."
                     + (f" The synchronous baseline, same client: {sync_burst['calls_per_second']:,.0f} calls/s, "
                        f"p50 / p99 {_pair(sync_burst['latency_ms'], 1)} ms." if sync_burst else ""))
    cat = mesh.get("catalogue", {})
    lines += ["", f"Catalogue: {cat.get('courses')} courses on {cat.get('campuses')} campuses, capacities "
              f"{', '.join(map(str, cat.get('capacities', [])))} (the small ones fill up).", ""]

    phases = mesh.get("phases", [])
    sync_phases = {p["label"]: p for p in (sync or {}).get("phases", [])}
    lines += ["### Register under open-loop load: the mesh and the synchronous baseline", "",
              "| load | offered/s | mesh accepted/s | mesh refusals | mesh p50 / p99 ms | "
              "sync accepted/s | sync refusals | sync p50 / p99 ms |",
              "|---|---:|---:|---|---:|---:|---|---:|"]
    for p in phases:
        s = sync_phases.get(p["label"])
        lines.append(
            f"| {_load(p)} | {_num(p['offered_rate'])} | {_num(p['accepted_rate'])} | {_refusals(p['refusals'])} | "
            f"{_pair(p['latency_ms'], 1)} | {_num(s['accepted_rate']) if s else '–'} | "
            f"{_refusals(s['refusals']) if s else '–'} | {_pair(s['latency_ms'], 1) if s else '–'} |")
    lines += ["", "### The mesh after Register: decisions, emails, backlog", "",
              "| load | accepted | decided | decision lag p50 / p99 s | email lag p50 / p99 s | "
              "undecided: carried in / max / end of burst | backlog growth /s during burst | drained | "
              "last email after burst | outcomes |",
              "|---|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for p in ([burst] if burst else []) + phases:
        b = p["backlog"]
        outcomes = ", ".join(f"{k} {v:,}" for k, v in sorted(p.get("outcomes", {}).items()))
        lines.append(
            f"| {_load(p)} | {_num(p['ok'])} | {_num(p['decided'])} | {_pair(p['decision_lag_s'], 2)} | "
            f"{_pair(p['email_lag_s'], 2)} | {_num(b['carried_over_at_start'])} / {_num(b['max'])} / "
            f"{_num(b['at_end_of_burst'])} | {_num(b['growth_per_second_during_burst'], 1)} | {_drain(p)} | "
            f"{_last_email(p)} | {outcomes} |")

    columns = ([("burst", burst)] if burst else []) + [(p["label"], p) for p in phases]
    columns += [(f"sync {p['label']}", p) for p in ([sync_burst] if sync_burst else []) + list(sync_phases.values())]
    header = "| process | " + " | ".join(_column_title(label, p) for label, p in columns) + " |"
    lines += ["", "### CPU milliseconds per accepted sign-up, by process", "",
              "From the phase start until the backlog drained (or the drain limit); the synchronous "
              "baseline until its last reply. \"mesh\" = registration + enrollment + stats + notifier + "
              "kinesalite + PostgreSQL (target ≤ 4 ms); \"postgresql\" is every PostgreSQL process on the "
              "machine, of which \"other databases\" is other people's backends (subtracted in \"mesh without "
              "other databases\"); not in the mesh: the SMTP sink and the load client.", "",
              header, "|---|" + "---:|" * len(columns)]
    for row in CPU_ROWS:
        values = [p["cpu_ms_per_signup"].get(row) for _, p in columns]
        if all(v is None for v in values):
            continue
        name = f"**{row}**" if row in ("mesh", "baseline") else row
        lines.append(f"| {name} | " + " | ".join(_num(v, 2) for v in values) + " |")
    lines += ["", "### Peak RSS, MB (sampled every second; registration: its largest worker process; PostgreSQL: "
              "private memory of all its processes plus the largest shared part)", "", header,
              "|---|" + "---:|" * len(columns)]
    names = sorted({n for _, p in columns for n in p.get("peak_rss_mb", {})},
                   key=lambda n: (CPU_ROWS.index(n) if n in CPU_ROWS else 99, n))
    for name in names:
        lines.append(f"| {name} | " + " | ".join(_num(p.get("peak_rss_mb", {}).get(name), 0) for _, p in columns)
                     + " |")
    odd = []
    for service, summary in sorted(mesh.get("logs", {}).items()):
        for message, count in summary.get("top_messages", {}).items():
            odd.append(f"- `{service}` × {count}: {message}")
    exits = {k: v for k, v in mesh.get("exit_codes_before_stop", {}).items() if v is not None}
    if exits:
        odd.append(f"- processes that had exited before the end: {exits}")
    if mesh.get("sampler_errors"):
        odd.append(f"- sampler errors: {mesh['sampler_errors'][:3]}")
    if odd:
        lines += ["", "Warnings and errors in the logs:", "", *odd[:30]]
    lines.append("")
    return lines


def _column_title(label: str, phase: dict[str, Any]) -> str:
    if phase.get("fraction_of_ceiling") is None:
        return f"{label} (closed)"
    return label if label.endswith("/s") else f"{label} ({phase['offered_rate']:,.0f}/s)"


def markdown(results: dict[str, Any]) -> str:
    machine, config = results["machine"], results["config"]
    lines = [
        f"# End-to-end benchmark, {results['date']}", "",
        f"`{results['command']}` — {machine['nproc']} cores ({machine['cpu_model']}), "
        f"{machine['memory_mb']:,} MB, Python {machine['python']}, commit {machine['git_commit']}, "
        f"load average at start {machine['load_average_at_start']}; started {results['started']}, "
        f"finished {results.get('finished', '?')}.", "",
        f"Every process on this one machine: kinesalite on disk, the four services, the SMTP sink (aiosmtpd "
        f"Sink), the load client (one asyncio process, {config['channels']} connections). Open-loop phases at "
        f"{_planned(config)}, {config['phase_seconds']:g} s "
        f"each, then up to {config['drain_seconds']:g} s to drain. Latency is from each call's due time; "
        f"decision and email lags from the client's OK reply.", "",
    ]
    for kind, entry in results["databases"].items():
        lines += database_section(kind, entry)
    return "\n".join(lines)


# ---------------------------------------------------------------- plots

def _seconds(values: list[Any]) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for i, v in enumerate(values):
        if v is not None:
            xs.append(i)
            ys.append(float(v))
    return xs, ys


def plots(results: dict[str, Any], directory: pathlib.Path, stem: str) -> list[pathlib.Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    written: list[pathlib.Path] = []
    for kind, entry in results["databases"].items():
        mesh, sync = entry.get("mesh"), entry.get("sync") or {}
        if not mesh or not mesh.get("phases"):
            continue
        title = TITLES.get(kind, kind)
        sync_phases = {p["label"]: p for p in sync.get("phases", [])}
        phases = mesh["phases"]

        # Latency and decision lag over time.
        fig, axes = plt.subplots(len(phases), 1, figsize=(12, 3.3 * len(phases)), squeeze=False)
        for ax, phase in zip(axes[:, 0], phases):
            series = phase["series"]
            lines = [("latency_p50_ms", 0.001, "mesh Register p50", "-", "#9ecae1"),
                     ("latency_p99_ms", 0.001, "mesh Register p99", "-", "#08519c"),
                     ("decision_lag_p50_s", 1, "decision lag p50", "--", "#fdae6b"),
                     ("decision_lag_p99_s", 1, "decision lag p99", "--", "#d94801")]
            for key, scale, label, style, color in lines:
                xs, ys = _seconds(series[key])
                ax.plot(xs, [y * scale for y in ys], style, color=color, label=label, lw=1.4)
            s = sync_phases.get(phase["label"])
            if s:
                for key, label, color in (("latency_p50_ms", "p50", "#a1d99b"), ("latency_p99_ms", "p99", "#006d2c")):
                    xs, ys = _seconds(s["series"][key])
                    ax.plot(xs, [y / 1000 for y in ys], ":", color=color, label=f"sync Register {label}", lw=1.8)
            ax.axvline(phase["seconds"], color="grey", lw=0.8)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_ylabel("seconds (log)")
            ax.set_title(f"{title}, {phase['offered_rate']:,.0f}/s offered = {phase['fraction_of_ceiling']:.0%} of "
                         "the ceiling (grey line: end of the arrivals)", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        axes[-1, 0].set_xlabel("seconds since the phase started (Register: by due time; decision lag: by accept time)")
        fig.tight_layout()
        path = directory / f"{stem}-{kind}-latency.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)

        # Throughput against arrivals, with the backlog.
        fig, axes = plt.subplots(len(phases), 1, figsize=(12, 3.3 * len(phases)), squeeze=False)
        for ax, phase in zip(axes[:, 0], phases):
            series = phase["series"]
            for key, label, color in (("offered", "offered/s", "black"), ("accepted", "mesh accepted/s", "#08519c"),
                                      ("refused", "mesh refused/s", "#cb181d"), ("decided", "decided/s", "#d94801"),
                                      ("emails_sent", "emails sent/s", "#6a51a3")):
                ax.plot(range(len(series[key])), series[key], label=label, lw=1.2, color=color)
            s = sync_phases.get(phase["label"])
            if s:
                ax.plot(range(len(s["series"]["accepted"])), s["series"]["accepted"], ":", label="sync accepted/s",
                        lw=1.8, color="#006d2c")
            ax.set_ylabel("per second")
            twin = ax.twinx()
            if series["backlog"]:
                twin.fill_between([t for t, _ in series["backlog"]], [b for _, b in series["backlog"]],
                                  color="#fd8d3c", alpha=0.25, label="undecided (right)")
                twin.plot([t for t, _ in series["emails_pending"]], [b for _, b in series["emails_pending"]],
                          color="#6a51a3", lw=1.0, ls="--", alpha=0.7, label="emails pending (right)")
            twin.set_ylabel("backlog")
            twin.set_ylim(bottom=0)
            ax.set_ylim(bottom=0)
            ax.axvline(phase["seconds"], color="grey", lw=0.8)
            ax.set_title(f"{title}, {phase['offered_rate']:,.0f}/s offered "
                         f"({'drained' if phase['backlog']['drained'] else 'NOT drained within the limit'})",
                         fontsize=10)
            ax.grid(True, alpha=0.3)
            lines1, labels1 = ax.get_legend_handles_labels()
            lines2, labels2 = twin.get_legend_handles_labels()
            ax.legend(lines1 + lines2, labels1 + labels2, fontsize=8, loc="upper left", bbox_to_anchor=(1.07, 1.0))
        axes[-1, 0].set_xlabel("seconds since the phase started")
        fig.tight_layout()
        path = directory / f"{stem}-{kind}-throughput.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)

        # CPU per sign-up, stacked by process.
        columns = ([("burst\n(closed)", mesh["closed_loop"])] if mesh.get("closed_loop") else [])
        columns += [(f"{p['label']}\n{p['offered_rate']:,.0f}/s", p) for p in phases]
        sync_columns = [(f"sync {p['label']}\n{p['offered_rate']:,.0f}/s", p) for p in sync.get("phases", [])]
        stack = [*MESH_ROWS, "smtp sink", "load client"]
        sync_stack = ["sync register", "postgresql", "load client"]
        fig, ax = plt.subplots(figsize=(12, 5))
        palette = plt.get_cmap("tab10")
        colors = {name: palette(i) for i, name in enumerate([*MESH_ROWS, "smtp sink", "load client", "sync register"])}
        labels = [c for c, _ in columns + sync_columns]
        bottoms = [0.0] * len(labels)
        seen: set[str] = set()
        for name in dict.fromkeys([*stack, *sync_stack]):
            heights = []
            for i, (_, p) in enumerate(columns + sync_columns):
                rows = stack if i < len(columns) else sync_stack
                value = p["cpu_ms_per_signup"].get(name) if name in rows else None
                if name == "postgresql" and value is not None:
                    value -= p["cpu_ms_per_signup"].get("postgresql other databases") or 0.0
                heights.append(value or 0.0)
            hatch = "//" if name in ("smtp sink", "load client") else None
            ax.bar(labels, heights, bottom=bottoms, color=colors.get(name), hatch=hatch,
                   label=name if name not in seen else None, edgecolor="white", lw=0.5)
            seen.add(name)
            bottoms = [b + h for b, h in zip(bottoms, heights)]
        ax.axhline(MESH_TARGET_MS, color="red", lw=1, ls="--", label=f"mesh target {MESH_TARGET_MS:g} ms")
        ax.set_ylabel("CPU ms per accepted sign-up")
        ax.set_title(f"{title}: CPU per sign-up by process (hatched: not the mesh's; PostgreSQL without "
                     f"other databases' backends)", fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        path = directory / f"{stem}-{kind}-cpu.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    """`python -m benchmarks.e2e_report bench/results/<date>-e2e.json`: the table and plots again."""
    if len(argv) != 1:
        print("usage: python -m benchmarks.e2e_report <results.json>")
        return 2
    path = pathlib.Path(argv[0])
    results = json.loads(path.read_text())
    stem = path.name.removesuffix(".json")
    path.with_name(f"{stem}.md").write_text(markdown(results))
    written = plots(results, path.parent, stem)
    print(f"wrote {path.with_name(stem + '.md')} and {len(written)} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
