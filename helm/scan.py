#!/usr/bin/env python3
"""Scan the rendered manifests of every chart mode with checkov.

Platform teams' pipelines run checkov on what a chart renders; this does the
same for the chart defaults and for every `helm/packmeter/ci/*-values.yaml`:

    pip install --ignore-requires-python helm-sdkpy pyyaml && pip install checkov
    python3 helm/scan.py

Each value set is rendered through `helm/lint.py --render` (Helm's real
install action) into the namespace `packmeter` (a real install does not use
`default`), written out as YAML, and scanned with checkov's Kubernetes
framework. Findings the chart accepts by design are skipped by annotations
that name the check and the reason (`securityScanSkips` in values.yaml);
any other finding fails the run.

Exit status: 0 when no check failed, 1 when one did, 2 when checkov,
helm-sdkpy or PyYAML is unavailable.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
VALUE_SETS = [("defaults", None)] + [
    (p.name.removesuffix("-values.yaml"), p) for p in sorted((HERE / "packmeter" / "ci").glob("*-values.yaml"))
]


def main() -> int:
    try:
        import yaml
    except ImportError:
        print("scan.py: PyYAML is missing (pip install pyyaml)", file=sys.stderr)
        return 2
    checkov = shutil.which("checkov")
    if not checkov:
        print("scan.py: checkov is missing (pip install checkov)", file=sys.stderr)
        return 2
    out = Path(tempfile.mkdtemp(prefix="packmeter-checkov-"))
    try:
        for name, values in VALUE_SETS:
            render = subprocess.run(
                [sys.executable, str(HERE / "lint.py"), "--namespace", "packmeter",
                 "--render", str(values) if values else "/dev/null"],
                capture_output=True, text=True)
            if render.returncode != 0:
                print(render.stderr, file=sys.stderr)
                return render.returncode
            objects = json.loads(render.stdout)
            (out / f"{name}.yaml").write_text(yaml.safe_dump_all(objects))
        scan = subprocess.run(
            [checkov, "--directory", str(out), "--framework", "kubernetes", "--output", "json",
             "--quiet", "--skip-download"], capture_output=True, text=True)
        try:
            reports = json.loads(scan.stdout)
        except json.JSONDecodeError:
            print(f"scan.py: checkov printed no report (exit {scan.returncode}):\n{scan.stderr}",
                  file=sys.stderr)
            return 1
        if isinstance(reports, dict):
            reports = [reports]
        failed = [f for r in reports for f in r["results"]["failed_checks"]]
        summary = [r["summary"] for r in reports]
        passed = sum(s["passed"] for s in summary)
        skipped = sum(s["skipped"] for s in summary)
        for f in failed:
            print(f"FAIL {f['check_id']} {f['check_name']}: {f['resource']} in {f['file_path']}")
        for r in reports:
            for s in r["results"].get("skipped_checks", []):
                reason = (s.get("suppress_comment") or "").strip()
                print(f"SKIP {s['check_id']} {s['resource']} in {s['file_path']}: {reason}")
        print(f"checkov on {len(VALUE_SETS)} value sets: {passed} passed, {skipped} skipped "
              f"(securityScanSkips), {len(failed)} failed")
        return 1 if failed else 0
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
