"""What `matvlm bench` leaves behind: rich tables, `bench.json` and `bench.png`.

Comparisons only pair rows of the same engine, context and batch. The paper-style comparison
(hybrid on `graphs` against teacher on `hf`, as MaTVLM's 3.6x was measured) is reported separately
and labelled as such.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from ..atomic import write_atomic
from .profile import profile_table

GIB = 2**30
MODEL_WIDTH = 20  # a longer label (a student directory's name) folds onto a second line


def _key(row: dict) -> tuple:
    return row["engine"], row["seq_len"], row["batch"]


def comparisons(rows: list[dict]) -> list[dict]:
    """Each hybrid against the teacher on the same engine, context and batch: decode speedup, the
    speedup the bytes floor allows, and the peak memory saved against the KV bytes removed."""
    teachers = {_key(r): r for r in rows if r["model"] == "teacher" and not r["error"]}
    out = []
    for row in rows:
        teacher = teachers.get(_key(row))
        if row["model"] == "teacher" or teacher is None or row["error"]:
            continue
        speedup = teacher["decode_ms"] / row["decode_ms"]
        bound = teacher["floor_ms"] / row["floor_ms"]
        entry = {
            "model": row["model"], "engine": row["engine"], "seq_len": row["seq_len"], "batch": row["batch"],
            "speedup": speedup, "floor_speedup": bound, "fraction_of_floor_speedup": speedup / bound,
        }
        removed = teacher["kv_cache_bytes"] - row["kv_cache_bytes"]
        if teacher["peak_gib"] is not None and row["peak_gib"] is not None and removed > 0:
            saved = (teacher["peak_gib"] - row["peak_gib"]) * GIB
            entry.update(kv_removed_gib=removed / GIB, peak_saved_gib=saved / GIB, saved_fraction_of_kv=saved / removed)
        out.append(entry)
    return out


def paper_style(rows: list[dict]) -> list[dict]:
    """Hybrid with `graphs` against teacher with `hf` (the paper's unequal setting), for reference."""
    teachers = {(r["seq_len"], r["batch"]): r for r in rows if r["model"] == "teacher" and r["engine"] == "hf" and not r["error"]}
    return [
        {"model": r["model"], "seq_len": r["seq_len"], "batch": r["batch"],
         "speedup": teachers[(r["seq_len"], r["batch"])]["decode_ms"] / r["decode_ms"]}
        for r in rows
        if r["model"] != "teacher" and r["engine"] == "graphs" and not r["error"] and (r["seq_len"], r["batch"]) in teachers
    ]


def throughput_gains(throughput: list[dict]) -> list[dict]:
    """Each hybrid's tokens/s at its largest batch against the teacher's at the same context."""
    teachers = {t["seq_len"]: t for t in throughput if t["model"] == "teacher" and not t.get("error")}
    return [
        {"model": t["model"], "seq_len": t["seq_len"],
         "tokens_per_s_ratio": t["tokens_per_s"] / teachers[t["seq_len"]]["tokens_per_s"],
         "batch_ratio": t["max_batch"] / teachers[t["seq_len"]]["max_batch"]}
        for t in throughput if t["model"] != "teacher" and not t.get("error") and t["seq_len"] in teachers
    ]


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _table(title: str, columns: tuple[str, ...]) -> Table:
    """A table for an 80-column terminal: no vertical rules, one space between columns, headers of two
    lines, and a model column that folds a long directory name; every number stays whole. bench.json has
    every field, these tables the ones people compare."""
    table = Table(title=title, box=box.SIMPLE_HEAD, collapse_padding=True, title_justify="left")
    for column in columns:
        if column == "model":
            table.add_column(column, overflow="fold", max_width=MODEL_WIDTH)
        else:
            table.add_column(column, justify="left" if column == "engine" else "right", no_wrap=True)
    return table


def rows_table(report: dict) -> Table:
    """Each model's prefill, decode and peak memory, and its decode time against its bytes floor."""
    cpu = report["device_type"] != "cuda"
    table = _table(f"decode, {report['device']}" + (" (CPU numbers)" if cpu else ""),
                   ("model", "engine", "context", "batch", "prefill\nms", "ms/\ntoken", "x\nfloor", "peak\nGiB"))
    for r in report["rows"]:
        if not r["error"]:
            table.add_row(r["model"], r["engine"], str(r["seq_len"]), str(r["batch"]), _fmt(r["prefill_ms"], ".1f"),
                          _fmt(r["decode_ms"]), _fmt(r["x_floor"]), _fmt(r["peak_gib"]))
    return table


def comparison_table(report: dict) -> Table:
    """Each hybrid's decode speedup over the teacher on the same engine, what the bytes floor allows, and the
    peak memory it saves against the KV bytes it removes."""
    table = _table("hybrid vs teacher, same engine",
                   ("model", "engine", "context", "batch", "speedup", "floor\nallows", "of\nfloor", "peak\nsaved\nGiB",
                    "of KV\nremoved"))
    for c in report["comparisons"]:
        table.add_row(
            c["model"], c["engine"], str(c["seq_len"]), str(c["batch"]), f"{c['speedup']:.2f}x", f"{c['floor_speedup']:.2f}x",
            f"{c['fraction_of_floor_speedup']:.0%}", _fmt(c.get("peak_saved_gib")), _fmt(c.get("saved_fraction_of_kv"), ".0%"),
        )
    return table


def write_report(report: dict, output: str | Path, console: Console) -> Path:
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if "kernel_rows" in report:
        table = Table(title=f"mixer kernels, {report['device']}")
        for column in ("op", "backend", "ms", "rel. error vs fp32"):
            table.add_column(column)
        for k in report["kernel_rows"]:
            table.add_row(k["op"], k["backend"], f"{k['ms']:.3f}", _fmt(k["rel_error"], ".1e"))
        console.print(table)
        write_atomic(output / "kernels.json", json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {output / 'kernels.json'}")
        return output

    save_report(report, output)
    print_report(report, console)
    console.print(f"wrote {output / 'bench.json'} and {output / 'bench.png'}")
    return output


def save_report(report: dict, output: str | Path) -> None:
    """Derive the comparisons and (re)write bench.json, bench.png and the profile tables, each atomically.
    The bench calls it after every model, so a run cut short keeps the models it finished."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    report["comparisons"] = comparisons(report["rows"])
    report["paper_style"] = paper_style(report["rows"])
    report["throughput_gains"] = throughput_gains(report["throughput"])
    for entry in report.get("profiles", []):
        write_atomic(output / entry["file"], profile_table(entry))
    write_atomic(output / "bench.json", json.dumps(report, indent=2) + "\n")
    plot(report, output / "bench.png")


def print_report(report: dict, console: Console) -> None:
    console.print(rows_table(report))
    for r in report["rows"]:
        if r["error"]:
            console.print(f"{r['model']} ({r['engine']}) at {r['seq_len']} tokens, batch {r['batch']}: {r['error']}")
    if report["comparisons"]:
        console.print(comparison_table(report))
    for p in report["paper_style"]:
        console.print(f"paper-style (hybrid graphs vs teacher hf, unequal engines): {p['model']} at {p['seq_len']}: {p['speedup']:.1f}x")
    for t in report["throughput"]:
        if t.get("error"):
            console.print(f"throughput at {t['seq_len']}: {t['model']} {t['error']}")
        else:
            console.print(f"throughput at {t['seq_len']}: {t['model']} fits batch {t['max_batch']}, {t['tokens_per_s']:.0f} "
                          f"tokens/s, peak {t['peak_gib']:.1f} GiB (searched in {t['search_s']:.0f} s)")
    for g in report["throughput_gains"]:
        console.print(f"  {g['model']} at {g['seq_len']}: {g['tokens_per_s_ratio']:.2f}x the teacher's tokens/s "
                      f"({g['batch_ratio']:.2f}x its batch)")
    for p in report.get("profiles", []):
        console.print(f"decode step of {p['model']} at {p['seq_len']}: {p['kernels_per_step']:.0f} kernels, "
                      f"{p['kernel_ms_per_step']:.2f} ms of kernels ({p['file']})")


def plot(report: dict, path: Path) -> None:
    """Decode tokens/s (with each model's floor, dashed) and peak memory against context length, and the
    tokens/s at each model's largest batch when the throughput search ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if not r["error"]]
    batch = min((r["batch"] for r in rows), default=1)
    engine = report["recipe"]["engines"][0]
    searched = [t for t in report.get("throughput", []) if not t.get("error")]
    fig, axes = plt.subplots(1, 3 if searched else 2, figsize=(16 if searched else 11, 4.2))
    speed, memory = axes[:2]
    models = list(dict.fromkeys(r["model"] for r in rows))
    for index, model in enumerate(models):
        color = f"C{index}"
        mine = sorted((r for r in rows if r["model"] == model and r["batch"] == batch and r["engine"] == engine), key=lambda r: r["seq_len"])
        if not mine:
            continue
        lengths = [r["seq_len"] for r in mine]
        speed.plot(lengths, [r["tokens_per_s"] for r in mine], "o-", color=color, label=f"{model} ({engine})")
        speed.plot(lengths, [batch * 1000 / r["floor_ms"] for r in mine], "--", color=color, alpha=0.6, label=f"{model} floor")
        others = sorted((r for r in rows if r["model"] == model and r["batch"] == batch and r["engine"] != engine), key=lambda r: r["seq_len"])
        if others:
            speed.plot([r["seq_len"] for r in others], [r["tokens_per_s"] for r in others], "s:", color=color, alpha=0.7,
                       label=f"{model} ({others[0]['engine']})")
        if mine[0]["peak_gib"] is not None:
            memory.plot(lengths, [r["peak_gib"] for r in mine], "o-", color=color, label=model)
        else:
            memory.plot(lengths, [(r["kv_cache_bytes"] + r["state_bytes"]) / GIB for r in mine], "o-", color=color, label=f"{model} (cache)")
    if searched:
        largest = axes[2]
        for index, model in enumerate(dict.fromkeys([*models, *(t["model"] for t in searched)])):
            mine = sorted((t for t in searched if t["model"] == model), key=lambda t: t["seq_len"])
            if mine:
                largest.plot([t["seq_len"] for t in mine], [t["tokens_per_s"] for t in mine], "o-", color=f"C{index}", label=model)
                for t in mine:
                    largest.annotate(f"batch {t['max_batch']}", (t["seq_len"], t["tokens_per_s"]), fontsize=6,
                                     textcoords="offset points", xytext=(4, 4))
        largest.set_ylabel("decode tokens/s at the largest batch that fits")
        largest.legend(fontsize=7)
    for axis in axes:
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context (tokens)")
        axis.grid(alpha=0.3)
    speed.set_ylabel(f"decode tokens/s (batch {batch})")
    speed.set_yscale("log")
    speed.legend(fontsize=7)
    memory.set_ylabel("peak GPU memory (GiB)" if rows and rows[0]["peak_gib"] is not None else "cache (GiB)")
    memory.legend(fontsize=7)
    fig.suptitle(f"matvlm bench · {report.get('teacher', '')} · {report['device']} · {report['date'][:10]}", fontsize=9)
    fig.tight_layout()
    temp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(temp, dpi=120)
    plt.close(fig)
    temp.replace(path)
