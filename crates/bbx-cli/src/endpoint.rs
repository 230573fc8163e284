//! `bbx COMPONENT VERB ...`: the endpoints components declare, as commands the CLI
//! does not know in advance. The kernel lists them (`GET /v1/endpoints`); the words
//! after the verb fill the endpoint's path fields in order, `--field value` its
//! other fields (a value that reads as JSON is taken as JSON, else as text), and
//! `--input JSON` gives them as one object. The output is JSON (`--json` is
//! accepted and changes nothing).

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
    let name = format!("{component}.{verb}");
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
    let input = input(path_fields, args)?;
    let output = api.call_endpoint(&name, Value::Object(input)).await?;
    output::json(&output);
    Ok(())
}

/// The input object from positional values (the path's fields, in order) and
/// `--field value` pairs.
fn input<'a>(mut path_fields: impl Iterator<Item = &'a str>, args: &[String]) -> Result<Map<String, Value>> {
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
                input.insert(field.replace('-', "_"), parsed(value));
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

/// A value as JSON if it reads as JSON (a number, `true`, an object), else as text.
fn parsed(raw: &str) -> Value {
    serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()))
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
            super::input(["op_id"].into_iter(), &[]).is_err(),
            "a path field is missing"
        );
        assert!(super::input(std::iter::empty(), &words(&["stray"])).is_err());
        assert!(super::input(std::iter::empty(), &words(&["--input", "[1]"])).is_err());
        assert!(super::input(std::iter::empty(), &words(&["--dangling"])).is_err());
        assert_eq!(
            input_of(&["--json", "--a", "1"]),
            json!({ "a": 1 }),
            "the global flag is no field"
        );
    }

    fn input_of(args: &[&str]) -> Value {
        Value::Object(input(std::iter::empty(), &words(args)).unwrap())
    }
}
