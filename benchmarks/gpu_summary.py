"""Build a GPU session's ``summary.md`` and its archives from the work folder of ``benchmarks/gpu_session.sh all``.

The shell script orchestrates (stages, caps, exit statuses); this module only reads what the stages left behind, so
that what a session reports can be tested without a GPU. Command (the script runs it last)::

    python -m benchmarks.gpu_summary --work /tmp/gpu-session.XXXX --out "$OUT" [--dry-run] [--no-plots]

Work folder, as the script writes it:

    session.env      ``key=value`` lines: label, mode (full | dry-run), commit, commit_source, budget_s, started_utc
    stages.tsv       a header, then one tab-separated line per stage: stage, status (ok | failed | timeout |
                     not run), rc (exit status, empty if not run), seconds, cap_s, note
    nvidia-smi.txt   ``nvidia-smi --query-gpu=...`` of the machine, when it has one
    <stage>/         per stage: its log ``<stage>.log`` (the command's stdout and stderr), the CSVs it wrote
                     (``benchmarks.harness.SCHEMA``), the markdown files of the kernel-resource report, JUnit XML

Output folder (at most 7 files): ``summary.md`` (machine, commit, versions, date; each stage's status, time and cap;
every target's verdict: met / missed / not run, with the number; the stage-level figures; the last lines of the log
of every stage that failed or timed out) and one ``.tar.gz`` per archive of :data:`ARCHIVES` that has content: the
stage folders (CSVs, logs, ``report.md`` with the suite's own summary and tables, ``plots/*.png``), the session files
in ``extra``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import re
import sys
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks import harness, suite

STATUSES = ("ok", "failed", "timeout", "not run")
ARCHIVES = ("tests", "attention", "train", "contrastive", "dropin", "extra")
SESSION_FILES = ("session.env", "stages.tsv", "nvidia-smi.txt")  # archived in "extra"
LOG_TAIL = 25


@dataclass(frozen=True)
class Stage:
    """One stage of the session: ``name`` (its folder and its line in stages.tsv), what it measures, the archive
    its folder goes to, and the ``benchmarks`` suite whose rows it writes (None: no CSV rows)."""

    name: str
    title: str
    archive: str
    suite: str | None = None


STAGES = (
    Stage("install", "install the checkout (pip install --no-deps --no-build-isolation -e .)", "extra"),
    Stage("tests", "1. gpu-marked correctness tests (full shapes, bf16/fp16/fp32, determinism, patched Swin)", "tests"),
    Stage("attention", "2. attention on lfvila, fwd and fwd+bwd: window-attention-triton vs videoswin-eager, "
          "sdpa-dense-bias, flex",
          "attention", "bench_attention"),
    Stage("train", "3. LF-VILA stage-1 training step (lfvila-base, B=16, 32x192x320, bf16): triton vs torch", "train",
          "bench_train_step"),
    Stage("contrastive", "4. contrastive loss at N=32768, d=512 (ours, naive, Inf-CL), then the largest N",
          "contrastive", "bench_contrastive"),
    Stage("dropin", "5. drop-in: timm Swin-B 384 patched vs unpatched", "dropin", "bench_dropin"),
    Stage("decode", "decode (bench_decode; needs DALI)", "extra", "bench_decode"),
    Stage("longform", "6. long-form attention, T = 32 ... 256 (if time remains)", "extra", "bench_attention"),
    Stage("resources", "6. sm_90 kernel resources (if time remains)", "extra"),
)  # fmt: skip
BY_NAME = {s.name: s for s in STAGES}


# --------------------------------------------------------------------------------------------------- reading
def read_session(work: Path) -> dict[str, str]:
    """``session.env`` as a dict (missing file: empty)."""
    path = work / "session.env"
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip():
                out[key.strip()] = value.strip()
    return out


def read_stages(work: Path) -> dict[str, dict[str, str]]:
    """``stages.tsv`` as stage name -> record (``status``, ``rc``, ``seconds``, ``cap_s``, ``note``); the last line
    of a stage wins. An unknown status is kept as written (and shown as such)."""
    path = work / "stages.tsv"
    records: dict[str, dict[str, str]] = {}
    if not path.exists():
        return records
    with open(path, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if row.get("stage"):
                records[row["stage"]] = {k: (v or "").strip() for k, v in row.items()}
    return records


def stage_rows(folder: Path) -> list[dict]:
    """Every row of every CSV in a stage folder, in file-name order."""
    rows: list[dict] = []
    for path in sorted(folder.glob("*.csv")):
        rows.extend(harness.read_rows(path))
    return rows


def log_tail(folder: Path, name: str, lines: int = LOG_TAIL) -> list[str]:
    """The last ``lines`` lines of ``<folder>/<name>.log`` (empty if there is none)."""
    path = folder / f"{name}.log"
    if not path.exists():
        return []
    return path.read_text(errors="replace").splitlines()[-lines:]


_OUTCOME = re.compile(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
_COLLECTED = re.compile(r"\bcollected (\d+) items?\b")


def test_counts(folder: Path, name: str = "tests") -> dict[str, object]:
    """Outcomes of the pytest runs logged in ``<folder>/<name>.log`` (``pytest -v``: one ``nodeid OUTCOME`` line per
    test, so a run cut short by its cap still counts what finished): ``{"passed", "failed", "errors", "skipped",
    "xfailed", "xpassed", "selected", "failed_ids"}``. A test reported twice (a teardown error after a pass) counts
    with its last outcome; ``selected`` sums the "collected ... selected" lines of every pytest run in the log."""
    path = folder / f"{name}.log"
    outcomes: dict[str, str] = {}
    selected = 0
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            m = _OUTCOME.match(line)
            if m:
                outcomes[m.group(1)] = m.group(2)
                continue
            m = _COLLECTED.search(line)
            if m:  # "collecting ... collected 61 items / 42 deselected / 19 selected" (or without the selection)
                chosen = re.search(r"(\d+) selected", line)
                deselected = re.search(r"(\d+) deselected", line)
                selected += (
                    int(chosen.group(1)) if chosen else int(m.group(1)) - int(deselected.group(1) if deselected else 0)
                )
    count = {k: sum(v == k.upper() for v in outcomes.values()) for k in ("passed", "failed", "skipped")}
    return {
        **count,
        "errors": sum(v == "ERROR" for v in outcomes.values()),
        "xfailed": sum(v == "XFAIL" for v in outcomes.values()),
        "xpassed": sum(v == "XPASS" for v in outcomes.values()),
        "selected": selected,
        "failed_ids": [k for k, v in outcomes.items() if v in ("FAILED", "ERROR")],
    }


# --------------------------------------------------------------------------------------------------- verdicts
def verdict(line: str) -> str:
    """met | missed | not run | measured, from a suite's target line ("met", "not met"/"NOT met", "not measured")."""
    low = line.lower()
    if "not met" in low:
        return "missed"
    if "not measured" in low:
        return "not run"
    if re.search(r"\bmet\b", low):
        return "met"
    return "measured"


def _suite(name: str):
    import importlib

    return importlib.import_module(f"benchmarks.{name}")


def report_lines(stage: Stage, rows: Sequence[dict]) -> list[str]:
    """The target lines that a stage's suite reports on its rows (each starting with ``"- "``)."""
    if not rows or stage.suite is None:
        return []
    module = _suite(stage.suite)
    if stage.suite == "bench_train_step":
        return module.target_report(rows)
    if stage.suite == "bench_dropin":
        return []
    return [line for line in module.targets_report(rows) if line.startswith("- ")]


def target_heads(stage: Stage) -> list[str]:
    """The targets a stage answers: the first words of its suite's target lines."""
    if stage.suite is None or stage.suite == "bench_dropin":
        return []
    module = _suite(stage.suite)
    if stage.suite == "bench_attention":
        heads = module.target_heads()
        return heads[-1:] if stage.name == "longform" else heads[:-1]
    if stage.suite == "bench_contrastive":
        return module.target_heads(include_cpu=False)
    return module.target_heads()


def _not_run_reason(stage: Stage, record: dict | None, dry_run: bool) -> str:
    if record is None:
        return f"stage {stage.name} has no record"
    status, note = record.get("status", ""), record.get("note", "")
    if status == "not run":
        return f"stage {stage.name} not run: {note}" if note else f"stage {stage.name} not run"
    if status != "ok":
        return f"stage {stage.name} {status}" + (f" (exit {record['rc']})" if record.get("rc") else "")
    return "no rows for it in this run" + (" (dry run: tiny shapes)" if dry_run else "")


def targets(stage: Stage, rows: Sequence[dict], record: dict | None, dry_run: bool) -> list[tuple[str, str]]:
    """``(verdict, text)`` for every target of ``stage``: its suite's line when there is one, else "not run" with
    the reason (the stage's status, or no rows for that target)."""
    lines = report_lines(stage, rows)
    out = []
    for head in target_heads(stage):
        line = next((x for x in lines if x.startswith(f"- {head}")), None)
        if line is None:
            out.append(("not run", f"{head}: {_not_run_reason(stage, record, dry_run)}"))
        else:
            out.append((verdict(line), line[2:]))
    return out


# --------------------------------------------------------------------------------------------------- stage figures
def _value(row: dict | None, fmt: str = "{:.4g}", scale: float = 1.0) -> str:
    """A row's median in ``fmt``, or its status (the reasons are listed once, by :func:`_reasons`)."""
    if row is None:
        return "no row"
    if row["status"] != "ok" or row["p50"] == "":
        return row["status"]
    return fmt.format(float(row["p50"]) * scale)


def _status_counts(rows: Sequence[dict]) -> str:
    counts = {s: sum(r["status"] == s for r in rows) for s in harness.STATUSES}
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def _reasons(rows: Sequence[dict], limit: int = 8) -> list[str]:
    """Each distinct reason of the failed or skipped rows once, with the providers it applies to:
    ``  - skipped (flex, xformers): note``."""
    seen: dict[tuple[str, str], dict[str, None]] = {}
    for r in rows:
        if r["status"] != "ok" and r["note"]:
            seen.setdefault((r["status"], r["note"][:200]), {})[r["provider"]] = None
    lines = [
        f"  - {status} ({', '.join(providers)}): {note}" for (status, note), providers in list(seen.items())[:limit]
    ]
    if len(seen) > limit:
        lines.append(f"  - ... and {len(seen) - limit} more reasons (the stage's CSV has every note)")
    return lines


def figures_tests(folder: Path, record: dict | None, dry_run: bool) -> tuple[list[str], tuple[str, str] | None]:
    """The stage line of the gpu tests and its verdict."""
    c = test_counts(folder)
    ran = c["passed"] + c["failed"] + c["errors"] + c["skipped"] + c["xfailed"] + c["xpassed"]
    text = (f"gpu tests: {c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped"
            f" ({c['selected']} selected)")  # fmt: skip
    status = (record or {}).get("status", "no record")
    if c["selected"] > ran:
        text += f", {c['selected'] - ran} not reached (stage {status})"
    if dry_run:
        text += "; dry run: the gpu-marked tests were collected and skipped (no GPU), the passes are CPU tests"
    lines = [f"- {text}"] + [f"  - failed: {node}" for node in c["failed_ids"][:15]]
    if record is None or status == "not run":
        return lines, ("not run", f"{text}: {_not_run_reason(BY_NAME['tests'], record, dry_run)}")
    if c["failed"] or c["errors"]:
        return lines, ("missed", text)
    if dry_run or not c["passed"] or c["selected"] > ran or status != "ok":
        return lines, ("not run", text + ("" if dry_run else f" (stage {status})"))
    return lines, ("met", text)


def figures_attention(rows: Sequence[dict]) -> list[str]:
    ba = _suite("bench_attention")
    lines = [
        f"- rows: {_status_counts(rows)}; shape sets (x axis): "
        f"{', '.join(sorted({r['x_name'] for r in rows}))}; dtype {', '.join(sorted({r['dtype'] for r in rows}))}"
    ]
    lines += ba.compile_report(rows)
    lines += [x for x in ba.targets_report(rows) if x.startswith("- long-form") and "grows linearly" not in x]
    return lines + _reasons(rows)


def figures_train(rows: Sequence[dict]) -> list[str]:
    bts = _suite("bench_train_step")
    if not rows:
        return []
    shape = rows[0]["shape"]
    ours, base = bts.OURS, bts.BASELINE

    def get(provider, metric, fmt="{:.4g}", scale=1.0):
        return _value(suite.find(rows, provider=provider, metric=metric), fmt, scale)

    return [
        f"- train step ({shape}; {rows[0]['dtype']}): {ours} {get(ours, 'clips_per_s', '{:.4g} clips/s')} vs {base} "
        f"{get(base, 'clips_per_s', '{:.4g} clips/s')}; step {get(ours, 'time', '{:.4g} ms')} vs "
        f"{get(base, 'time', '{:.4g} ms')}",
        f"- train step peak memory (max allocated): {ours} {get(ours, 'memory_total', '{:.0f} MB')} vs {base} "
        f"{get(base, 'memory_total', '{:.0f} MB')}",
        f"- train step MFU (model FLOPs / dense bf16 peak): {ours} {get(ours, 'mfu', '{:.1f} %', 100)} vs {base} "
        f"{get(base, 'mfu', '{:.1f} %', 100)}; model TFLOP/s {get(ours, 'tflops')} vs {get(base, 'tflops')}; "
        f"counted TFLOP per step {get(ours, 'step_flops')} vs {get(base, 'step_flops')}",
        *_reasons(rows),
    ]


def figures_contrastive(rows: Sequence[dict]) -> list[str]:
    bc = _suite("bench_contrastive")
    if not rows:
        return []
    n = "32768" if any(r["x_value"] == "32768" for r in rows) else min((r["x_value"] for r in rows), key=int)
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    shape = next(r["shape"] for r in rows if r["x_value"] == n)
    times = ", ".join(f"{p} {_value(suite.find(rows, provider=p, metric='time', mode='fwd+bwd', x_value=n))}"
                      for p in providers)  # fmt: skip
    mems = ", ".join(f"{p} {_value(suite.find(rows, provider=p, metric='memory', mode='fwd+bwd', x_value=n), '{:.0f}')}"
                     for p in providers)  # fmt: skip
    return [f"- contrastive fwd+bwd at {shape} ({rows[0]['dtype']}), ms: {times}",
            f"- contrastive fwd+bwd peak memory at N={n}, MB: {mems}", *bc.largest_n_report(rows),
            *_reasons(rows)]  # fmt: skip


def figures_dropin(rows: Sequence[dict]) -> list[str]:
    return [*_suite("bench_dropin").comparison_report(rows), *_reasons(rows)] if rows else []


def figures_decode(rows: Sequence[dict]) -> list[str]:
    return [f"- rows: {_status_counts(rows)}", *_reasons(rows)] if rows else []


def figures_resources(folder: Path) -> list[str]:
    """Per resource report (markdown table of ``benchmarks.kernel_resources``): kernels, spills, matrix ops."""
    lines = []
    for path in sorted(folder.glob("*.md")):
        cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in path.read_text().splitlines()
                 if line.startswith("| ") and not line.startswith("| case ")]  # fmt: skip
        cells = [c for c in cells if len(c) == 8]
        if not cells:
            continue
        spills = [f"{c[0]}/{c[1]}" for c in cells if c[5].isdigit() and int(c[5]) > 0]
        mma = {m: sum(c[7] == m for c in cells) for m in dict.fromkeys(c[7] for c in cells)}
        lines.append(f"- {path.name}: {len(cells)} kernels, "
                     + (f"stack (spills) in {', '.join(spills)}" if spills else "no register spills (stack 0)")
                     + "; " + ", ".join(f"{m} x{k}" for m, k in mma.items()))  # fmt: skip
    return lines


FIGURES: dict[str, Callable[[Sequence[dict]], list[str]]] = {
    "attention": figures_attention, "longform": figures_attention, "train": figures_train,
    "contrastive": figures_contrastive, "dropin": figures_dropin, "decode": figures_decode,
}  # fmt: skip


# --------------------------------------------------------------------------------------------------- per-stage report
def write_stage_report(stage: Stage, folder: Path, rows: Sequence[dict], plots: bool) -> str | None:
    """``<folder>/report.md``: the suite's own markdown summary of the stage's rows, then the plot tables (and
    ``plots/*.png`` when ``plots`` and matplotlib is there). Returns a note when the plots could not be drawn."""
    if not rows or stage.suite is None:
        return None
    from benchmarks import plot

    note, images = None, {}
    if plots:
        try:
            images = plot.plot_all(rows, folder / "plots", relative_to=folder)
        except Exception as exc:  # matplotlib missing or a plot failing must not cost the summary
            note = f"no plots ({harness.describe_exception(exc)})"
    summary = _suite(stage.suite).markdown_summary(rows)
    (folder / "report.md").write_text(f"# {stage.title}\n\n{summary}\n\n## Tables and plots\n\n"
                                      f"{plot.markdown_report(rows, images)}\n")  # fmt: skip
    return note


# --------------------------------------------------------------------------------------------------- summary
def _machine(work: Path, dry_run: bool) -> str:
    smi = work / "nvidia-smi.txt"
    smi_text = " ".join(smi.read_text().split()) if smi.exists() and smi.stat().st_size else ""
    try:
        import torch

        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception as exc:  # a broken CUDA setup is reported, not fatal
        name = f"unknown ({harness.describe_exception(exc)})"
    if name is None:
        cpu = harness.environment("cpu")["device"]
        name = f"none (CPU: {cpu})" + ("; dry run" if dry_run else "")
    return name + (f"; nvidia-smi: {smi_text}" if smi_text else "")


def build_summary(work: Path, dry_run: bool = False, plots: bool = True, machine: str | None = None) -> str:
    """The markdown of ``summary.md`` (see the module docstring); writes each stage's ``report.md`` (and plots)
    into its folder on the way. ``machine``: the GPU line, if the caller knows it (tests); else torch and
    ``nvidia-smi.txt`` say."""
    session = read_session(work)
    records = read_stages(work)
    dry_run = dry_run or session.get("mode") == "dry-run"
    env = harness.environment("cpu")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    total = sum(float(r.get("seconds") or 0) for r in records.values())
    row_commits: set[str] = set()
    lines = [f"# GPU session {session.get('label', '(no label)')}", ""]
    if dry_run:
        lines += ["**DRY RUN on a CPU**: every stage at tiny sizes (the Triton interpreter where it runs, the GPU "
                  "tests collected and skipped); no figure below is a GPU result.", ""]  # fmt: skip
    lines += [
        f"- GPU: {machine or _machine(work, dry_run)}",
        f"- commit: {session.get('commit', 'unknown')} (from {session.get('commit_source', 'nothing: unknown')})",
        f"- torch {env['torch']}, triton {env['triton']}, Python {env['python']}",
        f"- date: {now} (session started {session.get('started_utc', 'unknown')})",
        f"- stages took {total:.0f} s in all, budget {session.get('budget_s', '?')} s",
        "",
        "## Stages",
        "",
        "| stage | status | exit | time (s) | cap (s) | note |",
        "|---|---|---|---|---|---|",
    ]
    target_lines: list[tuple[str, str, str]] = []  # (verdict, stage, text)
    figure_sections: list[str] = []
    bad_logs: list[str] = []
    for stage in STAGES:
        record = records.get(stage.name)
        folder = work / stage.name
        if record is None:
            lines.append(f"| {stage.name} | no record |  |  |  | the session ended before this stage |")
        else:
            note = record.get("note", "").replace("|", "/")
            lines.append(f"| {stage.name} | {record.get('status') or '?'} | {record.get('rc', '')} | "
                         f"{record.get('seconds', '')} | {record.get('cap_s', '')} | {note} |")  # fmt: skip
        rows = stage_rows(folder) if folder.is_dir() else []
        row_commits |= {r["commit"] for r in rows}
        plot_note = write_stage_report(stage, folder, rows, plots) if rows else None
        figures: list[str] = []
        if stage.name == "tests":
            figures, goal = figures_tests(folder, record, dry_run)
            target_lines.append((*goal[:1], stage.name, goal[1]))
        elif stage.name == "resources":
            figures = figures_resources(folder) if folder.is_dir() else []
        elif stage.name in FIGURES:
            figures = FIGURES[stage.name](rows)
        target_lines += [(v, stage.name, text) for v, text in targets(stage, rows, record, dry_run)]
        if plot_note:
            figures.append(f"- {plot_note}")
        status = (record or {}).get("status", "no record")
        if not figures and status != "ok":
            figures = [f"- {_not_run_reason(stage, record, dry_run)}"]
        figure_sections.append(f"### {stage.title}\n\n" + ("\n".join(figures) if figures else "- (no figures)") + "\n")
        if status in ("failed", "timeout"):
            tail = log_tail(folder, stage.name)
            bad_logs.append(f"### {stage.name}: {status}, last {len(tail)} lines of {stage.name}.log\n\n```\n"
                            + "\n".join(tail) + "\n```")  # fmt: skip
    lines += ["", "## Targets", "", "Verdicts of the issue's targets from this run's rows (measured, not asserted): "
              "**met**, **missed** (with the number), **not run** (with the reason).", ""]  # fmt: skip
    lines += [f"- **{v}** ({stage}) {text}" for v, stage, text in target_lines]
    counts = {v: sum(t[0] == v for t in target_lines) for v in ("met", "missed", "not run")}
    lines += ["", "In all: " + ", ".join(f"{n} {v}" for v, n in counts.items()), "", "## Stage results", ""]
    lines += figure_sections
    if row_commits:
        lines += ["", f"Commit column of the CSV rows: {', '.join(sorted(row_commits))} (`unknown` where the copy "
                  "that ran has no git history; the session's commit above is the one to trust)."]  # fmt: skip
    if bad_logs:
        lines += ["", "## Logs of the stages that failed or timed out", "", *bad_logs]
    lines += ["", "## Files", "", "- `summary.md`: this file",
              *(f"- `{name}.tar.gz`: {', '.join(s.name for s in STAGES if s.archive == name)}"
                + (" and the session files" if name == "extra" else "") for name in ARCHIVES)]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_archives(work: Path, out: Path) -> list[Path]:
    """One ``<archive>.tar.gz`` in ``out`` per :data:`ARCHIVES` entry with content: the stage folders that go to it
    (as ``<stage>/...``), and for ``extra`` also the session files at the top. Returns the paths written."""
    written = []
    for name in ARCHIVES:
        folders = [work / s.name for s in STAGES if s.archive == name and (work / s.name).is_dir()]
        files = [work / f for f in SESSION_FILES if (work / f).exists()] if name == "extra" else []
        if not folders and not files:
            continue
        path = out / f"{name}.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            for folder in folders:
                tar.add(folder, arcname=folder.name)
            for f in files:
                tar.add(f, arcname=f.name)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_summary", description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True, type=Path, help="the session's work folder (stages.tsv, stage folders)")
    p.add_argument("--out", required=True, type=Path, help="where summary.md and the archives go")
    p.add_argument("--dry-run", action="store_true", help="say that this was a CPU dry run (also read from "
                   "session.env)")  # fmt: skip
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs (the tables are still written)")
    args = p.parse_args(argv)
    if not args.work.is_dir():
        p.error(f"--work {args.work} is not a folder")
    args.out.mkdir(parents=True, exist_ok=True)
    text = build_summary(args.work, args.dry_run, plots=not args.no_plots)
    (args.out / "summary.md").write_text(text)
    archives = write_archives(args.work, args.out)
    print(f"# wrote {args.out / 'summary.md'} and {', '.join(a.name for a in archives) or 'no archives'}",
          file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
