//! The endpoints components declare, served as HTTP routes from their descriptions
//! alone (the MCP server serves them as tools, see `mcp.rs`): the path's fields and
//! a JSON body's make one input object, handed to the kernel.

use crate::error::{ApiError, ApiJson};
use axum::Extension;
use axum::extract::State;
use axum::routing::{MethodFilter, on};
use bbx_core::model::EndpointInfo;
use bbx_core::{Error, ErrorCode};
use bbx_kernel::{Caller, Kernel};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::Arc;
use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::{ContentBuilder, ObjectBuilder, OpenApi, RefOr, Required, ResponseBuilder, Schema};

/// The routes of every endpoint the kernel serves, added to `openapi` too.
pub fn routes(endpoints: &[EndpointInfo], openapi: &mut OpenApi) -> axum::Router<Arc<Kernel>> {
    let mut router = axum::Router::new();
    for endpoint in endpoints {
        let Some((filter, method)) = method(&endpoint.method) else {
            tracing::warn!(endpoint = %endpoint.name, method = %endpoint.method, "an endpoint with an unknown method is not served");
            continue;
        };
        let (name, pattern) = (endpoint.name.clone(), endpoint.path.clone());
        let handler = move |State(kernel): State<Arc<Kernel>>,
                            Extension(caller): Extension<Caller>,
                            uri: axum::http::Uri,
                            body: axum::body::Bytes| {
            let name = name.clone();
            let fields = path_fields(&pattern, uri.path());
            async move {
                let input = input(fields?, &body)?;
                Ok::<_, ApiError>(ApiJson(kernel.call_endpoint(&caller, &name, input).await?))
            }
        };
        router = router.route(&endpoint.path, on(filter, handler));
        openapi
            .paths
            .add_path_operation(&endpoint.path, vec![method], operation(endpoint));
    }
    router
}

fn method(name: &str) -> Option<(MethodFilter, HttpMethod)> {
    Some(match name {
        "GET" => (MethodFilter::GET, HttpMethod::Get),
        "POST" => (MethodFilter::POST, HttpMethod::Post),
        "PUT" => (MethodFilter::PUT, HttpMethod::Put),
        "DELETE" => (MethodFilter::DELETE, HttpMethod::Delete),
        _ => return None,
    })
}

/// The values of the `{field}` segments of `pattern` in `path` (which the router
/// matched against it), percent-decoded.
fn path_fields(pattern: &str, path: &str) -> Result<HashMap<String, String>, ApiError> {
    let mut fields = HashMap::new();
    for (segment, value) in pattern.split('/').zip(path.split('/')) {
        if let Some(field) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            let value = percent_encoding::percent_decode_str(value)
                .decode_utf8()
                .map_err(|_| Error::invalid_field(field, "the path segment is not UTF-8"))?;
            fields.insert(field.to_owned(), value.into_owned());
        }
    }
    Ok(fields)
}

/// The path's fields over a body that is empty or a JSON object.
fn input(fields: HashMap<String, String>, body: &[u8]) -> Result<Value, ApiError> {
    let mut input: Map<String, Value> = if body.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        match serde_json::from_slice(body) {
            Ok(Value::Object(object)) => object,
            Ok(_) => return Err(Error::invalid_field("body", "the body must be a JSON object").into()),
            Err(e) => {
                return Err(Error::new(ErrorCode::MalformedRequest, format!("the body is not valid JSON: {e}")).into());
            }
        }
    };
    for (field, value) in fields {
        input.insert(field, Value::String(value));
    }
    Ok(Value::Object(input))
}

/// The endpoint as the OpenAPI document shows it: its path fields as parameters,
/// its input schema as the body (the path fields are in it too).
fn operation(endpoint: &EndpointInfo) -> utoipa::openapi::path::Operation {
    let tag = endpoint.name.split('.').next().unwrap_or_default().to_owned();
    let mut operation = OperationBuilder::new()
        .summary(Some(endpoint.description.clone()))
        .operation_id(Some(endpoint.name.clone()))
        .tag(tag)
        .response(
            "200",
            ResponseBuilder::new().description("The endpoint's result").build(),
        );
    for segment in endpoint.path.split('/') {
        if let Some(field) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            operation = operation.parameter(
                ParameterBuilder::new()
                    .name(field)
                    .parameter_in(ParameterIn::Path)
                    .required(Required::True),
            );
        }
    }
    if endpoint.method != "GET" && endpoint.method != "DELETE" {
        let schema: RefOr<Schema> =
            serde_json::from_value(endpoint.input.clone()).unwrap_or_else(|_| ObjectBuilder::new().into());
        let content = ContentBuilder::new().schema(Some(schema)).build();
        operation = operation.request_body(Some(
            RequestBodyBuilder::new().content("application/json", content).build(),
        ));
    }
    operation.build()
}
