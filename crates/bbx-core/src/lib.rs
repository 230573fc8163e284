//! The vocabulary every BBX crate shares, and nothing else.
//!
//! `bbx-core` sits at the bottom of the workspace: it owns the identifiers of kernel
//! objects ([`AgentId`], [`KeyId`]), the request and response types of the kernel's
//! API ([`model`], [`op`], [`quota`]), the one error type that crosses every boundary ([`Error`], which
//! renders to the `{"error": {"code", "message", "details"}}` shape), the validation
//! rules for names and keys ([`validate`]), the compact binary form of a completion
//! ([`compact`]), the kernel's configuration ([`config`]),
//! and the [`AgentApi`] trait that the kernel and the HTTP client both implement so
//! that front ends such as the MCP server are written once. It performs no I/O
//! besides reading a configuration file.

pub mod api;
pub mod compact;
pub mod config;
pub mod error;
pub mod ids;
pub mod model;
pub mod op;
pub mod quota;
pub mod validate;

pub use api::{AgentApi, AgentsApi, EndpointsApi, QuotaApi, RingApi};
pub use error::{Error, ErrorBody, ErrorCode, Result};
pub use ids::{AgentId, KeyId, OpId};
