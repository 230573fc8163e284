"""/metrics checked by the Prometheus project's own tools: its OpenMetrics parser, and
`promtool check metrics` on the classic text format."""

import os
import shutil
import subprocess
import urllib.request

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families


def scrape(kernel, accept):
    request = urllib.request.Request(f"{kernel.url}/metrics", headers={"Accept": accept})
    with urllib.request.urlopen(request) as response:
        return response.headers["Content-Type"], response.read().decode()


def touch_api(kernel):
    request = urllib.request.Request(f"{kernel.url}/v1/agents", headers={"Authorization": f"Bearer {kernel.key}"})
    urllib.request.urlopen(request).read()


def test_openmetrics_parses_strictly(kernel):
    touch_api(kernel)
    content_type, text = scrape(kernel, "application/openmetrics-text; version=1.0.0,text/plain;q=0.5")
    assert content_type.startswith("application/openmetrics-text")
    families = {family.name: family for family in text_string_to_metric_families(text)}
    requests = families["bbx_http_requests"]
    assert requests.type == "counter"
    assert any(s.labels == {"method": "GET", "route": "/v1/agents", "status": "200"} and s.value == 1 for s in requests.samples)
    assert families["bbx_http_request_duration_seconds"].type == "histogram"
    assert families["bbx_store_sync_seconds"].type == "histogram"


def test_classic_format_passes_promtool(kernel):
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs promtool (Debian package prometheus); it is missing")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    touch_api(kernel)
    content_type, text = scrape(kernel, "text/plain")
    assert content_type.startswith("text/plain; version=0.0.4")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
