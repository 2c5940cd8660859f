"""SEC-13: the pip-audit wrapper counts what was audited, and an audit of nothing is no pass."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _audit_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_audit", ROOT / "deploy/audit.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_report_with_a_vulnerability_is_counted_and_named() -> None:
    """One audited package with an advisory, one skipped, the project itself ignored."""
    audit = _audit_module().parse(
        "pypi",
        {
            "dependencies": [
                {
                    "name": "requests",
                    "version": "2.0.0",
                    "vulns": [{"id": "GHSA-x", "fix_versions": ["2.32.0"]}],
                },
                {"name": "numpy", "version": "2.1.0", "vulns": []},
                {"name": "amqtt", "skip_reason": "Dependency not found on PyPI"},
                {"name": "voltpool", "skip_reason": "Dependency not found on PyPI"},
            ]
        },
    )
    assert (audit.audited, audit.skipped) == (2, 1)
    assert audit.vulnerabilities == ("requests 2.0.0 GHSA-x (fix: 2.32.0)",)
    assert audit.usable


def test_a_service_that_audited_nothing_is_not_a_pass() -> None:
    """A mirror without the JSON API makes pip-audit skip every package and still print "No
    known vulnerabilities found": the wrapper reports that as unusable, i.e. skipped."""
    module = _audit_module()
    everything_skipped = module.parse(
        "pypi", {"dependencies": [{"name": "numpy", "skip_reason": "not found"}]}
    )
    assert not everything_skipped.usable
    assert not module.Audit("osv", 0, 0, (), "ConnectionError").usable
