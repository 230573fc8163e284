"""/metrics parsed by the Prometheus project's own OpenMetrics parser."""

import urllib.request

from prometheus_client.openmetrics.parser import text_string_to_metric_families


def test_metrics_are_valid_openmetrics(kernel):
    request = urllib.request.Request(f"{kernel.url}/v1/agents", headers={"Authorization": f"Bearer {kernel.key}"})
    urllib.request.urlopen(request).read()
    with urllib.request.urlopen(f"{kernel.url}/metrics") as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        text = response.read().decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    requests = families["bbx_http_requests"]
    assert requests.type == "counter"
    assert any(s.labels == {"method": "GET", "route": "/v1/agents", "status": "200"} and s.value == 1 for s in requests.samples)
    assert families["bbx_http_request_duration_seconds"].type == "histogram"
    assert families["bbx_store_sync_seconds"].type == "histogram"
