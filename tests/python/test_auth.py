"""The kernel's access tokens checked by a JWT library nobody here wrote (PyJWT),
with nothing but the published JWKS; and a token as the bearer of an MCP session."""

import json
import urllib.request

import anyio
import httpx2
import jwt
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client


def post(kernel, path, body, bearer):
    request = urllib.request.Request(
        f"{kernel.url}{path}",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def test_pyjwt_verifies_tokens_with_the_published_jwks(kernel):
    issued = post(kernel, "/v1/auth/tokens", {"identity": "svc", "tenant": "acme", "role": "operator"}, kernel.key)
    with urllib.request.urlopen(f"{kernel.url}/.well-known/jwks.json", timeout=10) as response:
        jwks = json.load(response)
    header = jwt.get_unverified_header(issued["token"])
    key = next(jwt.PyJWK(k) for k in jwks["keys"] if k["kid"] == header["kid"])
    claims = jwt.decode(issued["token"], key.key, algorithms=["EdDSA"], issuer="bbx")
    assert claims["sub"] == "svc" and claims["tenant"] == "acme" and claims["roles"] == ["operator"]
    with pytest.raises(jwt.InvalidSignatureError):
        head, signature = issued["token"].rsplit(".", 1)
        flipped = ("B" if signature[0] == "A" else "A") + signature[1:]
        jwt.decode(f"{head}.{flipped}", key.key, algorithms=["EdDSA"], issuer="bbx")


@pytest.mark.anyio
async def test_a_token_is_the_bearer_of_an_mcp_session(kernel):
    issued = post(kernel, "/v1/auth/tokens", {"identity": "agent-ui", "tenant": "acme", "role": "reader"}, kernel.key)
    headers = {"Authorization": f"Bearer {issued['token']}"}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        async with streamable_http_client(f"{kernel.url}/mcp", http_client=http) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                status = await session.call_tool("bbx_status", {})
                assert not status.is_error, status.content
                # A reader's token reads, and is refused what its role forbids.
                denied = await session.call_tool("agent_create", {"name": "x"})
                assert denied.is_error
                assert denied.structured_content["error"]["code"] == "permission_denied"
    # The refusal is in the audit log, as every entry point's are.
    for _ in range(50):
        events = post(kernel, "/v1/auth/audit", {"kind": "denied"}, kernel.key)["events"]
        if any(e["what"] == "mcp agent_create" for e in events):
            break
        await anyio.sleep(0.1)
    else:
        pytest.fail(f"no audited MCP denial in {events}")
