//! Endpoints: the kernel's own (deciding held ops) and its components', each served
//! by the front ends from its description alone (see [`bbx_component::Endpoint`]).

use super::*;
use bbx_auth::secrets::SetSecret;
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

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct SetPolicy {
    /// The policy's name.
    name: String,
    /// Rego in a package under `bbx.authz`, with a `deny` set of reasons.
    source: String,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct PolicyName {
    /// The policy's name.
    name: String,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct SecretName {
    name: String,
    /// The tenant [default: the caller's].
    #[serde(default)]
    tenant: Option<String>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct BindSecret {
    name: String,
    #[serde(default)]
    tenant: Option<String>,
    /// The hosts it may be sent to, in place of those it had.
    hosts: Vec<String>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct TenantOnly {
    /// The tenant [default: the caller's].
    #[serde(default)]
    tenant: Option<String>,
}

impl Kernel {
    /// The kernel's endpoints, then every component's; refused if two share a name.
    pub(crate) fn collect_endpoints(self: &Arc<Self>) -> Result<Vec<Endpoint>> {
        // FlowIntegrity holds ops for approval: `flow.approve|deny` are the
        // ring's, under its names.
        let approve = |name, path| {
            self.endpoint(
                name,
                ("POST", path),
                "Approve an op held for approval (state pending_approval): it then runs.",
                |kernel, caller, args: Approve| async move { kernel.approve_op(&caller, &args.op_id.parse()?).await },
            )
        };
        let deny = |name, path| {
            self.endpoint(
                name,
                ("POST", path),
                "Deny an op held for approval (state pending_approval): it ends with the error policy_denied, naming the reason.",
                |kernel, caller, args: Deny| async move {
                    kernel.deny_op(&caller, &args.op_id.parse()?, &args.reason).await
                },
            )
        };
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
        let rules = self.endpoint(
            "auth.rules",
            ("GET", "/v1/auth/rules"),
            "The authorization rules in force: what each role may do, the rule for other tenants, and the custom policies (their Rego source for administrators).",
            |kernel, caller, _: NoArgs| async move { kernel.auth_rules(&caller) },
        );
        let set_policy = self.endpoint(
            "auth.set_policy",
            ("PUT", "/v1/auth/policies/{name}"),
            "Add or replace a custom authorization policy (administrators): Rego in a package under bbx.authz whose deny set names reasons to refuse a request. One that fails to parse or to decide is refused and the policies in force stay.",
            |kernel, caller, args: SetPolicy| async move { kernel.put_policy(&caller, &args.name, args.source).await },
        );
        let delete_policy = self.endpoint(
            "auth.delete_policy",
            ("DELETE", "/v1/auth/policies/{name}"),
            "Remove a custom authorization policy (administrators).",
            |kernel, caller, args: PolicyName| async move { kernel.delete_policy(&caller, &args.name).await },
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
        let set_secret = self.endpoint(
            "secrets.set",
            ("PUT", "/v1/secrets/{name}"),
            "Store a secret (an outside service's API key, a password), encrypted, for the tenant's tool ops to name as {\"$secret\": NAME}; bound to the hosts it may be sent to. Its value is never shown again.",
            |kernel, caller, req: SetSecret| async move { kernel.set_secret(&caller, req).await },
        );
        let list_secrets = self.endpoint(
            "secrets.list",
            ("GET", "/v1/secrets"),
            "The tenant's secrets: names, bound hosts and times, never values.",
            |kernel, caller, args: TenantOnly| async move { kernel.list_secrets(&caller, args.tenant) },
        );
        let bind_secret = self.endpoint(
            "secrets.bind",
            ("POST", "/v1/secrets/{name}/bind"),
            "Bind a secret to the hosts it may be sent to (names, addresses, or *.example.com), in place of those it had.",
            |kernel, caller, args: BindSecret| async move {
                kernel.bind_secret(&caller, args.tenant, &args.name, args.hosts).await
            },
        );
        let delete_secret =
            self.endpoint(
                "secrets.delete",
                ("DELETE", "/v1/secrets/{name}"),
                "Delete a secret of the tenant: tool ops that name it are refused from then on.",
                |kernel, caller, args: SecretName| async move {
                    kernel.delete_secret(&caller, args.tenant, &args.name).await
                },
            );
        let kinds = self.endpoint(
            "ring.kinds",
            ("GET", "/v1/kinds"),
            "Every op kind the kernel serves: its name, its effects (none, kernel, external) and the JSON Schema of its args.",
            |kernel, caller, _: NoArgs| async move {
                caller.may(Action::Read)?;
                let kinds: Vec<serde_json::Value> = kernel
                    .context
                    .kinds
                    .iter()
                    .map(|(kind, args)| serde_json::json!({ "name": kind.name, "effects": kind.effects, "args": args }))
                    .collect();
                Ok(serde_json::json!({ "kinds": kinds }))
            },
        );
        let mut all = vec![
            kinds,
            approve("ring.approve", "/v1/ops/{op_id}/approve"),
            deny("ring.deny", "/v1/ops/{op_id}/deny"),
            approve("flow.approve", "/v1/flow/ops/{op_id}/approve"),
            deny("flow.deny", "/v1/flow/ops/{op_id}/deny"),
            create_token,
            verify,
            revoke,
            create_api_key,
            rotate_key,
            rules,
            set_policy,
            delete_policy,
            audit,
            set_secret,
            list_secrets,
            bind_secret,
            delete_secret,
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
        let endpoint = self.authorized_endpoint(caller, name)?;
        (endpoint.handler)(caller.clone(), input).await
    }

    /// The endpoint `name`, once `caller` is authorized to call it.
    fn authorized_endpoint(&self, caller: &Caller, name: &str) -> Result<&Endpoint> {
        let endpoint = self
            .endpoints
            .get()
            .and_then(|all| all.iter().find(|e| e.info.name == name))
            .ok_or_else(|| Error::not_found("endpoint", name))?;
        self.authorize(caller, &bbx_auth::Access::new(name, None, caller.tenant.as_deref()))?;
        Ok(endpoint)
    }

    /// Opens a streaming endpoint as `caller`: its events, until it ends them or
    /// the receiver is dropped.
    pub async fn stream_endpoint(
        &self,
        caller: &Caller,
        name: &str,
        input: serde_json::Value,
    ) -> Result<bbx_component::Events> {
        let endpoint = self.authorized_endpoint(caller, name)?;
        let stream = endpoint
            .stream
            .as_ref()
            .ok_or_else(|| Error::not_found("streaming endpoint", name))?;
        stream(caller.clone(), input).await
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
