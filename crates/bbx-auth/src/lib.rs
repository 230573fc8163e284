//! Auth: who is calling, and the API keys that say so.
//!
//! Every entry point (HTTP, MCP, shared memory, the CLI through HTTP) turns a
//! credential into a [`Caller`] once, here, and every kernel operation takes it:
//! tenant confinement is enforced in one place, not in each front end. The rule
//! for every entry point: a bad or missing credential is 401; an action the
//! caller's role forbids in its own tenant is 403 ([`Caller::may`],
//! [`Caller::check_tenant`], [`Caller::check_agent`]); an object of another tenant
//! is 404, answered exactly as one that does not exist ([`Caller::check_owner`]).
//!
//! A credential has a [`Role`]: `admin` (every tenant), `tenant_admin`,
//! `operator`, `agent` (one agent's own ops and state) or `reader`, and may be
//! confined to one agent.
//!
//! Access tokens ([`tokens`]) are JWTs the kernel signs with its own Ed25519 keys,
//! accepted wherever a key is.
//!
//! API keys ([`keys`]) are minted once, stored only as a SHA-256 digest (in the
//! `api_keys` keyspace, through the store's group commit) and checked in constant
//! time; on first start the kernel mints an administrator key into
//! `DATA_DIR/admin.key` (mode 0600).

pub mod abac;
pub mod audit;
mod caller;
pub mod keyring;
pub mod keys;
pub mod oidc;
pub mod rego;
pub mod secrets;
mod throttle;
pub mod tokens;

pub use abac::{AUTH_POLICIES, Access, Policies, StoredPolicy};
pub use audit::{AUDIT, AuditEvent, AuditKind, AuditQuery};
pub use bbx_core::model::Role;
pub use caller::{Action, Caller, rules};
pub use keyring::{KeyRing, StoredKey, mint};
pub use keys::{ADMIN_KEY_FILE, API_KEYS, Keys, grant};
pub use throttle::Throttle;
pub use tokens::{Claims, REVOKED_TOKENS, SIGNING_KEYS, Tokens};
