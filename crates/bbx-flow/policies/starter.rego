# A starter flow policy: outbound requests whose destination or payload came from
# outside content are blocked, and commands built from it wait for an operator.
# Load it with: bbx flow policies add starter crates/bbx-flow/policies/starter.rego
package bbx.flow

kinds := {"tool.http", "tool.shell", "tool.mcp"}

egress_paths := {"/url", "/body"}

decision := {"action": "block", "reason": "the request's destination or payload came from untrusted content"} if {
    input.op.kind in {"tool.http", "tool.mcp"}
    some t in input.tainted
    t.path in egress_paths
} else := {"action": "require_approval", "reason": "a command built from untrusted content"} if {
    input.op.kind == "tool.shell"
    count(input.tainted) > 0
}
