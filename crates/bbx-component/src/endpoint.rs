//! Endpoints: the operations a component offers to clients, described once
//! and served by the server as HTTP routes and MCP tools, and by the CLI.

use crate::{Pending, parse_args};
use bbx_auth::Caller;
use bbx_core::{Error, Result};
use serde_json::Value;
use std::future::Future;
use std::sync::Arc;

/// Serves one call of an endpoint: the caller, and the input (an object of the
/// path's fields and the body's).
pub type Handler = Arc<dyn Fn(Caller, Value) -> Pending<'static, Value> + Send + Sync>;

/// What a streaming endpoint answers: events, until its sender ends them or the
/// client goes (the receiver is dropped).
pub type Events = tokio::sync::mpsc::Receiver<Value>;

/// Serves one call of a streaming endpoint.
pub type StreamHandler = Arc<dyn Fn(Caller, Value) -> Pending<'static, Events> + Send + Sync>;

/// An operation a component offers to clients, described once: the server serves
/// it as an HTTP route (in the OpenAPI document) and an MCP tool, and the CLI as a
/// command, without knowing it. A streaming one is served as server-sent events
/// (and is no MCP tool).
#[derive(Clone)]
pub struct Endpoint {
    pub info: bbx_core::model::EndpointInfo,
    pub handler: Handler,
    pub stream: Option<StreamHandler>,
}

impl Endpoint {
    /// [`Endpoint::new`] whose handler is `call` on a clone of `on` (the
    /// component, say) for each request.
    pub fn serving<S, I, O, F, Fut>(
        on: &S,
        name: &'static str,
        route: (&'static str, &'static str),
        description: &'static str,
        call: F,
    ) -> Self
    where
        S: Clone + Send + Sync + 'static,
        I: serde::de::DeserializeOwned + schemars::JsonSchema,
        O: serde::Serialize,
        F: Fn(S, Caller, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O>> + Send + 'static,
    {
        let on = on.clone();
        Self::new(name, route, description, move |caller, input| {
            call(on.clone(), caller, input)
        })
    }

    /// An endpoint whose input is `I` (its JSON Schema published, and checked
    /// before `handler` runs) and whose output is `O`.
    pub fn new<I, O, F, Fut>(
        name: &'static str,
        route: (&'static str, &'static str),
        description: &'static str,
        handler: F,
    ) -> Self
    where
        I: serde::de::DeserializeOwned + schemars::JsonSchema,
        O: serde::Serialize,
        F: Fn(Caller, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        Self {
            info: info::<I>(name, route, description, false),
            handler: Arc::new(move |caller, input| {
                let handler = handler.clone();
                Box::pin(async move {
                    let input: I = parse_args(name, &input)?;
                    let output = handler(caller, input).await?;
                    serde_json::to_value(output).map_err(|e| Error::internal(e.to_string()))
                })
            }),
            stream: None,
        }
    }

    /// A streaming endpoint (a `GET`) whose input is `I` and whose events
    /// `handler` sends.
    pub fn streaming<I, F, Fut>(name: &'static str, path: &'static str, description: &'static str, handler: F) -> Self
    where
        I: serde::de::DeserializeOwned + schemars::JsonSchema,
        F: Fn(Caller, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Events>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        Self {
            info: info::<I>(name, ("GET", path), description, true),
            handler: Arc::new(move |_, _| {
                Box::pin(async move {
                    Err(Error::invalid_field(
                        "endpoint",
                        format!("{name} streams: GET it as server-sent events"),
                    ))
                })
            }),
            stream: Some(Arc::new(move |caller, input| {
                let handler = handler.clone();
                Box::pin(async move {
                    let input: I = parse_args(name, &input)?;
                    handler(caller, input).await
                })
            })),
        }
    }
}

/// An endpoint's description, with its input's JSON Schema.
fn info<I: schemars::JsonSchema>(
    name: &str,
    (method, path): (&str, &str),
    description: &str,
    streams: bool,
) -> bbx_core::model::EndpointInfo {
    bbx_core::model::EndpointInfo {
        name: name.to_owned(),
        method: method.to_owned(),
        path: path.to_owned(),
        description: description.to_owned(),
        input: serde_json::to_value(schemars::schema_for!(I)).unwrap_or_default(),
        streams,
    }
}
