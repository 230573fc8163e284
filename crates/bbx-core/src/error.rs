//! The error every BBX interface speaks.
//!
//! An [`Error`] is a stable machine-readable [`ErrorCode`], one human sentence, and
//! optional structured details. It serializes to the wire shape
//! `{"error": {"code", "message", "details"}}` ([`ErrorBody`]) and parses back from
//! it, so a client sees exactly the error the kernel raised.

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Stable error codes. Their names are part of the API: clients match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request could not be parsed (malformed JSON, bad query string).
    MalformedRequest,
    /// An identifier in the request is not a valid id.
    InvalidId,
    /// A field is present but its value is not acceptable.
    InvalidArgument,
    /// No credentials, or credentials that are unknown or revoked.
    Unauthenticated,
    /// Valid credentials that may not do this.
    PermissionDenied,
    NotFound,
    /// A compare-and-swap precondition did not hold.
    VersionConflict,
    AlreadyExists,
    /// The request is valid but the system is not in a state that allows it.
    FailedPrecondition,
    /// The client does not accept any response type the endpoint can produce.
    NotAcceptable,
    PayloadTooLarge,
    UnsupportedMediaType,
    MethodNotAllowed,
    /// An op ran out of time.
    Timeout,
    /// A queue or limit is full; `details.retry_after_ms` says when to try again.
    ResourceExhausted,
    /// The kernel cannot serve the request now (shutting down, storage failed).
    Unavailable,
    Internal,
    /// A quota or budget would be exceeded; `details.limit` names it.
    QuotaExceeded,
    /// A tool's process was killed at its memory limit.
    MemoryLimit,
    /// A tool's process tree hit its limit on processes.
    PidsLimit,
    /// A tool was asked for a path outside the agent's workspace.
    PathOutsideWorkspace,
    /// A tool was asked to reach an address the agent may not reach.
    AddressNotAllowed,
    /// A tool ran and failed (a program's non-zero exit, an MCP tool's error).
    ToolFailed,
    /// The op was running when the kernel stopped, and its effect outside the
    /// kernel may or may not have happened; `bbx ring resolve` settles it.
    InDoubt,
    /// A policy refused the op, or an operator denied (or did not approve in time)
    /// an op held for approval; `details` names the policy or the hold.
    PolicyDenied,
}

impl ErrorCode {
    /// The HTTP status this code is served with.
    pub fn http_status(self) -> u16 {
        match self {
            Self::MalformedRequest | Self::InvalidId => 400,
            Self::Unauthenticated => 401,
            Self::PermissionDenied | Self::PathOutsideWorkspace | Self::AddressNotAllowed | Self::PolicyDenied => 403,
            Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::NotAcceptable => 406,
            Self::VersionConflict | Self::AlreadyExists | Self::FailedPrecondition | Self::InDoubt => 409,
            Self::PayloadTooLarge => 413,
            Self::UnsupportedMediaType => 415,
            Self::InvalidArgument | Self::MemoryLimit | Self::PidsLimit | Self::ToolFailed => 422,
            Self::ResourceExhausted | Self::QuotaExceeded => 429,
            Self::Timeout => 504,
            Self::Internal => 500,
            Self::Unavailable => 503,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::MalformedRequest => "malformed_request",
            Self::InvalidId => "invalid_id",
            Self::InvalidArgument => "invalid_argument",
            Self::Unauthenticated => "unauthenticated",
            Self::PermissionDenied => "permission_denied",
            Self::NotFound => "not_found",
            Self::VersionConflict => "version_conflict",
            Self::AlreadyExists => "already_exists",
            Self::FailedPrecondition => "failed_precondition",
            Self::NotAcceptable => "not_acceptable",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::ResourceExhausted => "resource_exhausted",
            Self::Timeout => "timeout",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
            Self::QuotaExceeded => "quota_exceeded",
            Self::MemoryLimit => "memory_limit",
            Self::PidsLimit => "pids_limit",
            Self::PathOutsideWorkspace => "path_outside_workspace",
            Self::AddressNotAllowed => "address_not_allowed",
            Self::ToolFailed => "tool_failed",
            Self::InDoubt => "in_doubt",
            Self::PolicyDenied => "policy_denied",
        }
    }
}

/// An error with a stable code, one sentence for people, and optional details.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
#[error("{message}")]
pub struct Error {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub details: Option<Value>,
}

/// The wire form of an [`Error`]: `{"error": {...}}`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: Error,
}

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            details: None,
        }
    }

    #[must_use]
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    pub fn malformed(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::MalformedRequest, message)
    }

    /// A field whose value is unacceptable; `details.field` names it.
    pub fn invalid_field(field: &str, message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message).with_details(serde_json::json!({ "field": field }))
    }

    pub fn not_found(kind: &str, id: impl std::fmt::Display) -> Self {
        let id = id.to_string();
        Self::new(ErrorCode::NotFound, format!("{kind} {id:?} does not exist"))
            .with_details(serde_json::json!({ "kind": kind, "id": id }))
    }

    pub fn unauthenticated(reason: &str, message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthenticated, message).with_details(serde_json::json!({ "reason": reason }))
    }

    pub fn permission_denied(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::PermissionDenied, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }

    /// A full queue or exhausted limit, to be retried after `retry_after`.
    pub fn resource_exhausted(message: impl Into<String>, retry_after: std::time::Duration) -> Self {
        Self::new(ErrorCode::ResourceExhausted, message)
            .with_details(serde_json::json!({ "retry_after_ms": retry_after.as_millis() as u64 }))
    }

    /// When a `resource_exhausted` error says to retry.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        let ms = self.details.as_ref()?.get("retry_after_ms")?.as_u64()?;
        Some(std::time::Duration::from_millis(ms))
    }

    pub fn http_status(&self) -> u16 {
        self.code.http_status()
    }

    pub fn into_body(self) -> ErrorBody {
        ErrorBody { error: self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_round_trips_through_its_wire_shape() {
        let err = Error::invalid_field("name", "name must not be empty");
        let wire = serde_json::to_value(err.clone().into_body()).unwrap();
        assert_eq!(wire["error"]["code"], "invalid_argument");
        assert_eq!(wire["error"]["details"]["field"], "name");
        let back: ErrorBody = serde_json::from_value(wire).unwrap();
        assert_eq!(back.error, err);
    }

    #[test]
    fn code_names_match_their_serde_names() {
        for code in [
            ErrorCode::MalformedRequest,
            ErrorCode::InvalidId,
            ErrorCode::InvalidArgument,
            ErrorCode::Unauthenticated,
            ErrorCode::PermissionDenied,
            ErrorCode::NotFound,
            ErrorCode::VersionConflict,
            ErrorCode::AlreadyExists,
            ErrorCode::FailedPrecondition,
            ErrorCode::NotAcceptable,
            ErrorCode::PayloadTooLarge,
            ErrorCode::UnsupportedMediaType,
            ErrorCode::MethodNotAllowed,
            ErrorCode::ResourceExhausted,
            ErrorCode::Timeout,
            ErrorCode::Unavailable,
            ErrorCode::Internal,
            ErrorCode::QuotaExceeded,
            ErrorCode::MemoryLimit,
            ErrorCode::PidsLimit,
            ErrorCode::PathOutsideWorkspace,
            ErrorCode::AddressNotAllowed,
            ErrorCode::ToolFailed,
            ErrorCode::InDoubt,
            ErrorCode::PolicyDenied,
        ] {
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
        }
    }
}
