//! Rego programs as BBX runs them (ABAC here, FlowIntegrity's policies too):
//! built-ins given a wrong type are undefined, as in OPA, every evaluation has a
//! time and an instruction budget, and a program runs on regorus's VM (RVM),
//! some three times faster than its interpreter on the same rules, unless the VM
//! cannot compile it or decides sample inputs differently from the interpreter.

use std::sync::Arc;
use std::time::Duration;

/// How long one evaluation may take before it fails.
pub const TIME_BUDGET: Duration = Duration::from_millis(20);
/// The most VM instructions one evaluation may take.
const MAX_INSTRUCTIONS: usize = 1_000_000;

fn timer() -> regorus::utils::limits::ExecutionTimerConfig {
    regorus::utils::limits::ExecutionTimerConfig {
        limit: TIME_BUDGET,
        check_interval: std::num::NonZeroU32::new(256).expect("not zero"),
    }
}

/// An engine to add policies to.
pub fn engine() -> regorus::Engine {
    regorus::utils::limits::set_fallback_execution_timer_config(Some(timer()));
    let mut engine = regorus::Engine::new();
    engine.set_strict_builtin_errors(false);
    engine
}

/// A compiled program with one entry point.
pub enum Program {
    Vm {
        program: Arc<regorus::rvm::program::Program>,
        /// VMs with the program loaded, each used by one evaluation at a time.
        idle: parking_lot::Mutex<Vec<regorus::rvm::vm::RegoVM>>,
    },
    Interpreted(regorus::CompiledPolicy),
}

impl Program {
    /// Compiles `engine`'s policies for `entry`: on the VM if it compiles there
    /// and evaluates each of `samples` as the interpreter does.
    pub fn compile(mut engine: regorus::Engine, entry: &str, samples: &[regorus::Value]) -> Result<Self, String> {
        let rc: regorus::Rc<str> = entry.into();
        let compiled = engine.compile_with_entrypoint(&rc).map_err(|e| e.to_string())?;
        let on_vm = regorus::languages::rego::compiler::Compiler::compile_from_policy(&compiled, &[entry]);
        let Ok(program) = on_vm else {
            return Ok(Self::Interpreted(compiled));
        };
        let vm = Self::Vm {
            program,
            idle: Default::default(),
        };
        let agrees =
            samples.iter().all(
                |input| match (vm.eval(input.clone()), compiled.eval_with_input(input.clone())) {
                    (Ok(a), Ok(b)) => a == b,
                    _ => false,
                },
            );
        Ok(if agrees { vm } else { Self::Interpreted(compiled) })
    }

    /// The entry point's value for `input`, or why it could not be had
    /// (regorus's errors, as text).
    pub fn eval(&self, input: regorus::Value) -> Result<regorus::Value, String> {
        match self {
            Self::Interpreted(compiled) => compiled.eval_with_input(input).map_err(|e| e.to_string()),
            Self::Vm { program, idle } => {
                let mut vm = idle.lock().pop().unwrap_or_else(|| {
                    let mut vm = regorus::rvm::vm::RegoVM::new();
                    vm.load_program(program.clone());
                    vm.set_execution_timer_config(Some(timer()));
                    vm.set_max_instructions(MAX_INSTRUCTIONS);
                    vm
                });
                vm.set_input(input);
                let value = vm.execute().map_err(|e| e.to_string());
                idle.lock().push(vm);
                value
            }
        }
    }

    pub fn on_vm(&self) -> bool {
        matches!(self, Self::Vm { .. })
    }
}
