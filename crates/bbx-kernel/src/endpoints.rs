//! Endpoints: the kernel's own (deciding held ops) and its components', each served
//! by the front ends from its description alone (see [`bbx_component::Endpoint`]).

use super::*;
use bbx_component::Endpoint;
use serde::Deserialize;

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Approve {
    /// The id of an op waiting for approval (`pending_approval`).
    op_id: String,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Deny {
    /// The id of an op waiting for approval (`pending_approval`).
    op_id: String,
    /// Why it is denied: it ends with `policy_denied` saying so.
    reason: String,
}

/// An endpoint that takes no input.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Verify {
    /// An access token the kernel issued.
    token: String,
}

impl Kernel {
    /// The kernel's endpoints, then every component's; refused if two share a name.
    pub(crate) fn collect_endpoints(self: &Arc<Self>) -> Result<Vec<Endpoint>> {
        let approve = {
            let kernel = Arc::downgrade(self);
            Endpoint::new(
                "ring.approve",
                ("POST", "/v1/ops/{op_id}/approve"),
                "Approve an op held for approval (state pending_approval): it then runs.",
                move |caller: Caller, args: Approve| {
                    let kernel = kernel.clone();
                    async move { live(&kernel)?.approve_op(&caller, &args.op_id.parse()?).await }
                },
            )
        };
        let deny = {
            let kernel = Arc::downgrade(self);
            Endpoint::new(
                "ring.deny",
                ("POST", "/v1/ops/{op_id}/deny"),
                "Deny an op held for approval (state pending_approval): it ends with the error policy_denied, naming the reason.",
                move |caller: Caller, args: Deny| {
                    let kernel = kernel.clone();
                    async move {
                        live(&kernel)?
                            .deny_op(&caller, &args.op_id.parse()?, &args.reason)
                            .await
                    }
                },
            )
        };
        let create_token = {
            let kernel = Arc::downgrade(self);
            Endpoint::new(
                "auth.create_token",
                ("POST", "/v1/auth/tokens"),
                "Issue a short-lived access token (a JWT the kernel signs) for an identity, with a tenant, a role and optionally one agent.",
                move |caller: Caller, req: CreateToken| {
                    let kernel = kernel.clone();
                    async move { live(&kernel)?.create_token(&caller, req) }
                },
            )
        };
        let verify = {
            let kernel = Arc::downgrade(self);
            Endpoint::new(
                "auth.verify",
                ("POST", "/v1/auth/verify"),
                "Check a token: whether the kernel signed it and it has not expired, with its claims or why not.",
                move |_: Caller, args: Verify| {
                    let kernel = kernel.clone();
                    async move { Ok(live(&kernel)?.verify_token(&args.token)) }
                },
            )
        };
        let create_api_key = {
            let kernel = Arc::downgrade(self);
            Endpoint::new(
                "auth.create_api_key",
                ("POST", "/v1/auth/keys"),
                "Create an API key with a role (admin, tenant_admin, operator, agent, reader); its secret is shown once.",
                move |caller: Caller, req: bbx_core::model::CreateApiKey| {
                    let kernel = kernel.clone();
                    async move { live(&kernel)?.create_key(&caller, req).await }
                },
            )
        };
        let rules = Endpoint::new(
            "auth.rules",
            ("GET", "/v1/auth/rules"),
            "The authorization rules in force: what each role may do, and the rule for other tenants.",
            |caller: Caller, _: NoArgs| async move {
                caller.may(Action::Read)?;
                Ok(bbx_auth::rules())
            },
        );
        let audit = {
            let kernel = Arc::downgrade(self);
            Endpoint::new(
                "auth.audit",
                ("POST", "/v1/auth/audit"),
                "The audit log: failed authentications, denials and credential changes, oldest first, filtered by kind, tenant and time.",
                move |caller: Caller, query: AuditQuery| {
                    let kernel = kernel.clone();
                    async move { Ok(serde_json::json!({ "events": live(&kernel)?.audit_events(&caller, &query)? })) }
                },
            )
        };
        let mut all = vec![approve, deny, create_token, verify, create_api_key, rules, audit];
        for endpoint in self.components.endpoints(&self.context) {
            if all.iter().any(|known| known.info.name == endpoint.info.name) {
                return Err(Error::internal(format!(
                    "two endpoints are named {}",
                    endpoint.info.name
                )));
            }
            all.push(endpoint);
        }
        Ok(all)
    }

    /// Every endpoint clients may call.
    pub fn endpoints(&self) -> Vec<bbx_core::model::EndpointInfo> {
        self.endpoints
            .get()
            .map_or_else(Vec::new, |all| all.iter().map(|e| e.info.clone()).collect())
    }

    /// Calls the endpoint `name` as `caller`.
    pub async fn call_endpoint(
        &self,
        caller: &Caller,
        name: &str,
        input: serde_json::Value,
    ) -> Result<serde_json::Value> {
        let endpoint = self
            .endpoints
            .get()
            .and_then(|all| all.iter().find(|e| e.info.name == name))
            .ok_or_else(|| Error::not_found("endpoint", name))?;
        (endpoint.handler)(caller.clone(), input).await
    }
}

/// The kernel behind a weak reference, while it runs.
fn live(kernel: &std::sync::Weak<Kernel>) -> Result<Arc<Kernel>> {
    kernel
        .upgrade()
        .ok_or_else(|| Error::unavailable("the kernel is shutting down"))
}
