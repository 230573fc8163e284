//! Turning every failure, including axum's own rejections, into the one error shape.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bbx_core::{Error, ErrorCode};

/// An [`Error`] on its way out as `{"error": {...}}` with the status its code fits.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        Self(e)
    }
}

/// Why a request was refused with 403, kept on its response for the audit log.
#[derive(Clone)]
pub struct Denial(pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let unauthenticated = self.0.code == ErrorCode::Unauthenticated;
        // Retry-After is in whole seconds; round up so that a client honoring it
        // never comes back early.
        let retry_after = self.0.retry_after().map(|d| d.as_millis().div_ceil(1000).max(1));
        let denial = (self.0.code == ErrorCode::PermissionDenied).then(|| Denial(self.0.message.clone()));
        let mut response = (status, axum::Json(self.0.into_body())).into_response();
        // For the audit: why a request was denied (see `audit_denials`).
        if let Some(denial) = denial {
            response.extensions_mut().insert(denial);
        }
        if unauthenticated {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds as u64));
        }
        response
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let text = rejection.body_text();
        Self(match rejection {
            JsonRejection::JsonSyntaxError(_) => Error::malformed(format!("the body is not valid JSON: {text}")),
            JsonRejection::JsonDataError(_) => Error::new(ErrorCode::InvalidArgument, text),
            JsonRejection::MissingJsonContentType(_) => Error::new(
                ErrorCode::UnsupportedMediaType,
                "the body must be JSON, sent with Content-Type: application/json",
            ),
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => Error::new(
                ErrorCode::PayloadTooLarge,
                "the request body is larger than the kernel accepts",
            ),
            _ => Error::malformed(text),
        })
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self(Error::new(ErrorCode::InvalidArgument, rejection.body_text()))
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self(Error::malformed(rejection.body_text()))
    }
}

/// `Json<T>` whose rejections use the API's error shape.
#[derive(axum::extract::FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

impl<T: serde::Serialize> IntoResponse for ApiJson<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `Query<T>` whose rejections use the API's error shape.
#[derive(axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// `Path<T>` whose rejections use the API's error shape.
#[derive(axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);
