//! Validation rules for user-supplied names, tenants, labels and state keys.
//!
//! Every rule is checked before anything is written, so a rejected request changes
//! nothing. Limits are in bytes of UTF-8.

use crate::error::{Error, Result};
use std::collections::BTreeMap;

pub const MAX_NAME_BYTES: usize = 256;
pub const MAX_TENANT_BYTES: usize = 128;
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_KEY_BYTES: usize = 128;
pub const MAX_LABEL_VALUE_BYTES: usize = 256;
pub const MAX_STATE_KEY_BYTES: usize = 512;

/// A display name: non-empty, bounded, printable.
pub fn name(field: &str, value: &str) -> Result<()> {
    printable(field, value, MAX_NAME_BYTES)
}

/// A state key: non-empty, bounded, printable. `/` is allowed so that keys can form
/// hierarchies listed by prefix; keys are opaque to storage, never paths on disk.
/// `.` and `..` alone are refused: as a URL path segment they are dot segments that
/// URL libraries resolve away, so `/state/..` would address the agent itself.
pub fn state_key(value: &str) -> Result<()> {
    printable("key", value, MAX_STATE_KEY_BYTES)?;
    if value == "." || value == ".." {
        return Err(Error::invalid_field("key", format!("{value:?} cannot be a state key")));
    }
    Ok(())
}

/// A tenant: a slug of lowercase letters, digits, `-` and `_`, so it can appear in
/// metrics labels, directory names and key prefixes unchanged.
pub fn tenant(value: &str) -> Result<()> {
    slug("tenant", value, MAX_TENANT_BYTES)
}

/// Labels: bounded count; keys are slugs (plus `.` and `/` for namespacing, as in
/// Kubernetes), values are printable and may be empty.
pub fn labels(labels: &BTreeMap<String, String>) -> Result<()> {
    if labels.len() > MAX_LABELS {
        return Err(Error::invalid_field(
            "labels",
            format!("at most {MAX_LABELS} labels are allowed, got {}", labels.len()),
        ));
    }
    for (key, value) in labels {
        if key.is_empty()
            || key.len() > MAX_LABEL_KEY_BYTES
            || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
        {
            return Err(Error::invalid_field(
                "labels",
                format!(
                    "label key {:?} must be 1-{MAX_LABEL_KEY_BYTES} characters of [A-Za-z0-9-_./]",
                    truncate(key)
                ),
            ));
        }
        if value.len() > MAX_LABEL_VALUE_BYTES || value.chars().any(char::is_control) {
            return Err(Error::invalid_field(
                "labels",
                format!(
                    "value of label {key:?} must be at most {MAX_LABEL_VALUE_BYTES} bytes without control characters"
                ),
            ));
        }
    }
    Ok(())
}

/// Parses a `key=value` label selector as given on a query string or command line.
pub fn label_selector(selector: &str) -> Result<(String, String)> {
    match selector.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(Error::invalid_field(
            "label",
            format!("label selector {:?} must look like key=value", truncate(selector)),
        )),
    }
}

fn printable(field: &str, value: &str, max: usize) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid_field(field, format!("{field} must not be empty")));
    }
    if value.len() > max {
        return Err(Error::invalid_field(
            field,
            format!("{field} is {} bytes; the limit is {max}", value.len()),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid_field(
            field,
            format!("{field} {:?} contains control characters", truncate(value)),
        ));
    }
    Ok(())
}

fn slug(field: &str, value: &str, max: usize) -> Result<()> {
    let ok = !value.is_empty()
        && value.len() <= max
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid_field(
            field,
            format!("{field} {:?} must be 1-{max} characters of [a-z0-9-_]", truncate(value)),
        ))
    }
}

/// Keeps error messages one line long whatever the input was.
fn truncate(value: &str) -> String {
    value.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_reject_empty_huge_and_control() {
        assert!(name("name", "planner").is_ok());
        assert!(name("name", "").is_err());
        assert!(name("name", &"x".repeat(MAX_NAME_BYTES + 1)).is_err());
        assert!(name("name", "a\u{0}b").is_err());
        assert!(name("name", "ünïcødé names are fine").is_ok());
    }

    #[test]
    fn dot_segments_are_not_keys() {
        assert!(state_key(".").is_err());
        assert!(state_key("..").is_err());
        assert!(state_key("...").is_ok());
        assert!(state_key("a/../b").is_ok());
    }

    #[test]
    fn tenants_are_slugs() {
        assert!(tenant("acme-prod_1").is_ok());
        for bad in ["", "Acme", "a/b", "..", "a b"] {
            assert!(tenant(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn selectors_need_a_key() {
        assert_eq!(label_selector("team=ml").unwrap(), ("team".into(), "ml".into()));
        assert_eq!(label_selector("team=").unwrap(), ("team".into(), String::new()));
        assert!(label_selector("=x").is_err());
        assert!(label_selector("team").is_err());
    }

    proptest! {
        #[test]
        fn accepted_state_keys_are_bounded_and_printable(s in "\\PC{0,600}|.{0,20}") {
            if state_key(&s).is_ok() {
                prop_assert!(!s.is_empty() && s.len() <= MAX_STATE_KEY_BYTES);
                prop_assert!(!s.chars().any(char::is_control));
            }
        }
    }
}
