//! `bbx ring ...` and `bbx journal ...`: the AgentRing from the command line.

use crate::cli::{Cli, JournalCommand, RingCommand, ServeArgs, SubmitArgs};
use crate::{client, output, resolve_config};
use anyhow::{Result, bail};
use bbx_core::Error;
use bbx_core::api::prelude::*;
use bbx_core::op::{Completion, OpInfo, OpState, RetryPolicy, SubmitBatch, SubmitOp};
use std::time::Duration;

pub async fn run(cli: &Cli, command: &RingCommand) -> Result<()> {
    let api = client(cli)?;
    match command {
        RingCommand::Submit(args) => {
            let batch = SubmitBatch {
                ops: vec![submit_op(args)?],
                wait_ms: args.wait_for_room_ms,
            };
            let submitted = api.submit_ops(batch).await?.ops.remove(0);
            if args.wait {
                let info = api.wait_op(submitted.op_id, Duration::from_secs(60)).await?;
                print_completion(cli, done(info, 60_000)?);
            } else if cli.json {
                output::json(&submitted);
            } else {
                let note = if submitted.deduplicated {
                    " (already submitted with this key)"
                } else {
                    ""
                };
                println!("{}{note}", submitted.op_id);
            }
        }
        RingCommand::Wait { op_id, timeout_ms } => {
            let id = op_id.parse()?;
            // The server holds one long poll for at most a minute; wait longer by polling again.
            let deadline = tokio::time::Instant::now() + Duration::from_millis(*timeout_ms);
            let info = loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let info = api.wait_op(id, left.min(Duration::from_secs(60))).await?;
                if info.state == OpState::Done || left.is_zero() {
                    break info;
                }
            };
            print_completion(cli, done(info, *timeout_ms)?);
        }
        RingCommand::Get { op_id } => {
            let info = api.get_op(op_id.parse()?).await?;
            if cli.json {
                output::json(&info);
            } else {
                println!(
                    "{} {} {:?} attempts {}",
                    info.op_id, info.kind, info.state, info.attempts
                );
                if let Some(completion) = &info.completion {
                    output::completion(completion);
                }
            }
        }
        RingCommand::Cancel { op_id } => {
            let info = api.cancel_op(op_id.parse()?).await?;
            if cli.json {
                output::json(&info);
            } else {
                println!("{} {:?}", info.op_id, info.state);
            }
        }
        RingCommand::Resolve { op_id, resolution } => {
            let info = api.resolve_op(op_id.parse()?, *resolution).await?;
            if cli.json {
                output::json(&info);
            } else {
                println!("{} {:?}", info.op_id, info.state);
                if let Some(completion) = &info.completion {
                    output::completion(completion);
                }
            }
        }
        RingCommand::Stats => {
            let stats = api.ring_stats().await?;
            if cli.json {
                output::json(&stats);
            } else {
                output::ring_stats(&stats);
            }
        }
        RingCommand::WalStatus => {
            let wal = api.wal_status().await?;
            if cli.json {
                output::json(&wal);
            } else {
                output::wal_status(&wal);
            }
        }
        RingCommand::CircuitBreaker(args) => {
            let breakers = if args.reset {
                api.reset_breakers(bbx_core::op::ResetBreakers {
                    target: args.target.clone(),
                    tenant: args.tenant.clone(),
                })
                .await?
            } else {
                api.breakers().await?
            };
            if cli.json {
                output::json(&breakers);
            } else {
                output::breakers(&breakers);
            }
        }
        RingCommand::Endpoint(words) => {
            let words: Vec<String> = std::iter::once("ring".to_owned())
                .chain(words.iter().cloned())
                .collect();
            return crate::endpoint::run(cli, &words).await;
        }
    }
    Ok(())
}

fn submit_op(args: &SubmitArgs) -> Result<SubmitOp> {
    let json = match &args.args {
        Some(text) => serde_json::from_str(text)
            .map_err(|e| Error::invalid_field("args", format!("ARGS must be JSON, e.g. '{{\"ms\": 5}}': {e}")))?,
        None => serde_json::json!({}),
    };
    Ok(SubmitOp {
        priority: args.priority,
        timeout_ms: args.timeout_ms,
        retries: args.retries.map(|count| RetryPolicy {
            count,
            backoff_ms: args.backoff_ms.unwrap_or(100),
            max_backoff_ms: 30_000,
        }),
        depends_on: args.depends_on.clone(),
        idempotency_key: args.idempotency_key.clone(),
        run_id: args.run_id.clone(),
        step: args.step,
        ..SubmitOp::new(args.agent.parse()?, args.kind.clone(), json)
    })
}

fn done(info: OpInfo, waited_ms: u64) -> Result<Completion> {
    match info.completion {
        Some(completion) => Ok(completion),
        None => bail!("op {} is still {:?} after {waited_ms} ms", info.op_id, info.state),
    }
}

fn print_completion(cli: &Cli, completion: Completion) {
    if cli.json {
        output::json(&completion);
    } else {
        output::completion(&completion);
    }
}

pub fn journal(cli: &Cli, command: &JournalCommand) -> Result<()> {
    let config = resolve_config(cli, &ServeArgs::default())?;
    let check = match command {
        JournalCommand::Verify => bbx_kernel::verify_journal(&config.data_dir)?,
        JournalCommand::Repair => bbx_kernel::repair_journal(&config.data_dir)?,
    };
    if cli.json {
        output::json(&check);
    } else {
        println!(
            "journal {}: {} segments, {} records (lsn {}..{}), checkpoint at {}",
            check.directory.display(),
            check.segments,
            check.records,
            check.first_lsn.map_or("-".into(), |l| l.to_string()),
            check.last_lsn.map_or("-".into(), |l| l.to_string()),
            check.checkpoint_lsn
        );
        match &check.problem {
            None => println!("every record is intact"),
            Some(p) if check.repaired => println!(
                "repaired: cut {} at byte {} ({}), dropping {} bytes",
                p.segment.display(),
                p.offset,
                p.reason,
                p.bytes_after
            ),
            Some(p) if p.torn_tail => println!(
                "torn last write in {} at byte {} ({}); the kernel cuts it off when it starts",
                p.segment.display(),
                p.offset,
                p.reason
            ),
            Some(p) => println!(
                "CORRUPT: {} at byte {}: {}; {} bytes from there on are unreadable. \
                 `bbx journal repair` (kernel stopped) cuts them off, losing the ops and the store writes in them",
                p.segment.display(),
                p.offset,
                p.reason,
                p.bytes_after
            ),
        }
    }
    if matches!(command, JournalCommand::Verify) && check.problem.as_ref().is_some_and(|p| !p.torn_tail) {
        bail!("the journal is corrupt");
    }
    Ok(())
}
