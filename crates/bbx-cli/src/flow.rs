//! `bbx flow ...`: FlowIntegrity's endpoints, with `policies add NAME FILE`
//! reading the policy from a file.

use crate::cli::{Cli, FlowCommand, PoliciesAction};
use crate::{client, endpoint, output};
use anyhow::{Context, Result};
use bbx_core::api::prelude::*;
use serde_json::json;

pub async fn run(cli: &Cli, command: &FlowCommand) -> Result<()> {
    let (name, input) = match command {
        FlowCommand::Endpoint(words) => {
            let words: Vec<String> = std::iter::once("flow".to_owned())
                .chain(words.iter().cloned())
                .collect();
            return endpoint::run(cli, &words).await;
        }
        FlowCommand::Policies { action: None, tenant } => ("flow.policies", json!({ "tenant": tenant })),
        FlowCommand::Policies {
            action: Some(PoliciesAction::Add { name, file, tenant }),
            ..
        } => {
            let source = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
            (
                "flow.add_policy",
                json!({ "name": name, "source": source, "tenant": tenant }),
            )
        }
        FlowCommand::Policies {
            action: Some(PoliciesAction::Remove { name, tenant }),
            ..
        } => ("flow.remove_policy", json!({ "name": name, "tenant": tenant })),
    };
    output::json(&client(cli)?.call_endpoint(name, input).await?);
    Ok(())
}
