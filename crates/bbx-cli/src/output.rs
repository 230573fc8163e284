//! Printing results: JSON for `--json`, short human text otherwise.

use bbx_core::model::{Agent, ApiKeyInfo, StateEntry};
use comfy_table::{Table, presets::NOTHING};
use serde::Serialize;

pub fn json<T: Serialize>(value: &T) {
    println!("{}", serde_json::to_string_pretty(value).expect("API types serialize"));
}

fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_style(NOTHING).set_header(header.to_vec());
    table
}

pub fn agents(agents: &[Agent], next_cursor: Option<&str>) {
    let mut t = table(&["ID", "NAME", "TENANT", "STATUS", "LABELS", "CREATED"]);
    for a in agents {
        let labels: Vec<String> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        t.add_row(vec![
            a.id.to_string(),
            a.name.clone(),
            a.tenant.clone(),
            format!("{:?}", a.status).to_lowercase(),
            labels.join(","),
            a.created_at.to_rfc3339(),
        ]);
    }
    println!("{t}");
    more(next_cursor);
}

pub fn agent(a: &Agent) {
    agents(std::slice::from_ref(a), None);
}

pub fn entries(entries: &[StateEntry], next_cursor: Option<&str>) {
    let mut t = table(&["KEY", "VERSION", "VALUE"]);
    for e in entries {
        let mut value = e.value.to_string();
        if value.chars().count() > 60 {
            value = value.chars().take(57).collect::<String>() + "...";
        }
        t.add_row(vec![e.key.clone(), e.version.to_string(), value]);
    }
    println!("{t}");
    more(next_cursor);
}

pub fn keys(keys: &[ApiKeyInfo]) {
    let mut t = table(&["ID", "NAME", "TENANT", "CREATED", "REVOKED"]);
    for k in keys {
        t.add_row(vec![
            k.id.to_string(),
            k.name.clone(),
            k.tenant.clone().unwrap_or_else(|| "(admin)".into()),
            k.created_at.to_rfc3339(),
            k.revoked_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
        ]);
    }
    println!("{t}");
}

fn more(next_cursor: Option<&str>) {
    if let Some(cursor) = next_cursor {
        println!("more: --cursor {cursor}");
    }
}
