"""An MCP server for BBX's tests, on the official Python SDK.

`record(text)` appends the text and the idempotency key it received in `_meta` to
the log file given as the first argument; `fail()` always reports an error.
With a second argument (a port) it serves streamable HTTP on 127.0.0.1, else stdio.
"""

import json
import sys

from mcp.server.mcpserver import Context, MCPServer

server = MCPServer("bbx-test")


def idempotency_key(ctx: Context):
    meta = ctx.request_context.meta
    if meta is None:
        return None
    if isinstance(meta, dict):
        return meta.get("idempotencyKey")
    extra = getattr(meta, "model_extra", None) or {}
    return extra.get("idempotencyKey", getattr(meta, "idempotencyKey", None))


@server.tool()
def record(text: str, ctx: Context) -> str:
    with open(sys.argv[1], "a") as log:
        log.write(json.dumps({"text": text, "key": idempotency_key(ctx)}) + "\n")
    return f"recorded {text}"


@server.tool()
def fail() -> str:
    raise ValueError("scripted failure")


if __name__ == "__main__":
    if len(sys.argv) > 2:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run("stdio")
