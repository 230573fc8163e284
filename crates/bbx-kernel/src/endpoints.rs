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

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Rotate {
    /// The id of the key to rotate.
    key_id: String,
    /// How long the old key keeps working, in seconds (at most 30 days).
    #[serde(default)]
    grace_secs: Option<u64>,
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
        let approve = self.endpoint(
            "ring.approve",
            ("POST", "/v1/ops/{op_id}/approve"),
            "Approve an op held for approval (state pending_approval): it then runs.",
            |kernel, caller, args: Approve| async move { kernel.approve_op(&caller, &args.op_id.parse()?).await },
        );
        let deny = self.endpoint(
            "ring.deny",
            ("POST", "/v1/ops/{op_id}/deny"),
            "Deny an op held for approval (state pending_approval): it ends with the error policy_denied, naming the reason.",
            |kernel, caller, args: Deny| async move {
                kernel.deny_op(&caller, &args.op_id.parse()?, &args.reason).await
            },
        );
        let create_token = self.endpoint(
            "auth.create_token",
            ("POST", "/v1/auth/tokens"),
            "Issue a short-lived access token (a JWT the kernel signs) for an identity, with a tenant, a role and optionally one agent.",
            |kernel, caller, req: CreateToken| async move { kernel.create_token(&caller, req) },
        );
        let verify = self.endpoint(
            "auth.verify",
            ("POST", "/v1/auth/verify"),
            "Check a token: whether the kernel signed it and it has not expired, with its claims or why not.",
            |kernel, _, args: Verify| async move { Ok(kernel.verify_token(&args.token)) },
        );
        let create_api_key = self.endpoint(
            "auth.create_api_key",
            ("POST", "/v1/auth/keys"),
            "Create an API key with a role (admin, tenant_admin, operator, agent, reader); its secret is shown once.",
            |kernel, caller, req: bbx_core::model::CreateApiKey| async move { kernel.create_key(&caller, req).await },
        );
        let rules = Endpoint::new(
            "auth.rules",
            ("GET", "/v1/auth/rules"),
            "The authorization rules in force: what each role may do, and the rule for other tenants.",
            |caller: Caller, _: NoArgs| async move {
                caller.may(Action::Read)?;
                Ok(bbx_auth::rules())
            },
        );
        let audit = self.endpoint(
            "auth.audit",
            ("POST", "/v1/auth/audit"),
            "The audit log: failed authentications, denials and credential changes, oldest first, filtered by kind, tenant and time.",
            |kernel, caller, query: AuditQuery| async move {
                Ok(serde_json::json!({ "events": kernel.audit_events(&caller, &query)? }))
            },
        );
        let revoke = self.endpoint(
            "auth.revoke",
            ("POST", "/v1/auth/revoke"),
            "Revoke an access token until it expires: its own bearer may, or whoever manages its tenant's keys.",
            |kernel, caller, args: Verify| async move { kernel.revoke_token(&caller, &args.token).await },
        );
        let rotate_key = self.endpoint(
            "auth.rotate_key",
            ("POST", "/v1/keys/{key_id}/rotate"),
            "Rotate an API key: a new key with the same role and tenant; the old one keeps working for grace_secs (a day by default), then expires.",
            |kernel, caller, args: Rotate| async move {
                kernel.rotate_key(&caller, &args.key_id.parse()?, args.grace_secs).await
            },
        );
        let mut all = vec![
            approve,
            deny,
            create_token,
            verify,
            revoke,
            create_api_key,
            rotate_key,
            rules,
            audit,
        ];
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

impl Kernel {
    /// An endpoint that `call`s the kernel, held weakly (the kernel holds its
    /// endpoints), as the caller.
    fn endpoint<I, O, F, Fut>(
        self: &Arc<Self>,
        name: &'static str,
        route: (&'static str, &'static str),
        description: &'static str,
        call: F,
    ) -> Endpoint
    where
        I: serde::de::DeserializeOwned + schemars::JsonSchema + Send + 'static,
        O: serde::Serialize,
        F: Fn(Arc<Kernel>, Caller, I) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<O>> + Send + 'static,
    {
        let kernel = Arc::downgrade(self);
        let call = Arc::new(call);
        Endpoint::new(name, route, description, move |caller: Caller, input: I| {
            let (kernel, call) = (kernel.upgrade(), call.clone());
            async move {
                let kernel = kernel.ok_or_else(|| Error::unavailable("the kernel is shutting down"))?;
                call(kernel, caller, input).await
            }
        })
    }
}
