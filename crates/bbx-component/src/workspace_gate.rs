//! Who uses an agent's workspace, and when it is captured: file and program
//! ops use it together; a capture (a snapshot reading the files) waits for the
//! uses that began before it was announced, and the uses that come after it
//! wait for the capture, so a snapshot never reads a file an op is writing.

use bbx_core::AgentId;
use rustc_hash::FxHashMap;
use std::sync::Arc;

#[derive(Default)]
struct Held {
    using: usize,
    capturing: usize,
}

/// The workspaces' users and captures, by agent.
#[derive(Default)]
pub struct WorkspaceGate {
    agents: parking_lot::Mutex<FxHashMap<AgentId, Held>>,
    changed: tokio::sync::Notify,
}

/// An op's use of its agent's workspace, until dropped.
pub struct WorkspaceUse {
    gate: Arc<WorkspaceGate>,
    agent: AgentId,
}

/// A capture of an agent's workspace, announced: uses that begin now wait
/// until it is dropped.
pub struct WorkspaceCapture {
    gate: Arc<WorkspaceGate>,
    agent: AgentId,
}

impl WorkspaceGate {
    /// Waits until no capture of the agent's workspace is announced, then uses it.
    pub async fn enter(self: &Arc<Self>, agent: AgentId) -> WorkspaceUse {
        self.wait_for(agent, |held| {
            let free = held.capturing == 0;
            if free {
                held.using += 1;
            }
            free
        })
        .await;
        WorkspaceUse {
            gate: self.clone(),
            agent,
        }
    }

    /// Announces a capture of the agent's workspace now: a use that begins
    /// after this waits until the capture is dropped.
    pub fn announce(self: &Arc<Self>, agent: AgentId) -> WorkspaceCapture {
        self.agents.lock().entry(agent).or_default().capturing += 1;
        WorkspaceCapture {
            gate: self.clone(),
            agent,
        }
    }

    /// Waits until `ready` holds of the agent's entry (it may change it).
    async fn wait_for(&self, agent: AgentId, mut ready: impl FnMut(&mut Held) -> bool) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the state is read: a change in between wakes it.
            changed.as_mut().enable();
            if ready(self.agents.lock().entry(agent).or_default()) {
                return;
            }
            changed.await;
        }
    }

    fn release(&self, agent: AgentId, release: impl FnOnce(&mut Held)) {
        let mut agents = self.agents.lock();
        if let Some(held) = agents.get_mut(&agent) {
            release(held);
            if held.using == 0 && held.capturing == 0 {
                agents.remove(&agent);
            }
        }
        drop(agents);
        self.changed.notify_waiters();
    }
}

impl WorkspaceCapture {
    /// Waits until the uses that began before the capture was announced end.
    pub async fn quiet(&self) {
        self.gate.wait_for(self.agent, |held| held.using == 0).await;
    }
}

impl Drop for WorkspaceUse {
    fn drop(&mut self) {
        self.gate.release(self.agent, |held| held.using -= 1);
    }
}

impl Drop for WorkspaceCapture {
    fn drop(&mut self) {
        self.gate.release(self.agent, |held| held.capturing -= 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_capture_waits_for_uses_before_it_and_holds_those_after_it() {
        let gate = Arc::new(WorkspaceGate::default());
        let (agent, other) = (AgentId::generate(), AgentId::generate());
        let before = gate.enter(agent).await;
        let capture = gate.announce(agent);
        let quiet = tokio::time::timeout(Duration::from_millis(50), capture.quiet()).await;
        assert!(quiet.is_err(), "a use that began before holds the capture");
        let after = tokio::spawn({
            let gate = gate.clone();
            async move { gate.enter(agent).await }
        });
        let elsewhere = tokio::time::timeout(Duration::from_secs(5), gate.enter(other))
            .await
            .expect("another agent's workspace is free");
        drop(before);
        tokio::time::timeout(Duration::from_secs(5), capture.quiet())
            .await
            .expect("the capture goes once the use ends");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!after.is_finished(), "a use that comes after waits for the capture");
        drop(capture);
        let after = tokio::time::timeout(Duration::from_secs(5), after)
            .await
            .unwrap()
            .unwrap();
        drop((after, elsewhere));
        assert!(gate.agents.lock().is_empty(), "nothing is kept of an agent at rest");
    }
}
