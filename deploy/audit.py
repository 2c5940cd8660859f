"""SEC-13: audit the installed dependencies with pip-audit when an advisory service answers.

    .venv/bin/python deploy/audit.py

Tries the PyPI advisory service, then OSV. A service that cannot be reached, or that audits
nothing (every package "not found": a registry mirror without the JSON API answers like that,
and pip-audit then reports "No known vulnerabilities found" for packages it never checked), does
not count as a pass: the script prints `skipped: advisory service unreachable` and exits 0.
Known vulnerabilities print one line each and exit 1. Exit 2: pip-audit is not installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess  # nosec B404: runs pip-audit from our own virtualenv with fixed arguments
import sys
from dataclasses import dataclass
from pathlib import Path

SERVICES = ("pypi", "osv")
TIMEOUT_S = 300.0
OWN_PACKAGES = {"voltpool"}  # the project itself is not on PyPI


@dataclass(frozen=True, slots=True)
class Audit:
    """What one advisory service said about the environment."""

    service: str
    audited: int  # packages the service actually checked
    skipped: int  # packages it could not check
    vulnerabilities: tuple[str, ...]  # "name version id (fix: versions)"
    error: str = ""  # the service could not be used at all

    @property
    def usable(self) -> bool:
        """The service answered and checked at least one package."""
        return not self.error and self.audited > 0


def pip_audit_executable() -> str | None:
    """pip-audit next to this interpreter, else on PATH."""
    local = Path(sys.executable).with_name("pip-audit")
    return str(local) if local.exists() else shutil.which("pip-audit")


def parse(service: str, report: dict[str, object]) -> Audit:
    """An `Audit` from pip-audit's JSON report (`-f json`)."""
    dependencies = report.get("dependencies", [])
    assert isinstance(dependencies, list)
    audited = skipped = 0
    found: list[str] = []
    for dependency in dependencies:
        if dependency.get("name") in OWN_PACKAGES:
            continue
        if "skip_reason" in dependency:
            skipped += 1
            continue
        audited += 1
        for vuln in dependency.get("vulns", []):
            fixes = ", ".join(vuln.get("fix_versions", [])) or "none"
            found.append(
                f"{dependency['name']} {dependency.get('version', '?')} {vuln.get('id', '?')} "
                f"(fix: {fixes})"
            )
    return Audit(service, audited, skipped, tuple(found))


def run(executable: str, service: str) -> Audit:
    """Run pip-audit against one service over the installed environment."""
    args = [executable, "-l", "-f", "json", "--progress-spinner", "off", "-s", service]
    try:
        done = subprocess.run(  # nosec B603: fixed arguments, no shell
            args, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        return Audit(service, 0, 0, (), f"no answer within {TIMEOUT_S:.0f} s")
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return Audit(service, 0, 0, (), last[:200])
    return parse(service, report)


def main() -> int:
    """Audit with the first usable service; see the module docstring for the exit codes."""
    executable = pip_audit_executable()
    if executable is None:
        print("pip-audit is not installed: .venv/bin/pip install -e '.[test]'")
        return 2
    reasons = []
    for service in SERVICES:
        audit = run(executable, service)
        if not audit.usable:
            reason = audit.error or f"{audit.skipped} packages not found, none audited"
            reasons.append(f"{service}: {reason}")
            continue
        for line in audit.vulnerabilities:
            print(f"VULNERABLE {line}")
        print(
            f"pip-audit ({service}): {audit.audited} packages audited, {audit.skipped} skipped, "
            f"{len(audit.vulnerabilities)} known vulnerabilities"
        )
        return 1 if audit.vulnerabilities else 0
    print(f"skipped: advisory service unreachable ({'; '.join(reasons)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
