//! `bbx COMPONENT VERB ...`: the endpoints components declare, as commands the CLI
//! does not know in advance. The kernel lists them (`GET /v1/endpoints`); the words
//! after the verb fill the endpoint's path fields in order, `--field value` its
//! other fields (a value that reads as JSON is taken as JSON, else as text, and
//! always as text for a field the endpoint's schema says is a string; `@PATH` is
//! the text of the file at PATH), and `--input JSON` gives them as one
//! object. A verb may be spelled with `-` for `_` (`set-policy`). The output is JSON (`--json` is
//! accepted and changes nothing); a streaming endpoint's events are printed one
//! JSON a line as they come.

use crate::cli::Cli;
use crate::{client, output};
use anyhow::{Result, bail};
use bbx_core::api::prelude::*;
use serde_json::{Map, Value};

/// Runs `words` (`COMPONENT VERB ARGS...`) as the endpoint `COMPONENT.VERB`.
pub async fn run(cli: &Cli, words: &[String]) -> Result<()> {
    let [component, verb, args @ ..] = words else {
        bail!("a command names a component and a verb, e.g. `bbx ring approve OP_ID`");
    };
    let name = format!("{component}.{}", verb.replace('-', "_"));
    let api = client(cli)?;
    let endpoints = api.endpoints().await?;
    let Some(endpoint) = endpoints.iter().find(|e| e.name == name) else {
        let known: Vec<&str> = endpoints.iter().map(|e| e.name.as_str()).collect();
        bail!(
            "unknown command `{component} {verb}`; the kernel's endpoints are {}",
            known.join(", ")
        );
    };
    let path_fields = endpoint
        .path
        .split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')));
    let input = input(path_fields, &endpoint.input, args)?;
    if endpoint.streams {
        // Events, one JSON a line, as they come.
        let mut events = api.stream_endpoint(&name, Value::Object(input)).await?;
        while let Some(event) = events.next().await {
            println!("{}", event?);
        }
        return Ok(());
    }
    let output = api.call_endpoint(&name, Value::Object(input)).await?;
    output::json(&output);
    Ok(())
}

/// The input object from positional values (the path's fields, in order) and
/// `--field value` pairs.
fn input<'a>(
    mut path_fields: impl Iterator<Item = &'a str>,
    schema: &Value,
    args: &[String],
) -> Result<Map<String, Value>> {
    let mut input = Map::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.strip_prefix("--") {
            // The global flag, which clap leaves among an external command's words:
            // an endpoint's output is JSON anyway.
            Some("json") => {}
            Some("input") => {
                let Some(Ok(Value::Object(object))) = args.next().map(|raw| serde_json::from_str(raw)) else {
                    bail!("--input takes a JSON object");
                };
                input.extend(object);
            }
            Some(field) => {
                let Some(value) = args.next() else {
                    bail!("--{field} needs a value");
                };
                let field = field.replace('-', "_");
                let is_text = match schema.pointer(&format!("/properties/{field}/type")) {
                    Some(Value::String(only)) => only == "string",
                    // `Option<String>`: a string or null.
                    Some(Value::Array(types)) => types.iter().all(|t| t == "string" || t == "null"),
                    _ => false,
                };
                input.insert(field, parsed(value, is_text)?);
            }
            None => {
                let Some(field) = path_fields.next() else {
                    bail!("unexpected argument {arg:?}");
                };
                input.insert(field.to_owned(), Value::String(arg.clone()));
            }
        }
    }
    if let Some(missing) = path_fields.next() {
        bail!("missing {}", missing.to_uppercase());
    }
    Ok(input)
}

/// A value as text if `is_text`, else as JSON if it reads as JSON (a number,
/// `true`, an object), else as text; `@PATH` is the file's text.
fn parsed(raw: &str, is_text: bool) -> Result<Value> {
    let text = match raw.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read {path}: {e}"))?,
        None => raw.to_owned(),
    };
    if is_text || raw.starts_with('@') {
        return Ok(Value::String(text));
    }
    Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn words(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn words_fill_the_path_then_the_fields() {
        let fields = ["op_id"];
        let input = input(
            fields.into_iter(),
            &json!({}),
            &words(&["OP", "--reason", "not today", "--max-n", "3"]),
        )
        .unwrap();
        assert_eq!(
            Value::Object(input),
            json!({ "op_id": "OP", "reason": "not today", "max_n": 3 })
        );
        let merged = input_of(&["--input", r#"{"a": [1]}"#, "--b", "x"]);
        assert_eq!(merged, json!({ "a": [1], "b": "x" }));
        assert!(
            super::input(["op_id"].into_iter(), &json!({}), &[]).is_err(),
            "a path field is missing"
        );
        assert!(super::input(std::iter::empty(), &json!({}), &words(&["stray"])).is_err());
        assert!(super::input(std::iter::empty(), &json!({}), &words(&["--input", "[1]"])).is_err());
        assert!(super::input(std::iter::empty(), &json!({}), &words(&["--dangling"])).is_err());
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "package bbx.authz").unwrap();
        let from_file = format!("@{}", file.path().display());
        assert_eq!(
            input_of(&["--source", &from_file]),
            json!({ "source": "package bbx.authz" })
        );
        assert!(super::input(std::iter::empty(), &json!({}), &words(&["--source", "@/no/such/file"])).is_err());
        assert_eq!(
            input_of(&["--json", "--a", "1"]),
            json!({ "a": 1 }),
            "the global flag is no field"
        );
    }

    fn input_of(args: &[&str]) -> Value {
        Value::Object(input(std::iter::empty(), &json!({}), &words(args)).unwrap())
    }

    #[test]
    fn a_string_field_takes_the_words_as_text() {
        let schema = json!({ "properties": { "value": { "type": "string" }, "n": { "type": "integer" } } });
        let input = input(std::iter::empty(), &schema, &words(&["--value", "12345", "--n", "3"])).unwrap();
        assert_eq!(Value::Object(input), json!({ "value": "12345", "n": 3 }));
    }
}
