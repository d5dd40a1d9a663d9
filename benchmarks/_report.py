"""Shared by every benchmark: the results header (command, date, machine), and the sections of BENCHMARKS.md.

Kept apart from the benchmarks themselves so that importing it loads nothing but torch and transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent


def run_header() -> dict:
    """The start of a results file: the command as typed from the project's root, today's date, this machine."""
    return {
        "command": f"python benchmarks/{Path(sys.argv[0]).name} " + shlex.join(sys.argv[1:]),
        "date": date.today().isoformat(),
        "machine": machine(),
    }


def run_cli(arguments: list[str], label: str) -> dict:
    """``mlp-fusion ARGUMENTS --json`` in a fresh process, run from the repository root (so that data paths
    relative to it work); its JSON result. A failure stops the benchmark with the command's last words."""
    command = [sys.executable, "-c", "import sys; from mlp_fusion.cli import main; sys.exit(main())"]
    done = subprocess.run([*command, *arguments, "--json"], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{label} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_results(raw: Path, fields: dict) -> dict:
    """``fields`` after the header (command, date, machine), written to the raw results file ``raw``."""
    results = {**run_header(), **fields}
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(results, indent=2) + "\n")
    return results


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        **_optional_versions(),
    }


def _optional_versions() -> dict:
    """scikit-learn's and numpy's versions, when they are installed (the k-means benchmark compares them)."""
    versions = {}
    for name, module in (("scikit-learn", "sklearn"), ("numpy", "numpy")):
        try:
            versions[name] = __import__(module).__version__
        except ImportError:
            pass
    return versions


def provenance(results: dict, raw: Path, root: Path) -> str:
    """The closing line of a benchmark section: machine, versions, date, command(s), raw results file."""
    info = results["machine"]
    commands = results.get("commands") or [results["command"]]
    label = "Commands" if len(commands) > 1 else "Command"
    return (
        f"Machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}, transformers "
        f"{info['transformers']}. Date {results['date']}. {label}: "
        + ", ".join(f"`{c.strip()}`" for c in commands)
        + f"; raw results in `{raw.relative_to(root)}`."
    )


def publish(name: str, intro: str, table: list[str], results: dict, raw: Path) -> str:
    """A benchmark's section of BENCHMARKS.md (its introduction, its table, the provenance line), written."""
    parts = (intro, "\n".join(table), provenance(results, raw, ROOT))
    body = "\n\n".join(part for part in parts if part)
    write_section(ROOT / "BENCHMARKS.md", name, body)
    return body


def in_setting_order(rows: dict, setting) -> list:
    """``rows.items()`` grouped by ``setting(key)``, the groups in the order their first row was added."""
    order = list(dict.fromkeys(setting(key) for key in rows))
    return sorted(rows.items(), key=lambda item: order.index(setting(item[0])))


def write_section(path: Path, name: str, body: str) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + f"\n\n{block}\n"
    path.write_text(text)


def rewrite_only(doc: str, raw: Path, report: Callable[[dict], str]) -> bool:
    """Parse a benchmark's command line (its only option, ``--report``); with it, rewrite the benchmark's
    section from the saved results ``raw`` and say so by returning True."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", action="store_true", help="rewrite the section from the saved results")
    if not parser.parse_args().report:
        return False
    print(report(json.loads(raw.read_text())))
    return True
