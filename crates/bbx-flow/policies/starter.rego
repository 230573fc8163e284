# A starter flow policy against prompt injection. Content an agent read from
# outside (pages, files, tool and model output) may not choose where its data
# goes: a request that sends data (a method other than GET or HEAD, or a body) to
# a destination, or with a payload or headers, that came from untrusted content
# is blocked; following a link from such content only reads, and is recorded
# (warn). An MCP call built from untrusted content is blocked, and a shell
# command built from it waits for an operator.
# Load it with: bbx flow policies add starter crates/bbx-flow/policies/starter.rego
package bbx.flow

kinds := {"tool.http", "tool.mcp", "tool.shell"}

egress_prefixes := {"/url", "/body", "/headers"}

tainted_egress if {
    some t in input.tainted
    some prefix in egress_prefixes
    startswith(t.path, prefix)
}

sends_data if upper(object.get(input.op.args, "method", "GET")) != "GET"

sends_data if input.op.args.body

decision := {"action": "block", "reason": "data would go where untrusted content pointed"} if {
    input.op.kind == "tool.http"
    sends_data
    tainted_egress
} else := {"action": "block", "reason": "an MCP call built from untrusted content"} if {
    input.op.kind == "tool.mcp"
    count(input.tainted) > 0
} else := {"action": "require_approval", "reason": "a command built from untrusted content"} if {
    input.op.kind == "tool.shell"
    count(input.tainted) > 0
} else := {"action": "warn", "reason": "following a link from untrusted content"} if {
    input.op.kind == "tool.http"
    tainted_egress
}
