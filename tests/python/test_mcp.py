"""BBX's MCP server driven by the official MCP Python SDK, over streamable HTTP and stdio."""

import json
import urllib.request
from contextlib import asynccontextmanager

import anyio
import httpx2
import pytest
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from conftest import bbx_binary

TOOLS = {
    "agent_create",
    "agent_list",
    "state_get",
    "state_set",
    "state_delete",
    "state_list",
    "bbx_status",
    "ring_submit",
    "ring_wait",
    "ring_stats",
    "ring_wal",
    "ring_breakers",
    "ring_resolve",
    "enhanced_ring_stats",
    "enhanced_ring_wal",
    "enhanced_ring_circuit",
    "quota_get",
    "quota_set",
    "enforced_quotas_stats",
    "enforced_quotas_gpu",
    "enforced_quotas_cgroup",
    # Declared as endpoints (GET /v1/endpoints), not written in the MCP server.
    "ring_approve",
    "ring_deny",
    "auth_create_token",
    "auth_verify",
    "auth_create_api_key",
    "auth_rules",
    "auth_audit",
    "auth_revoke",
    "auth_rotate_key",
    "auth_set_policy",
    "auth_delete_policy",
    "secrets_set",
    "secrets_list",
    "secrets_bind",
    "secrets_delete",
    "bus_publish",
    "bus_subscribe",
    "bus_ack",
    "bus_nack",
    "bus_extend",
    "bus_create_topic",
    "bus_topics",
    "bus_stats",
    "bus_dlq",
    "bus_dlq_replay",
    "bus_dlq_purge",
    "bus_route",
    "bus_routes",
    "bus_unroute",
    "bus_send",
    "bus_inbox",
    "bus_request",
    "bus_reply",
    "message_bus_stats",
    "message_bus_publish",
    "message_bus_dlq",
    "flow_policies",
    "enhanced_flow_policies",
    "flow_stats",
    "enhanced_flow_stats",
    "flow_add_policy",
    "flow_remove_policy",
    "flow_test",
    "flow_quarantine",
    "flow_release",
    "flow_declassify",
    "flow_anomalies",
    "enhanced_flow_anomalies",
    "flow_explain",
    "flow_audit",
    "flow_approve",
    "flow_deny",
    "flow_grant",
    "flow_revoke",
    "flow_grants",
    "ring_kinds",
    "memory_add",
    "memory_search",
    "memory_get",
    "memory_delete",
    "memory_forget",
    "memory_stats",
    "semantic_memory_add",
    "semantic_memory_search",
    "semantic_memory_forget",
    "semantic_memory_stats",
    "context_put",
    "context_get",
    "context_list",
    "context_assemble",
    "context_search",
    "context_pin",
    "context_delete",
    "context_demote",
    "context_stats",
    "context_prefetch",
    "context_score",
    "enhanced_context_stats",
    "enhanced_context_prefetch",
    "enhanced_context_score",
    "goals_run",
    "goals_list",
    "goals_status",
    "goals_cancel",
    "goals_pause",
    "goals_resume",
    "goals_signal",
    "goals_approve",
    "goals_validate",
    "goals_schema",
    "snapshots_create",
    "snapshots_list",
    "snapshots_show",
    "snapshots_diff",
    "snapshots_restore",
    "snapshots_fork",
    "snapshots_pitr",
    "snapshots_delete",
    "snapshots_verify",
    "snapshots_stats",
    "snapshots_replicas",
    "snapshots_gc",
    "distributed_snapshots_create",
    "distributed_snapshots_list",
    "distributed_snapshots_restore",
    "distributed_snapshots_pitr",
    "goal_engine_execute",
    "goals_plan",
    "goal_engine_plan",
    "goal_engine_status",
    "goal_engine_list",
}


@asynccontextmanager
async def http_session(kernel):
    headers = {"Authorization": f"Bearer {kernel.key}"}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        async with streamable_http_client(f"{kernel.url}/mcp", http_client=http) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                yield session


@asynccontextmanager
async def stdio_session(kernel):
    params = StdioServerParameters(command=bbx_binary(), args=["mcp", "--url", kernel.url, "--api-key", kernel.key])
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            yield session


def ok(result):
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


def error_code(result):
    assert result.is_error, result
    if result.structured_content is not None:
        return result.structured_content["error"]["code"]
    # Argument errors are reported by the MCP layer as text.
    return result.content[0].text


async def exercise_every_tool(session):
    listed = await session.list_tools()
    tools = {tool.name: tool for tool in listed.tools}
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert tool.description and len(tool.description) > 40, tool.name
        assert tool.input_schema["type"] == "object", tool.name
    assert set(tools["state_set"].input_schema["required"]) == {"agent_id", "key", "value"}

    agent = ok(await session.call_tool("agent_create", {"name": "mcp-agent", "labels": {"via": "mcp"}}))
    agent_id = agent["id"]
    written = ok(await session.call_tool("state_set", {"agent_id": agent_id, "key": "plan/step", "value": {"n": [1, 2]}}))
    assert written["version"] == 1
    read = ok(await session.call_tool("state_get", {"agent_id": agent_id, "key": "plan/step"}))
    assert read["value"] == {"n": [1, 2]}
    listed_state = ok(await session.call_tool("state_list", {"agent_id": agent_id, "prefix": "plan/"}))
    assert [e["key"] for e in listed_state["entries"]] == ["plan/step"]
    agents = ok(await session.call_tool("agent_list", {"label": "via=mcp"}))
    assert [a["id"] for a in agents["agents"]] == [agent_id]
    # A memory with its vector given (no model needed), found by its words.
    vector = [0.0] * 384
    vector[7] = 1.0
    added = ok(await session.call_tool("semantic_memory_add", {"agent": agent_id, "text": "the MCP remembers", "vector": vector, "model": "all-minilm-l6-v2"}))
    found = ok(await session.call_tool("memory_search", {"agent": agent_id, "query": "remembers", "mode": "keyword"}))
    assert [r["id"] for r in found["results"]] == [added["id"]]
    assert ok(await session.call_tool("semantic_memory_stats", {"agent": agent_id}))["count"] == 1
    status = ok(await session.call_tool("bbx_status", {}))
    assert status["agents"] >= 1
    # A workflow (as YAML text) run through the report's goal_engine tools.
    workflow = "steps:\n  a: {kind: state.incr, args: {key: g, by: 2}}\n  b: {kind: state.set, args: {key: h, value: '${steps.a.output.value}'}}\n"
    started = ok(await session.call_tool("goal_engine_execute", {"agent": agent_id, "workflow": workflow}))
    for _ in range(100):
        run = ok(await session.call_tool("goal_engine_status", {"run": started["run_id"]}))
        if run["status"] != "running":
            break
        await anyio.sleep(0.05)
    assert run["status"] == "succeeded", run
    assert ok(await session.call_tool("state_get", {"agent_id": agent_id, "key": "h"}))["value"] == 2
    runs = ok(await session.call_tool("goal_engine_list", {"agent": agent_id}))
    assert [r["run_id"] for r in runs["runs"]] == [started["run_id"]]
    cyclic = {"steps": {"a": {"kind": "noop", "depends_on": ["b"]}, "b": {"kind": "noop", "depends_on": ["a"]}}}
    assert error_code(await session.call_tool("goals_validate", {"workflow": cyclic})) == "invalid_argument"

    # Errors come back as MCP tool errors carrying BBX's error shape.
    stale = await session.call_tool("state_set", {"agent_id": agent_id, "key": "plan/step", "value": 0, "if_version": 9})
    assert error_code(stale) == "version_conflict"
    assert error_code(await session.call_tool("state_get", {"agent_id": "../etc", "key": "k"})) == "invalid_id"
    assert error_code(await session.call_tool("state_get", {"agent_id": agent_id, "key": ""})) == "invalid_argument"
    assert error_code(await session.call_tool("agent_create", {"name": ""})) == "invalid_argument"
    missing_value = await session.call_tool("state_set", {"agent_id": agent_id, "key": "k"})
    assert missing_value.is_error and "value" in error_code(missing_value)
    unknown_field = await session.call_tool("agent_create", {"name": "x", "colour": "red"})
    assert unknown_field.is_error

    ok(await session.call_tool("state_delete", {"agent_id": agent_id, "key": "plan/step"}))
    assert error_code(await session.call_tool("state_get", {"agent_id": agent_id, "key": "plan/step"})) == "not_found"
    with pytest.raises(Exception):
        await session.call_tool("no_such_tool", {})

    op = {"agent": agent_id, "kind": "state.incr", "args": {"key": "count", "by": 2}, "idempotency_key": "mcp-1"}
    submitted = ok(await session.call_tool("ring_submit", {"ops": [op]}))
    op_id = submitted["ops"][0]["op_id"]
    again = ok(await session.call_tool("ring_submit", {"ops": [op]}))
    assert again["ops"][0] == {"op_id": op_id, "deduplicated": True}
    waited = ok(await session.call_tool("ring_wait", {"op_id": op_id}))
    assert waited["state"] == "done"
    assert waited["completion"]["status"] == "ok"
    assert waited["completion"]["result"]["value"] == 2
    stats = ok(await session.call_tool("ring_stats", {}))
    assert stats["deduplicated_total"] >= 1
    # The reference design's names answer as the canonical tools do.
    assert ok(await session.call_tool("enhanced_ring_stats", {}))["deduplicated_total"] >= 1
    for name in ("ring_wal", "enhanced_ring_wal"):
        wal = ok(await session.call_tool(name, {}))
        assert wal["synced_lsn"] >= 1 and wal["syncs_total"] >= 1, wal
    for name in ("ring_breakers", "enhanced_ring_circuit"):
        assert isinstance(ok(await session.call_tool(name, {}))["breakers"], list)
        assert isinstance(ok(await session.call_tool(name, {"reset": True}))["breakers"], list)
    unasked = await session.call_tool("enhanced_ring_circuit", {"target": "tool.shell"})
    assert error_code(unasked) == "invalid_argument"
    assert error_code(await session.call_tool("ring_submit", {"ops": [{**op, "kind": "launch"}]})) == "invalid_argument"
    assert error_code(await session.call_tool("ring_wait", {"op_id": "nope"})) == "invalid_id"
    # An op that is not in doubt cannot be resolved.
    assert error_code(await session.call_tool("ring_resolve", {"op_id": op_id, "as": "ok"})) == "failed_precondition"
    # Nor approved or denied, if it was never held; the endpoint checks its input.
    assert error_code(await session.call_tool("ring_approve", {"op_id": op_id})) == "failed_precondition"
    assert error_code(await session.call_tool("ring_deny", {"op_id": op_id, "reason": "no"})) == "failed_precondition"
    assert error_code(await session.call_tool("ring_deny", {"op_id": op_id})) == "invalid_argument"
    # A token issued and checked through the auth tools.
    issued = ok(await session.call_tool("auth_create_token", {"identity": "mcp", "tenant": "acme", "role": "reader"}))
    checked = ok(await session.call_tool("auth_verify", {"token": issued["token"]}))
    assert checked["valid"] and checked["claims"]["roles"] == ["reader"], checked
    assert not ok(await session.call_tool("auth_verify", {"token": issued["token"] + "x"}))["valid"]
    made = ok(await session.call_tool("auth_create_api_key", {"name": "mcp", "tenant": "acme", "role": "reader"}))
    assert made["key"].startswith("bbx_") and made["info"]["role"] == "reader"
    rules = ok(await session.call_tool("auth_rules", {}))
    assert {r["role"] for r in rules["roles"]} == {"admin", "tenant_admin", "operator", "agent", "reader"}

    node = f"agent/{agent_id}"
    quota = ok(await session.call_tool("quota_set", {"node": node, "limits": {"pids": 32, "cost_per_day_usd": 2.5}}))
    assert quota["limits"]["pids"] == 32
    assert ok(await session.call_tool("quota_get", {"node": node}))["limits"]["cost_per_day_usd"] == 2.5
    listed = ok(await session.call_tool("enforced_quotas_stats", {}))
    assert node in {q["node"] for q in listed["quotas"]}
    assert error_code(await session.call_tool("quota_set", {"node": node, "limits": {"pids": 0}})) == "invalid_argument"
    assert error_code(await session.call_tool("quota_get", {"node": "planet/x"})) == "invalid_argument"
    gpus = ok(await session.call_tool("enforced_quotas_gpu", {}))
    assert gpus["available"] == bool(gpus["devices"])
    cgroups = ok(await session.call_tool("enforced_quotas_cgroup", {}))
    assert cgroups["driver"] in {"cgroup v2", "cgroup v1", "rlimits"}
    return agent_id


def v1(kernel, path):
    request = urllib.request.Request(f"{kernel.url}{path}", headers={"Authorization": f"Bearer {kernel.key}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


@pytest.mark.anyio
async def test_streamable_http_tools(kernel):
    async with http_session(kernel) as session:
        agent_id = await exercise_every_tool(session)
    assert v1(kernel, f"/v1/agents/{agent_id}")["name"] == "mcp-agent"


@pytest.mark.anyio
async def test_stdio_tools_act_on_the_kernel(kernel):
    async with stdio_session(kernel) as session:
        agent_id = await exercise_every_tool(session)
        ok(await session.call_tool("state_set", {"agent_id": agent_id, "key": "from-stdio", "value": "hello"}))
    # State written through `bbx mcp` lives in the kernel, not in the stdio process.
    assert v1(kernel, f"/v1/agents/{agent_id}/state/from-stdio")["value"] == "hello"


@pytest.mark.anyio
async def test_mcp_requires_a_valid_key(kernel):
    async with httpx2.AsyncClient(headers={"Authorization": "Bearer bbx_wrong"}, timeout=10) as http:
        response = await http.post(
            f"{kernel.url}/mcp",
            json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
            headers={"Accept": "application/json, text/event-stream"},
        )
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"
