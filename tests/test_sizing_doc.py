"""The pod's memory sizing quotes the idle-session cost docs/benchmarks.md measures: the README,
the ConfigMap and the Deployment say the same number, so a new benchmark run that changes it
fails here until they are updated."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measured_kib_per_idle_session() -> str:
    row = next(line for line in (ROOT / "docs" / "benchmarks.md").read_text().splitlines() if "RSS per idle session" in line)
    gateway = re.findall(r"([\d.]+) KiB", row)[-1]  # the gateway's column is the last KiB figure
    return gateway


def test_readme_configmap_and_deployment_quote_the_measured_idle_session_memory() -> None:
    kib = measured_kib_per_idle_session()
    for path in ("README.md", "deploy/k8s/configmap.yaml", "deploy/k8s/deployment.yaml"):
        text = (ROOT / path).read_text()
        quoted = set(re.findall(r"([\d.]+) KiB per idle session", text))
        assert quoted == {kib}, (path, quoted, kib)
