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
        if endpoint.streams {
            let described = Arc::new(endpoint.clone());
            let handler =
                move |State(kernel): State<Arc<Kernel>>, Extension(caller): Extension<Caller>, uri: axum::http::Uri| {
                    stream(kernel, caller, described.clone(), uri)
                };
            router = router.route(&endpoint.path, axum::routing::get(handler));
            openapi
                .paths
                .add_path_operation(&endpoint.path, vec![method], operation(endpoint));
            continue;
        }
        let (name, pattern, schema) = (endpoint.name.clone(), endpoint.path.clone(), endpoint.input.clone());
        let handler = move |State(kernel): State<Arc<Kernel>>,
                            Extension(caller): Extension<Caller>,
                            uri: axum::http::Uri,
                            body: axum::body::Bytes| {
            let name = name.clone();
            let fields = path_fields(&pattern, uri.path());
            let query = query_input(&schema, uri.query().unwrap_or_default());
            async move {
                let input = input(fields?, query, &body)?;
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

/// A streaming endpoint's answer: its input from the path and the query string,
/// its events as server-sent events (`event: message`, the data JSON, the id a
/// delivery's `ack` where there is one).
async fn stream(
    kernel: Arc<Kernel>,
    caller: Caller,
    endpoint: Arc<EndpointInfo>,
    uri: axum::http::Uri,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    use axum::response::sse::{Event, KeepAlive, Sse};
    let opened = async {
        let mut input = query_input(&endpoint.input, uri.query().unwrap_or_default());
        let fields = path_fields(&endpoint.path, uri.path())?;
        input.extend(fields.into_iter().map(|(k, v)| (k, Value::String(v))));
        Ok::<_, ApiError>(
            kernel
                .stream_endpoint(&caller, &endpoint.name, Value::Object(input))
                .await?,
        )
    };
    match opened.await {
        Ok(events) => {
            let stream = futures::stream::unfold(events, |mut events| async move {
                let value = events.recv().await?;
                let mut event = Event::default().event("message").data(value.to_string());
                if let Some(id) = value.get("ack").and_then(Value::as_str) {
                    event = event.id(id);
                }
                Some((Ok::<_, std::convert::Infallible>(event), events))
            });
            Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
        }
        Err(error) => error.into_response(),
    }
}

/// A query string as input fields: a value is text where the input's schema says
/// the field is a string, else JSON where it reads as JSON.
fn query_input(schema: &Value, query: &str) -> Map<String, Value> {
    url::form_urlencoded::parse(query.as_bytes())
        .map(|(field, value)| {
            let text = match schema.pointer(&format!("/properties/{field}/type")) {
                Some(Value::String(only)) => only == "string",
                Some(Value::Array(types)) => types.iter().all(|t| t == "string" || t == "null"),
                _ => false,
            };
            let value = match text {
                true => Value::String(value.into_owned()),
                false => serde_json::from_str(&value).unwrap_or_else(|_| Value::String(value.into_owned())),
            };
            (field.into_owned(), value)
        })
        .collect()
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

/// The path's fields over a body that is empty or a JSON object, over the
/// query string's fields.
fn input(fields: HashMap<String, String>, query: Map<String, Value>, body: &[u8]) -> Result<Value, ApiError> {
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
    for (field, value) in query {
        input.entry(field).or_insert(value);
    }
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
