//! `bbx flow ...`: FlowIntegrity's endpoints, with `policies add NAME PATH`
//! reading the policy from a file, or a bundle from a directory.

use crate::cli::{Cli, FlowCommand, PoliciesAction};
use crate::{client, endpoint, output};
use anyhow::{Context, Result};
use bbx_core::api::prelude::*;
use serde_json::json;
use std::path::Path;

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
            let read =
                |path: &Path| std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()));
            let mut input = json!({ "name": name, "tenant": tenant });
            if file.is_dir() {
                input["modules"] = bundle(file, read)?.into();
            } else {
                input["source"] = read(file)?.into();
            }
            ("flow.add_policy", input)
        }
        FlowCommand::Policies {
            action: Some(PoliciesAction::Remove { name, tenant }),
            ..
        } => ("flow.remove_policy", json!({ "name": name, "tenant": tenant })),
    };
    output::json(&client(cli)?.call_endpoint(name, input).await?);
    Ok(())
}

/// The bundle in `dir`: each `.rego` file in it, by the name of the file less
/// `.rego`.
fn bundle(dir: &Path, read: impl Fn(&Path) -> Result<String>) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut modules = serde_json::Map::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rego")
            && let Some(module) = path.file_stem().and_then(|s| s.to_str())
        {
            modules.insert(module.to_owned(), read(&path)?.into());
        }
    }
    anyhow::ensure!(!modules.is_empty(), "{} has no .rego file", dir.display());
    Ok(modules)
}
