//! A step's `when`: a condition over references and literals.
//!
//! `${steps.check.output.value} > 3 && ${inputs.mode} == 'fast'`,
//! `!${steps.probe.output.found}`, `${steps.a.status} == 'succeeded' || (1 < 2)`.
//! Operands are references, numbers, strings (in `'` or `"`), `true`, `false`
//! and `null`; `==` and `!=` compare any JSON values, `<` `<=` `>` `>=` two
//! numbers or two strings (anything else is false); a lone operand is true
//! unless it is `false`, `null`, `0`, `""`, `[]` or `{}`.

use crate::template::{self, Target};
use serde_json::Value;

/// How deep parentheses and `!` may nest.
const MAX_DEPTH: usize = 32;
/// Operators one condition may have (`&&`, `||`, comparisons), and its
/// longest text: a condition is a guard, not a program.
const MAX_OPERATORS: usize = 64;
const MAX_LEN: usize = 4096;

/// A parsed condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    Literal(Value),
    Ref(Target),
    Not(Box<Condition>),
    And(Box<Condition>, Box<Condition>),
    Or(Box<Condition>, Box<Condition>),
    Compare(Box<Condition>, Op, Box<Condition>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Condition {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > MAX_LEN {
            return Err(format!("a condition is at most {MAX_LEN} bytes"));
        }
        let mut parser = Parser {
            text,
            at: 0,
            depth: 0,
            operators: 0,
        };
        let condition = parser.or()?;
        parser.skip_space();
        if parser.at < text.len() {
            return Err(format!(
                "unexpected {:?} at {} in {text:?}",
                &text[parser.at..],
                parser.at
            ));
        }
        Ok(condition)
    }

    /// Every reference it makes.
    pub fn references(&self, found: &mut impl FnMut(&Target)) {
        match self {
            Self::Literal(_) => {}
            Self::Ref(target) => found(target),
            Self::Not(inner) => inner.references(found),
            Self::And(a, b) | Self::Or(a, b) | Self::Compare(a, _, b) => {
                a.references(found);
                b.references(found);
            }
        }
    }

    /// Whether it holds, reading references with `resolve`.
    pub fn holds(&self, resolve: &mut dyn FnMut(&Target) -> Result<Value, String>) -> Result<bool, String> {
        Ok(truthy(&self.value(resolve)?))
    }

    fn value(&self, resolve: &mut dyn FnMut(&Target) -> Result<Value, String>) -> Result<Value, String> {
        Ok(match self {
            Self::Literal(value) => value.clone(),
            Self::Ref(target) => resolve(target)?,
            Self::Not(inner) => Value::Bool(!inner.holds(resolve)?),
            Self::And(a, b) => Value::Bool(a.holds(resolve)? && b.holds(resolve)?),
            Self::Or(a, b) => Value::Bool(a.holds(resolve)? || b.holds(resolve)?),
            Self::Compare(a, op, b) => Value::Bool(compare(&a.value(resolve)?, *op, &b.value(resolve)?)),
        })
    }
}

fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(items) => !items.is_empty(),
        Value::Object(fields) => !fields.is_empty(),
    }
}

fn compare(a: &Value, op: Op, b: &Value) -> bool {
    let ordering = match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64().zip(y.as_f64()).and_then(|(x, y)| x.partial_cmp(&y)),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    };
    match op {
        Op::Eq => ordering.map_or(a == b, |o| o.is_eq()),
        Op::Ne => ordering.map_or(a != b, |o| o.is_ne()),
        Op::Lt => ordering.is_some_and(|o| o.is_lt()),
        Op::Le => ordering.is_some_and(|o| o.is_le()),
        Op::Gt => ordering.is_some_and(|o| o.is_gt()),
        Op::Ge => ordering.is_some_and(|o| o.is_ge()),
    }
}

struct Parser<'t> {
    text: &'t str,
    at: usize,
    depth: usize,
    operators: usize,
}

impl<'t> Parser<'t> {
    fn rest(&self) -> &'t str {
        &self.text[self.at..]
    }

    fn skip_space(&mut self) {
        let trimmed = self.rest().trim_start();
        self.at = self.text.len() - trimmed.len();
    }

    fn eat(&mut self, token: &str) -> bool {
        self.skip_space();
        if self.rest().starts_with(token) {
            self.at += token.len();
            // Every token eaten but `)` is an operator.
            self.operators += usize::from(token != ")");
            true
        } else {
            false
        }
    }

    fn counted(&self) -> Result<(), String> {
        if self.operators > MAX_OPERATORS {
            return Err(format!("a condition has at most {MAX_OPERATORS} operators"));
        }
        Ok(())
    }

    fn or(&mut self) -> Result<Condition, String> {
        let mut left = self.and()?;
        while self.eat("||") {
            self.counted()?;
            left = Condition::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Condition, String> {
        let mut left = self.not()?;
        while self.eat("&&") {
            self.counted()?;
            left = Condition::And(Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Condition, String> {
        self.skip_space();
        if self.rest().starts_with('!') && !self.rest().starts_with("!=") {
            self.at += 1;
            self.deeper()?;
            let inner = self.not()?;
            self.depth -= 1;
            return Ok(Condition::Not(Box::new(inner)));
        }
        self.compare()
    }

    fn deeper(&mut self) -> Result<(), String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(format!("a condition nests at most {MAX_DEPTH} deep"));
        }
        Ok(())
    }

    fn compare(&mut self) -> Result<Condition, String> {
        let left = self.operand()?;
        const OPS: [(&str, Op); 6] = [
            ("==", Op::Eq),
            ("!=", Op::Ne),
            ("<=", Op::Le),
            (">=", Op::Ge),
            ("<", Op::Lt),
            (">", Op::Gt),
        ];
        for (token, op) in OPS {
            if self.eat(token) {
                let right = self.operand()?;
                return Ok(Condition::Compare(Box::new(left), op, Box::new(right)));
            }
        }
        Ok(left)
    }

    fn operand(&mut self) -> Result<Condition, String> {
        self.skip_space();
        let rest = self.rest();
        if rest.starts_with('(') {
            self.at += 1;
            self.deeper()?;
            let inner = self.or()?;
            self.depth -= 1;
            if !self.eat(")") {
                return Err(format!("a ( is never closed in {:?}", self.text));
            }
            return Ok(inner);
        }
        if rest.starts_with("${") {
            let end = rest
                .find('}')
                .ok_or_else(|| format!("a reference is never closed in {:?}", self.text))?;
            let reference = &rest[..=end];
            self.at += end + 1;
            return match template::parse(reference)?.as_slice() {
                [template::Piece::Ref(target)] => Ok(Condition::Ref(target.clone())),
                _ => Err(format!("{reference:?} is not a reference")),
            };
        }
        if let Some(quote) = rest.chars().next().filter(|c| *c == '\'' || *c == '"') {
            let end = rest[1..]
                .find(quote)
                .ok_or_else(|| format!("a string is never closed in {:?}", self.text))?;
            let text = rest[1..=end].to_owned();
            self.at += end + 2;
            return Ok(Condition::Literal(Value::String(text)));
        }
        for (word, value) in [
            ("true", Value::Bool(true)),
            ("false", Value::Bool(false)),
            ("null", Value::Null),
        ] {
            if rest.starts_with(word) && !rest[word.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '_') {
                self.at += word.len();
                return Ok(Condition::Literal(value));
            }
        }
        let len = rest
            .find(|c: char| !(c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E')))
            .unwrap_or(rest.len());
        if len > 0
            && let Ok(number) = rest[..len].parse::<f64>()
            && let Some(number) = serde_json::Number::from_f64(number)
        {
            self.at += len;
            return Ok(Condition::Literal(Value::Number(number)));
        }
        Err(format!(
            "expected a reference, a number, a string, true, false or null at {:?} in {:?}",
            rest, self.text
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn holds(text: &str) -> bool {
        let values = json!({"check": {"value": 5, "name": "fast", "list": []}});
        Condition::parse(text)
            .unwrap()
            .holds(&mut |target| match target {
                Target::Output { step, path } => Ok(template::at(&values[step.as_str()], path)
                    .cloned()
                    .unwrap_or(Value::Null)),
                _ => Ok(json!("run")),
            })
            .unwrap()
    }

    #[test]
    fn conditions_compare_and_combine() {
        assert!(holds("${steps.check.output.value} > 3"));
        assert!(!holds("${steps.check.output.value} > 5"));
        assert!(holds(
            "${steps.check.output.value} >= 5 && ${steps.check.output.name} == 'fast'"
        ));
        assert!(holds("${steps.check.output.name} != \"slow\""));
        assert!(holds("!${steps.check.output.list}"));
        assert!(holds("(1 < 2) || false"));
        assert!(!holds("!(true) || null"));
        assert!(holds("${steps.check.output.missing} == null"));
        assert!(!holds("'a' < 1"), "mixed types never order");
        assert!(holds("5 == 5.0"));
    }

    #[test]
    fn bad_conditions_say_where() {
        for bad in [
            "",
            "1 <",
            "(1 < 2",
            "${steps.a.output",
            "'open",
            "1 2",
            "${steps.a}",
            "a == b",
        ] {
            assert!(Condition::parse(bad).is_err(), "{bad}");
        }
        let deep = format!("{}true{}", "(".repeat(40), ")".repeat(40));
        assert!(Condition::parse(&deep).unwrap_err().contains("nests"));
        let long = vec!["true"; 100].join(" && ");
        assert!(Condition::parse(&long).unwrap_err().contains("operators"));
        assert!(
            Condition::parse(&"1 == 1 || ".repeat(1000))
                .unwrap_err()
                .contains("bytes")
        );
    }

    proptest! {
        #[test]
        fn any_text_parses_or_is_refused_without_panicking(text in "[ !&|()<>=0-9a-z.'${}\\[\\]_-]{0,48}") {
            let _ = Condition::parse(&text);
        }
    }
}
