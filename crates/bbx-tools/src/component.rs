//! The tools as a component: `tool.http`, `tool.shell`, `tool.file`, `tool.mcp` and
//! `llm.chat` are tasks that run under their agent's tool settings and the process
//! limits of its quota path.

use crate::{Call, Context, Tools};
use bbx_component::{Component, OpKind, Prepared, Running, TaskContext, TaskOp};
use bbx_core::op::Effects;
use bbx_core::quota::{Node, QuotaLimits, Spend};
use bbx_core::{AgentId, Error, ErrorCode, Result};
use bbx_quota::Quotas;
use serde_json::Value;
use std::sync::Arc;

/// Each tool kind may act outside the kernel; an op says for itself whether it
/// does (reading a file does not).
const KINDS: &[OpKind] = &[
    external("tool.http"),
    external("tool.shell"),
    external("tool.file"),
    external("tool.mcp"),
    external("llm.chat"),
];

const fn external(name: &'static str) -> OpKind {
    OpKind {
        name,
        effects: Effects::External,
    }
}

/// Serves the tool kinds with `tools`, within the process limits of `quotas`.
pub struct ToolKinds {
    tools: Arc<Tools>,
    quotas: Arc<Quotas>,
}

impl ToolKinds {
    pub fn new(tools: Arc<Tools>, quotas: Arc<Quotas>) -> Self {
        Self { tools, quotas }
    }
}

impl Component for ToolKinds {
    fn name(&self) -> &'static str {
        "tools"
    }

    fn kinds(&self) -> &'static [OpKind] {
        KINDS
    }

    fn args_schema(&self, kind: &str) -> Option<Value> {
        let schema = match kind {
            "tool.http" => schemars::schema_for!(crate::http::HttpCall),
            "tool.shell" => schemars::schema_for!(crate::shell::ShellCall),
            "tool.file" => schemars::schema_for!(crate::file::FileCall),
            "tool.mcp" => schemars::schema_for!(crate::mcp::McpCall),
            "llm.chat" => schemars::schema_for!(crate::llm::LlmCall),
            _ => return None,
        };
        serde_json::to_value(schema).ok()
    }

    /// Removes the agent's workspace, on a blocking thread: it may hold many files.
    fn agent_deleted(&self, ctx: &bbx_component::Context, agent: AgentId) {
        let tools = self.tools.clone();
        ctx.tasks.spawn_blocking(move || tools.remove_workspace(&agent));
    }

    fn prepare(&self, kind: &str, args: &Value) -> Result<Prepared> {
        let call = Call::parse(kind, args)
            .ok_or_else(|| Error::new(ErrorCode::Internal, format!("{kind} is not a tool")))??;
        Ok(Prepared::Task(Arc::new(ToolTask {
            call,
            tools: self.tools.clone(),
            quotas: self.quotas.clone(),
        })))
    }
}

struct ToolTask {
    call: Call,
    tools: Arc<Tools>,
    quotas: Arc<Quotas>,
}

impl std::fmt::Debug for ToolTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolTask")
            .field("call", &self.call)
            .finish_non_exhaustive()
    }
}

impl ToolTask {
    /// What the tool needs to know of its agent: its tool settings, and the
    /// process limits of the agent within its group's and its tenant's.
    fn context(&self, ctx: &TaskContext<'_>) -> Result<Context> {
        let agent = bbx_agents::stored_agent(ctx.store, &ctx.agent)?;
        let own = self.quotas.limits(&Node::Agent(ctx.agent));
        let group = own.group.as_ref().map_or_else(QuotaLimits::default, |name| {
            self.quotas.limits(&Node::Group {
                tenant: ctx.tenant.to_owned(),
                name: name.clone(),
            })
        });
        let limits = own
            .process_limits(&group)
            .within(&self.quotas.limits(&Node::Tenant(ctx.tenant.to_owned())));
        Ok(Context {
            op_id: ctx.op_id,
            agent: ctx.agent,
            tenant: ctx.tenant.to_owned(),
            idempotency_key: ctx.idempotency_key.map(str::to_owned),
            settings: agent.tools,
            limits,
        })
    }
}

impl TaskOp for ToolTask {
    fn effects(&self) -> Effects {
        if self.call.has_external_effects() {
            Effects::External
        } else {
            Effects::None
        }
    }

    fn remote_host(&self) -> Option<String> {
        self.call.remote_host()
    }

    fn max_spend(&self) -> Spend {
        self.tools.max_spend(&self.call)
    }

    fn spent(&self, result: &Value) -> Spend {
        Tools::spent(result)
    }

    fn run<'a>(&'a self, ctx: &'a TaskContext<'a>) -> Running<'a> {
        Box::pin(async move {
            let context = self.context(ctx)?;
            self.tools.run(&self.call, &context).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ToolsConfig;
    use serde_json::json;

    fn kinds(dir: &std::path::Path) -> ToolKinds {
        let config = ToolsConfig {
            workspaces: dir.join("workspaces"),
            run_as: (65534, 65534),
            unsandboxed_shell: false,
            llm: Default::default(),
            mcp: Default::default(),
        };
        let scope = format!("bbx-test-{}", bbx_core::OpId::generate());
        let tools = Tools::new(config, bbx_quota::cgroup::detect(&scope)).unwrap();
        ToolKinds::new(Arc::new(tools), Arc::new(Quotas::new()))
    }

    fn task(kinds: &ToolKinds, kind: &str, args: Value) -> Result<Arc<dyn TaskOp>> {
        match kinds.prepare(kind, &args)? {
            Prepared::Task(task) => Ok(task),
            other => panic!("{kind} prepared {other:?}"),
        }
    }

    #[test]
    fn each_op_says_whether_it_acts_outside_and_where() {
        let dir = tempfile::tempdir().unwrap();
        let kinds = kinds(dir.path());
        let read = task(&kinds, "tool.file", json!({"op": "read", "path": "a"})).unwrap();
        assert_eq!(read.effects(), Effects::None);
        let write = task(&kinds, "tool.file", json!({"op": "write", "path": "a", "content": "x"})).unwrap();
        assert_eq!(write.effects(), Effects::External);
        let http = task(&kinds, "tool.http", json!({"url": "http://example.com:8080/x"})).unwrap();
        assert_eq!(http.effects(), Effects::External);
        assert_eq!(http.remote_host().as_deref(), Some("example.com:8080"));
        // A path outside the workspace is the sandbox's to refuse when the op runs
        // (it completes with path_outside_workspace); malformed arguments are refused now.
        assert!(task(&kinds, "tool.file", json!({"op": "read", "path": "/etc/passwd"})).is_ok());
        for (kind, bad) in [
            ("tool.file", json!({"op": "chmod", "path": "a"})),
            ("tool.shell", json!({"args": ["x"]})),
            ("tool.http", json!({})),
        ] {
            let refused = task(&kinds, kind, bad).unwrap_err();
            assert_eq!(refused.code, ErrorCode::InvalidArgument, "{kind}");
        }
    }

    /// The published schema of each kind agrees with what `prepare` accepts: a
    /// valid call passes both, a wrong type, a missing field or an unknown one
    /// fails both.
    #[test]
    fn each_kinds_published_schema_agrees_with_what_it_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let kinds = kinds(dir.path());
        let cases = [
            (
                "tool.http",
                json!({"url": "https://example.com/", "headers": {"a": "b", "c": {"$secret": "s"}}}),
            ),
            ("tool.shell", json!({"program": "ls", "args": ["-l"], "timeout_ms": 5})),
            ("tool.file", json!({"op": "write", "path": "a", "content": "x"})),
            ("tool.mcp", json!({"server": "s", "tool": "t", "arguments": {"x": 1}})),
            (
                "llm.chat",
                json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}),
            ),
        ];
        for (kind, good) in cases {
            let schema = kinds
                .args_schema(kind)
                .unwrap_or_else(|| panic!("{kind} publishes a schema"));
            let validator = jsonschema::validator_for(&schema).unwrap();
            assert!(validator.is_valid(&good), "{kind}: {good}");
            assert!(kinds.prepare(kind, &good).is_ok(), "{kind}");
            let mut unknown = good.clone();
            unknown["nonsense"] = json!(1);
            let mut missing = good.clone();
            let first_required = schema["required"][0].as_str().unwrap().to_owned();
            missing.as_object_mut().unwrap().remove(&first_required);
            let mut mistyped = good.clone();
            mistyped[&first_required] = json!([1, 2]);
            for bad in [unknown, missing, mistyped] {
                assert!(!validator.is_valid(&bad), "{kind}: {bad}");
                assert!(kinds.prepare(kind, &bad).is_err(), "{kind}: {bad}");
            }
        }
    }
}
