//! References in a step's strings: `${steps.NAME.output.PATH}`,
//! `${steps.NAME.status}`, `${inputs.NAME.PATH}`, `${run.id}`, `${run.agent}`.
//!
//! A PATH is dotted keys and `[N]` indexes (`output.items[0].url`). A string
//! that is exactly one reference becomes the value, of whatever JSON type; a
//! reference inside longer text is written into it (a string as itself, any
//! other value as JSON). `$${` is a literal `${`.

use serde_json::Value;
use std::fmt;

/// References one step's args and condition may make, at most (each becomes
/// at most one reference the ring resolves).
pub const MAX_REFERENCES: usize = 64;
/// Segments a reference's path may have.
pub const MAX_PATH: usize = 32;

/// One segment of a path into a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Key(String),
    Index(usize),
}

/// What a reference names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Output { step: String, path: Vec<Segment> },
    Status { step: String },
    Input { name: String, path: Vec<Segment> },
    RunId,
    RunAgent,
}

impl Target {
    /// The step it needs to have ended, if any.
    pub fn step(&self) -> Option<&str> {
        match self {
            Self::Output { step, .. } | Self::Status { step } => Some(step),
            _ => None,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = |f: &mut fmt::Formatter<'_>, path: &[Segment]| {
            path.iter().try_for_each(|segment| match segment {
                Segment::Key(key) => write!(f, ".{key}"),
                Segment::Index(i) => write!(f, "[{i}]"),
            })
        };
        match self {
            Self::Output { step, path: p } => {
                write!(f, "steps.{step}.output")?;
                path(f, p)
            }
            Self::Status { step } => write!(f, "steps.{step}.status"),
            Self::Input { name, path: p } => {
                write!(f, "inputs.{name}")?;
                path(f, p)
            }
            Self::RunId => f.write_str("run.id"),
            Self::RunAgent => f.write_str("run.agent"),
        }
    }
}

/// A piece of a string: text, or a reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Ref(Target),
}

/// The pieces of `text`, or what is wrong with a reference in it.
pub fn parse(text: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut literal = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        if rest[..at].ends_with('$') {
            literal.push_str(&rest[..at - 1]);
            literal.push_str("${");
            rest = &rest[at + 2..];
            continue;
        }
        literal.push_str(&rest[..at]);
        let inner = &rest[at + 2..];
        let end = inner
            .find('}')
            .ok_or_else(|| format!("a reference opened with ${{ in {text:?} is never closed"))?;
        if !literal.is_empty() {
            pieces.push(Piece::Text(std::mem::take(&mut literal)));
        }
        pieces.push(Piece::Ref(target(inner[..end].trim())?));
        rest = &inner[end + 1..];
    }
    literal.push_str(rest);
    if !literal.is_empty() {
        pieces.push(Piece::Text(literal));
    }
    Ok(pieces)
}

/// Whether `text` may hold a reference (cheap: most strings do not).
pub fn mentions(text: &str) -> bool {
    text.contains("${")
}

fn target(reference: &str) -> Result<Target, String> {
    let bad = |why: &str| format!("${{{reference}}}: {why}");
    let mut words = split(reference).map_err(|why| bad(&why))?.into_iter();
    let first = words.next();
    let target = match first.as_ref() {
        Some(Segment::Key(root)) if root == "steps" => {
            let Some(Segment::Key(step)) = words.next() else {
                return Err(bad("steps. is followed by a step's name"));
            };
            match words.next() {
                Some(Segment::Key(field)) if field == "output" => Target::Output {
                    step,
                    path: words.collect(),
                },
                Some(Segment::Key(field)) if field == "status" && words.len() == 0 => Target::Status { step },
                _ => {
                    return Err(bad(
                        "a step's reference is steps.NAME.output[.PATH] or steps.NAME.status",
                    ));
                }
            }
        }
        Some(Segment::Key(root)) if root == "inputs" => {
            let Some(Segment::Key(name)) = words.next() else {
                return Err(bad("inputs. is followed by an input's name"));
            };
            Target::Input {
                name,
                path: words.collect(),
            }
        }
        Some(Segment::Key(root)) if root == "run" => match words.next() {
            Some(Segment::Key(field)) if field == "id" && words.len() == 0 => Target::RunId,
            Some(Segment::Key(field)) if field == "agent" && words.len() == 0 => Target::RunAgent,
            _ => return Err(bad("a run's reference is run.id or run.agent")),
        },
        _ => return Err(bad("a reference starts with steps., inputs. or run.")),
    };
    Ok(target)
}

/// `a.b[2].c` as segments.
fn split(reference: &str) -> Result<Vec<Segment>, String> {
    let mut segments = Vec::new();
    for (i, dotted) in reference.split('.').enumerate() {
        let (key, mut indexes) = match dotted.find('[') {
            Some(at) => (&dotted[..at], &dotted[at..]),
            None => (dotted, ""),
        };
        if key.is_empty() && (i == 0 || indexes.is_empty()) {
            return Err("an empty name in the path".into());
        }
        if !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(format!("{key:?} is not a name (letters, digits, _ and -)"));
        }
        if !key.is_empty() {
            segments.push(Segment::Key(key.to_owned()));
        }
        while !indexes.is_empty() {
            let close = indexes.find(']').ok_or("an index [N] is never closed")?;
            let index = indexes[1..close]
                .parse()
                .map_err(|_| format!("{:?} is not an index (a whole number)", &indexes[1..close]))?;
            segments.push(Segment::Index(index));
            indexes = &indexes[close + 1..];
            if !indexes.is_empty() && !indexes.starts_with('[') {
                return Err("an index is followed by . or another index".into());
            }
        }
        if segments.len() > MAX_PATH + 3 {
            return Err(format!("a path has at most {MAX_PATH} segments"));
        }
    }
    Ok(segments)
}

/// The value at `path` in `value`.
pub fn at<'v>(value: &'v Value, path: &[Segment]) -> Option<&'v Value> {
    path.iter().try_fold(value, |value, segment| match segment {
        Segment::Key(key) => value.get(key),
        Segment::Index(i) => value.get(i),
    })
}

/// `path` as a JSON pointer.
pub fn pointer(path: &[Segment]) -> String {
    let mut out = String::new();
    for segment in path {
        out.push('/');
        match segment {
            Segment::Key(key) => out.push_str(&key.replace('~', "~0").replace('/', "~1")),
            Segment::Index(i) => out.push_str(&i.to_string()),
        }
    }
    out
}

/// Calls `found` with every reference in the strings of `value`, and the
/// path of the string (`.a.b[0]`); stops at the first malformed one.
pub fn each_reference(
    value: &Value,
    at: &mut String,
    found: &mut dyn FnMut(&str, &Target) -> Result<(), String>,
) -> Result<(), String> {
    match value {
        Value::String(text) if mentions(text) => {
            for piece in parse(text).map_err(|why| format!("{at}: {why}"))? {
                if let Piece::Ref(target) = piece {
                    found(at, &target)?;
                }
            }
            Ok(())
        }
        Value::Object(fields) => fields.iter().try_for_each(|(key, field)| {
            let len = at.len();
            at.push('.');
            at.push_str(key);
            let result = each_reference(field, at, found);
            at.truncate(len);
            result
        }),
        Value::Array(items) => items.iter().enumerate().try_for_each(|(i, item)| {
            let len = at.len();
            at.push_str(&format!("[{i}]"));
            let result = each_reference(item, at, found);
            at.truncate(len);
            result
        }),
        _ => Ok(()),
    }
}

/// What a reference resolves to: its value, and (for a step's output whose op
/// the ring still holds) where the ring can take it from, so that the
/// op's labels travel with it.
pub struct Resolved {
    pub value: Value,
    pub from: Option<Value>,
}

/// `value` with every reference replaced by what `resolve` gives. A string
/// that is one reference with a `from` becomes the ring's `{"$from": ...}`.
pub fn render(value: &Value, resolve: &mut dyn FnMut(&Target) -> Result<Resolved, String>) -> Result<Value, String> {
    Ok(match value {
        Value::String(text) if mentions(text) => {
            let pieces = parse(text)?;
            match pieces.as_slice() {
                [Piece::Ref(target)] => {
                    let resolved = resolve(target)?;
                    match resolved.from {
                        Some(from) => serde_json::json!({ "$from": from }),
                        None => resolved.value,
                    }
                }
                _ => {
                    let mut out = String::new();
                    for piece in pieces {
                        match piece {
                            Piece::Text(text) => out.push_str(&text),
                            Piece::Ref(target) => match resolve(&target)?.value {
                                Value::String(text) => out.push_str(&text),
                                other => out.push_str(&other.to_string()),
                            },
                        }
                    }
                    Value::String(out)
                }
            }
        }
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(key, field)| Ok((key.clone(), render(field, resolve)?)))
                .collect::<Result<_, String>>()?,
        ),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|item| render(item, resolve))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn key(k: &str) -> Segment {
        Segment::Key(k.into())
    }

    #[test]
    fn references_parse_into_their_targets() {
        assert_eq!(
            parse("${steps.fetch.output.items[0].url}").unwrap(),
            [Piece::Ref(Target::Output {
                step: "fetch".into(),
                path: vec![key("items"), Segment::Index(0), key("url")]
            })]
        );
        assert_eq!(
            parse("a ${ inputs.city } b $${x}").unwrap(),
            [
                Piece::Text("a ".into()),
                Piece::Ref(Target::Input {
                    name: "city".into(),
                    path: vec![]
                }),
                Piece::Text(" b ${x}".into()),
            ]
        );
        assert_eq!(parse("${run.id}").unwrap(), [Piece::Ref(Target::RunId)]);
        for bad in [
            "${steps}",
            "${steps.a}",
            "${steps.a.result}",
            "${x.y}",
            "${steps.a.output",
            "${inputs.a[x]}",
            "${steps.a.status.x}",
            "${steps..output}",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_whole_reference_keeps_its_type_and_one_in_text_is_written_in() {
        let mut resolve = |target: &Target| -> Result<Resolved, String> {
            Ok(Resolved {
                value: match target {
                    Target::Output { .. } => json!({"n": 7}),
                    _ => json!("x"),
                },
                from: None,
            })
        };
        let args =
            json!({"whole": "${steps.a.output}", "text": "n=${steps.a.output} id=${run.id}", "list": [1, "${run.id}"]});
        assert_eq!(
            render(&args, &mut resolve).unwrap(),
            json!({"whole": {"n": 7}, "text": "n={\"n\":7} id=x", "list": [1, "x"]})
        );
    }

    #[test]
    fn paths_read_values_and_become_pointers() {
        let value = json!({"a": [{"b/c": 1}]});
        let path = [key("a"), Segment::Index(0), key("b/c")];
        assert_eq!(at(&value, &path), Some(&json!(1)));
        assert_eq!(pointer(&path), "/a/0/b~1c");
        assert_eq!(at(&value, &[key("missing")]), None);
    }

    proptest! {
        #[test]
        fn any_text_parses_or_is_refused_without_panicking(text in ".{0,64}") {
            let _ = parse(&text);
        }

        #[test]
        fn text_without_references_is_itself(text in "[^$]{0,64}") {
            let pieces = parse(&text).unwrap();
            let back: String = pieces.iter().map(|p| match p { Piece::Text(t) => t.clone(), Piece::Ref(_) => unreachable!() }).collect();
            prop_assert_eq!(back, text);
        }
    }
}
