//! The bus as a component of the kernel: its keyspaces, its recovery (topics,
//! groups and acks loaded; the retention sweeper and the routes started), its
//! endpoints and op kinds ([`crate::ops`]); and dead-letter replay and purge,
//! which need the store whole.

use crate::bus::{Bus, DeadLetter, Topic, Writes};
use crate::keys::TopicKey;
use crate::log::{Outgoing, Publish, Published, stage_publish};
use crate::{BUS_DEAD, KEYSPACES};
use bbx_component::access::Right;
use bbx_component::{Component, Context, Endpoint, OpKind, Prepared, Submission, Verdict};
use bbx_core::Result;
use bbx_core::op::{Completion, CompletionStatus};
use bbx_store::{Applied, GroupTx, KeyspaceDef, Staged};
use chrono::Utc;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

impl Component for Bus {
    fn name(&self) -> &'static str {
        "bus"
    }

    fn keyspaces(&self) -> &'static [KeyspaceDef] {
        &KEYSPACES
    }

    fn start(&self, ctx: &Context) -> Result<()> {
        self.load(&ctx.store)?;
        let _ = self.0.ctx.set(ctx.clone());
        crate::retention::spawn(self)?;
        self.start_routes()
    }

    fn agent_deleted(&self, _ctx: &Context, agent: bbx_core::AgentId) {
        self.forget_agent_routes(&agent);
    }

    fn endpoints(&self, _ctx: &Context) -> Vec<Endpoint> {
        crate::endpoints::endpoints(self)
    }

    fn kinds(&self) -> &'static [OpKind] {
        crate::ops::KINDS
    }

    fn args_schema(&self, kind: &str) -> Option<Value> {
        crate::ops::args_schema(kind)
    }

    fn prepare(&self, kind: &str, args: &Value) -> Result<Prepared> {
        crate::ops::prepare(self, kind, args)
    }

    fn observes(&self) -> bool {
        true
    }

    fn checks_ops(&self) -> bool {
        true
    }

    /// An op on an agent's topic by another agent needs its grant.
    fn check(&self, submission: &Submission<'_>, _labels: &mut Vec<String>) -> Result<Verdict> {
        let op = submission.op;
        let right = match op.kind.as_str() {
            "bus.publish" => Right::Write,
            "bus.fetch" | "bus.ack" => Right::Read,
            _ => return Ok(Verdict::Allow),
        };
        let Some(name) = op.args.get("topic").and_then(Value::as_str) else {
            return Ok(Verdict::Allow);
        };
        if let Ok(topic) = self.topic(&TopicKey::new(submission.tenant, name)) {
            self.may_use(&topic, Some(op.agent), right)?;
        }
        Ok(Verdict::Allow)
    }

    /// A `bus.publish` or `bus.send` that committed wakes the topic's subscribers.
    fn completed(&self, completion: &Arc<Completion>) {
        let publishes = matches!(completion.kind.as_ref(), "bus.publish" | "bus.send");
        if !publishes || completion.status != CompletionStatus::Ok {
            return;
        }
        let Some(topic) = completion.result.as_ref().and_then(|r| r["topic"].as_str()) else {
            return;
        };
        let key = TopicKey::new(&completion.tenant, topic);
        if self.learn_topic(&key).is_ok()
            && let Ok(topic) = self.topic(&key)
        {
            topic
                .counts
                .published
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            topic.wake();
        }
    }
}

/// Publishes dead letters again and takes them out, in one write.
#[derive(Debug)]
struct Replay {
    publish: Publish,
    remove: Vec<Vec<u8>>,
}

impl Staged for Replay {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        let published = tx.all_or_nothing(|tx| {
            let published = stage_publish(tx, &self.publish)?;
            for key in &self.remove {
                tx.remove(BUS_DEAD, key.clone());
            }
            Ok(published)
        })?;
        Ok(Applied::output(published))
    }
}

impl Bus {
    /// Publishes the dead letters `seqs` (all without) again, each under a new id
    /// (`ID.replay-SEQ`, so the dedup window does not swallow it).
    pub(crate) async fn replay(&self, topic: &Topic, seqs: Option<&[u64]>) -> Result<Vec<Published>> {
        let letters: Vec<DeadLetter> = self
            .dead_letters(topic, usize::MAX)?
            .into_iter()
            .filter(|d| seqs.is_none_or(|seqs| seqs.contains(&d.seq)))
            .collect();
        if letters.is_empty() {
            return Ok(Vec::new());
        }
        let mut messages = Vec::with_capacity(letters.len());
        for letter in &letters {
            let id = format!("{}.replay-{}", letter.id, letter.seq);
            messages.push(Outgoing {
                // Replaying twice at once stores each letter once.
                given_id: true,
                id,
                key: letter.key.clone(),
                payload: serde_json::to_vec(&letter.payload).unwrap_or_default(),
            });
        }
        let replay = Replay {
            publish: Publish {
                topic: topic.key.clone(),
                create: None,
                messages,
                dedup_window: Duration::from_secs(self.0.config.dedup_window_secs),
                at: Utc::now(),
            },
            remove: letters.iter().map(|d| topic.key.dead(d.seq)).collect(),
        };
        let published: Vec<Published> = self.store()?.write(replay).await?.into_output()?;
        topic.wake();
        Ok(published)
    }

    /// Deletes every dead letter of `topic`; how many.
    pub(crate) async fn purge(&self, topic: &Topic) -> Result<usize> {
        let letters = self.dead_letters(topic, usize::MAX)?;
        let mut writes = Writes::default();
        for letter in &letters {
            writes.remove(BUS_DEAD, topic.key.dead(letter.seq));
        }
        if !writes.0.is_empty() {
            self.store()?.write(writes).await?;
        }
        Ok(letters.len())
    }
}
