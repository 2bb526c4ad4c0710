"""Does unison hold up at 100,000 trials? Driver memory, journal size, resume, ``r.trials``, ``unison show``.

For each size N (``--sizes``, default 1,000, 10,000 and 100,000): a random search of N no-op trials
(``def train(x): return x``, metric ``"x"``) on ``unison.Local(workers=2)`` with ``progress=False``, in a
fresh subprocess, so the driver's memory is that run's alone. Measured there: the driver's peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``), its VmRSS from ``/proc/self/status`` when ``unison.run``
returned, its VmRSS sampled every 0.5 s by a thread (with the trials finished so far, counted in the
journal), whose slope over the second half of the run is the memory added per 1,000 finished trials;
the wall time and trials/s. Then the experiment directory: the journal's bytes, the directory's bytes
and file count. Then, each in a fresh subprocess of its own: ``unison.resume(path, train)`` of the
finished experiment (and ``import pandas`` and the first and second ``r.trials`` after it),
``unison.load(path)`` (with the VmRSS it adds: what one trial's row costs in memory), and the
``unison show PATH`` command line.

Targets (issue 19, target 3, at 100k trials): driver peak RSS <= 300 MB, journal <= 50 MB, resume
<= 5 s, ``r.trials`` <= 2 s, ``unison show`` <= 3 s; and no step grows faster than linearly (the cost
per trial at a size is at most 1.05 times the cost per trial at the size before it).

    python benchmarks/scale.py                    # 1k, 10k, 100k (several minutes on 2 cores)
    python benchmarks/scale.py --sizes 1000 20000
    python benchmarks/scale.py --quick            # 1k and 5k (under a minute); scale-quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _bytecode import use_cached_bytecode

HERE = Path(__file__).resolve().parent
SAMPLE_S = 0.5
RUN_TIMEOUT_S = 15 * 60
TARGETS = {"peak_rss_mb_max": 300.0, "journal_mb_max": 50.0, "resume_s_max": 5.0, "trials_s_max": 2.0,
           "show_s_max": 3.0}
# what the linearity check compares, per trial, from one size to the next
GROWTH_KEYS = ("peak_rss_mb", "journal_mb", "dir_mb", "run_s", "resume_s", "trials_first_s", "load_s",
               "show_s")
END_EVENT = b'"e": "end"'
# a figure exactly proportional to N (the journal) measures 1.00-1.01 per trial from rounding and noise
LINEAR_SLACK = 1.05


def train(x: float) -> float:
    return x


# ------------------------------------------------------------------------------- in the driver
def vm_status(field: str) -> float:
    """``field`` (VmRSS, VmHWM) of this process from /proc/self/status, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Sampler(threading.Thread):
    """Every SAMPLE_S: (seconds since start, VmRSS MB, trials ended so far in the journal)."""

    def __init__(self, storage: Path) -> None:
        super().__init__(daemon=True)
        self.storage, self.stop = storage, threading.Event()
        self.samples: list[tuple[float, float, int]] = []
        self.journal: Path | None = None
        self.t0, self.offset, self.ended, self.tail = time.perf_counter(), 0, 0, b""

    def count_ended(self) -> int:
        if self.journal is None:
            found = sorted(self.storage.glob("*/journal.jsonl"))
            if not found:
                return 0
            self.journal = found[0]
        with open(self.journal, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        self.offset += len(chunk)
        lines = (self.tail + chunk).split(b"\n")
        self.tail = lines.pop()
        self.ended += sum(1 for line in lines if END_EVENT in line)
        return self.ended

    def run(self) -> None:
        while not self.stop.wait(SAMPLE_S):
            self.samples.append((time.perf_counter() - self.t0, vm_status("VmRSS"), self.count_ended()))


def growth_per_1000(samples: list[tuple[float, float, int]]) -> float | None:
    """Least-squares slope of VmRSS (MB) against trials ended, over the second half of the run, per 1,000."""
    if not samples:
        return None
    half = samples[-1][0] / 2
    pts = [(n, rss) for t, rss, n in samples if t >= half and n > 0]
    if len(pts) < 3 or pts[-1][0] == pts[0][0]:
        return None
    mx = sum(n for n, _ in pts) / len(pts)
    my = sum(r for _, r in pts) / len(pts)
    sxx = sum((n - mx) ** 2 for n, _ in pts)
    sxy = sum((n - mx) * (r - my) for n, r in pts)
    return sxy / sxx * 1000 if sxx else None


def child_run(size: int, storage: Path) -> dict[str, Any]:
    """The measured search, in this (fresh) process."""
    t_import = time.perf_counter()
    import unison

    import_s = time.perf_counter() - t_import
    sampler = Sampler(storage)
    sampler.start()
    search = unison.Search({"x": unison.uniform(0, 1)}, metric="x", trials=size, seed=0, optimizer="random")
    t0 = time.perf_counter()
    result = unison.run(train, search, backend=unison.Local(workers=2), progress=False, storage=storage)
    wall = time.perf_counter() - t0
    end_rss = vm_status("VmRSS")
    sampler.stop.set()
    sampler.join()
    done = sum(1 for r in result.rows if r["status"] == "completed")
    if done != size:
        raise RuntimeError(f"{done}/{size} trials completed; see {result.path}")
    return {"path": str(result.path), "import_unison_s": import_s, "run_s": wall, "per_s": size / wall,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "vmhwm_mb": vm_status("VmHWM"), "end_rss_mb": end_rss,
            "sampled_max_rss_mb": max((s[1] for s in sampler.samples), default=None),
            "growth_mb_per_1000": growth_per_1000(sampler.samples), "samples": sampler.samples}


def child_resume(path: Path) -> dict[str, Any]:
    """``unison.resume`` of the finished experiment, then ``import pandas`` and ``r.trials``."""
    t0 = time.perf_counter()
    import unison

    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = unison.resume(path, train, backend=unison.Local(workers=2), progress=False)
    resume_s = time.perf_counter() - t0
    pandas_before = "pandas" in sys.modules
    t0 = time.perf_counter()
    import pandas  # noqa: F401

    pandas_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    frame = result.trials
    trials_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = result.trials
    second_s = time.perf_counter() - t0
    assert len(frame) == len(again)
    return {"import_unison_s": import_s, "resume_s": resume_s, "pandas_imported_by_resume": pandas_before,
            "import_pandas_s": pandas_s, "trials_after_import_s": trials_s,
            "trials_first_s": pandas_s + trials_s, "trials_second_s": second_s, "rows": len(frame),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child_load(path: Path) -> dict[str, Any]:
    """``unison.load`` and the memory its rows take (VmRSS after - before, per trial)."""
    import unison

    before = vm_status("VmRSS")
    t0 = time.perf_counter()
    result = unison.load(path)
    load_s = time.perf_counter() - t0
    after = vm_status("VmRSS")
    rows = len(result.rows)
    return {"load_s": load_s, "rows": rows, "rss_added_mb": after - before,
            "kb_per_row": (after - before) * 1024 / rows if rows else None}


# ------------------------------------------------------------------------------ in the parent
def in_subprocess(kind: str, *args: str) -> dict[str, Any]:
    """Run ``child_<kind>`` in a fresh interpreter; its figures come back as JSON in a file."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    try:
        subprocess.run([sys.executable, __file__, "--child", kind, *args, "--child-out", str(out)],
                       check=True, timeout=RUN_TIMEOUT_S)
        figures: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
        return figures
    finally:
        out.unlink(missing_ok=True)


def directory_size(path: Path) -> tuple[int, int]:
    """(bytes, files) of everything under ``path``."""
    total = files = 0
    for root, _, names in os.walk(path):
        for name in names:
            total += os.path.getsize(os.path.join(root, name))
            files += 1
    return total, files


def time_show(path: Path) -> float:
    """Wall time of ``unison show PATH`` (the installed command line, next to this interpreter)."""
    exe = Path(sys.executable).with_name("unison")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "unison.cli"]
    t0 = time.perf_counter()
    subprocess.run([*command, "show", str(path)], check=True, stdout=subprocess.DEVNULL, timeout=300)
    return time.perf_counter() - t0


def measure(size: int, storage: Path) -> dict[str, Any]:
    """Every figure for one size; the experiment directory is removed afterwards."""
    load_before = os.getloadavg()
    run = in_subprocess("run", str(size), str(storage))
    path = Path(run["path"])
    journal = (path / "journal.jsonl").stat().st_size
    dir_bytes, files = directory_size(path)
    resumed = in_subprocess("resume", str(path))
    loaded = in_subprocess("load", str(path))
    show_s = time_show(path)
    shutil.rmtree(path, ignore_errors=True)
    return {"size": size, "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "run": run, "journal_bytes": journal, "dir_bytes": dir_bytes, "dir_files": files,
            "resume": resumed, "load": loaded, "show_s": show_s,
            "flat": {"peak_rss_mb": run["peak_rss_mb"], "journal_mb": journal / 2**20,
                     "dir_mb": dir_bytes / 2**20, "run_s": run["run_s"], "resume_s": resumed["resume_s"],
                     "trials_first_s": resumed["trials_first_s"], "load_s": loaded["load_s"],
                     "show_s": show_s}}


def growth_checks(sizes: list[dict[str, Any]]) -> dict[str, Any]:
    """Per figure and step: (cost per trial at the larger size) / (at the smaller); linear is 1."""
    checks: dict[str, Any] = {}
    for key in GROWTH_KEYS:
        steps = []
        for a, b in zip(sizes, sizes[1:], strict=False):
            per_a, per_b = a["flat"][key] / a["size"], b["flat"][key] / b["size"]
            steps.append({"from": a["size"], "to": b["size"], "per_trial_ratio": per_b / per_a})
        checks[key] = {"steps": steps,
                       "linear_or_better": all(s["per_trial_ratio"] <= LINEAR_SLACK for s in steps)}
    return checks


def target_checks(largest: dict[str, Any]) -> dict[str, bool]:
    f = largest["flat"]
    return {"peak_rss": f["peak_rss_mb"] <= TARGETS["peak_rss_mb_max"],
            "journal": f["journal_mb"] <= TARGETS["journal_mb_max"],
            "resume": f["resume_s"] <= TARGETS["resume_s_max"],
            "trials": f["trials_first_s"] <= TARGETS["trials_s_max"],
            "show": f["show_s"] <= TARGETS["show_s_max"]}


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import unison

    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "platform": platform.platform(), "unison": unison.__version__}


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def print_report(res: dict[str, Any]) -> None:
    m = res["machine"]
    print(f"\nunison at scale: {res['date']}, {m['cpus']} CPUs ({m['cpu']}), Python {m['python']}; "
          f"random search of no-op trials on Local(workers=2), each step in a fresh process\n")
    head = ("trials", "run s", "trials/s", "peak RSS", "end RSS", "MB/1k", "journal", "dir MB", "files",
            "resume s", "pandas s", "trials s", "load s", "KB/row", "show s", "load avg")
    print(("{:>9}" * len(head)).format(*head))
    for s in res["sizes"]:
        r, rs, ld = s["run"], s["resume"], s["load"]
        growth = r["growth_mb_per_1000"]
        cells = (f"{s['size']:,}", f"{r['run_s']:.1f}", f"{r['per_s']:.0f}", f"{r['peak_rss_mb']:.0f}",
                 f"{r['end_rss_mb']:.0f}", "-" if growth is None else f"{growth:.2f}",
                 f"{s['flat']['journal_mb']:.1f}", f"{s['flat']['dir_mb']:.1f}", f"{s['dir_files']}",
                 f"{rs['resume_s']:.2f}", f"{rs['import_pandas_s']:.2f}", f"{rs['trials_first_s']:.2f}",
                 f"{ld['load_s']:.2f}", f"{ld['kb_per_row'] or 0:.1f}", f"{s['show_s']:.2f}",
                 f"{s['load_average_before'][0]:.1f}")
        print(("{:>9}" * len(cells)).format(*cells))
    largest = res["sizes"][-1]
    print(f"\ntargets at {largest['size']:,} trials (issue 19 sets them at 100,000):")
    f = largest["flat"]
    for key, label, value, limit in (
            ("peak_rss", "driver peak RSS (ru_maxrss)", f"{f['peak_rss_mb']:.0f} MB", "<= 300 MB"),
            ("journal", "journal.jsonl", f"{f['journal_mb']:.1f} MB", "<= 50 MB"),
            ("resume", "unison.resume of the finished search", f"{f['resume_s']:.2f} s", "<= 5 s"),
            ("trials", "r.trials, first call incl. import pandas", f"{f['trials_first_s']:.2f} s", "<= 2 s"),
            ("show", "unison show PATH", f"{f['show_s']:.2f} s", "<= 3 s")):
        print(f"    {label:<44}{value:>10}  {limit:<10} {verdict(res['met'][key])}")
    for key, check in res["growth"].items():
        steps = ", ".join(f"{s['from']:,}->{s['to']:,}: {s['per_trial_ratio']:.2f}" for s in check["steps"])
        print(f"    growth per trial of {key:<24}{steps}  {verdict(check['linear_or_better'])}")


def child_main(args: argparse.Namespace) -> int:
    kind, rest = args.child, args.child_args
    figures = (child_run(int(rest[0]), Path(rest[1])) if kind == "run" else
               child_resume(Path(rest[0])) if kind == "resume" else child_load(Path(rest[0])))
    Path(args.child_out).write_text(json.dumps(figures), encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    use_cached_bytecode()  # as an installed unison runs (see _bytecode.py)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="trial counts to measure (default 1000 10000 100000)")
    parser.add_argument("--quick", action="store_true",
                        help="1,000 and 5,000 trials; writes scale-quick.json")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default benchmarks/results/scale.json; scale-quick.json "
                             "with --quick)")
    parser.add_argument("--storage", type=Path, default=None,
                        help="where experiment directories go (default: a temporary folder)")
    parser.add_argument("--child", choices=["run", "resume", "load"], help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("child_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)
    sizes = args.sizes or ([1000, 5000] if args.quick else [1000, 10_000, 100_000])
    out = args.out or HERE / "results" / ("scale-quick.json" if args.quick else "scale.json")
    tmp = Path(tempfile.mkdtemp(prefix="unison-scale-", dir=args.storage))
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(),
                           "targets": TARGETS, "sizes": []}
    try:
        for size in sorted(sizes):
            print(f"{size:,} trials ...", file=sys.stderr, flush=True)
            res["sizes"].append(measure(size, tmp / str(size)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["met"] = target_checks(res["sizes"][-1])
    res["growth"] = growth_checks(res["sizes"])
    print_report(res)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    print(f"figures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
