//! References and conditions, resolved against the run's inputs and its steps' outputs.

use super::*;

impl Driver {
    /// A reference's value in a condition: what is missing is null.
    pub(super) fn condition_value(&self, target: &Target) -> Value {
        self.resolve(target).map(|r| r.value).unwrap_or(Value::Null)
    }

    pub(super) fn resolve(&self, target: &Target) -> std::result::Result<Resolved, String> {
        let plain = |value: Value| Resolved { value, from: None };
        let missing = || format!("${{{target}}} names nothing in what it refers to");
        match target {
            Target::RunId => Ok(plain(json!(self.run.id))),
            Target::RunAgent => Ok(plain(json!(self.run.agent))),
            Target::Input { name, path } => self
                .run
                .inputs
                .get(name)
                .and_then(|value| template::at(value, path))
                .cloned()
                .map(plain)
                .ok_or_else(missing),
            Target::Status { step } => {
                let index = self.compiled.index(step).ok_or_else(missing)?;
                Ok(plain(
                    serde_json::to_value(self.steps[index].status).unwrap_or_default(),
                ))
            }
            Target::Output { step, path } => {
                let index = self.compiled.index(step).ok_or_else(missing)?;
                let record = &self.steps[index];
                if record.status != StepStatus::Succeeded {
                    let why = match &record.error {
                        Some(e) => format!(": {}", e.message),
                        None => String::new(),
                    };
                    let status = serde_json::to_value(record.status).unwrap_or_default();
                    return Err(format!(
                        "${{{target}}} refers to the output of step {step}, which ended {}{why}",
                        status.as_str().unwrap_or("without output")
                    ));
                }
                let value = record
                    .output
                    .as_ref()
                    .and_then(|output| template::at(output, path))
                    .cloned()
                    .ok_or_else(missing)?;
                // Tainted values travel through the ring, which carries their
                // labels to the op that takes them.
                let from = match (&record.op_id, record.labels.is_empty()) {
                    (Some(op), false) => {
                        Some(json!({ "op": op, "path": format!("/result{}", template::pointer(path)) }))
                    }
                    _ => None,
                };
                Ok(Resolved { value, from })
            }
        }
    }

    pub(super) fn render_child_args(&self, kind: &str, args: &Value) -> Result<Value> {
        if kind != engine_kinds::WORKFLOW {
            return self.render(args);
        }
        let mut args = args.clone();
        if let Some(inputs) = args.get("inputs") {
            args["inputs"] = self.render(inputs)?;
        }
        Ok(args)
    }

    pub(super) fn render(&self, args: &Value) -> Result<Value> {
        template::render(args, &mut |target| self.resolve(target)).map_err(|why| Error::invalid_field("args", why))
    }
}
