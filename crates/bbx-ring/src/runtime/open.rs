//! Opening the ring: recovery from the journal's records, and its tasks.

use super::*;

impl Ring {
    /// Starts the ring on a journal whose writer holds every record in `recovered`
    /// (the journal's records after its checkpoint): ops accepted but not completed
    /// are queued again and their records kept; the ring's other records are
    /// released. The store has already replayed its own records.
    pub async fn open(
        config: RingConfig,
        store: Arc<Store>,
        journal: JournalWriter,
        metrics: RingMetrics,
        recovered: Vec<bbx_journal::Record>,
        tasks: TaskTracker,
        services: Services,
    ) -> Result<Arc<Self>> {
        let view = store.view();
        // An op retried after it was in doubt is journaled again, one incarnation
        // up; only its latest incarnation and that one's start mark count.
        let mut accepted: FxHashMap<OpId, (Lsn, OpRecord)> = FxHashMap::default();
        let mut order = Vec::new();
        let mut started: FxHashMap<(OpId, u32), (Lsn, Option<bbx_core::quota::Reservation>)> = FxHashMap::default();
        let mut released = Vec::new();
        for record in recovered {
            if bbx_store::redo::is_redo(&record.payload) {
                continue;
            }
            released.push(record.lsn);
            match Entry::decode(&record.payload)? {
                Entry::Accepted(op) => {
                    let newer = accepted
                        .get(&op.op_id)
                        .is_none_or(|(_, known)| op.incarnation >= known.incarnation);
                    if newer {
                        if !accepted.contains_key(&op.op_id) {
                            order.push(op.op_id);
                        }
                        accepted.insert(op.op_id, (record.lsn, op));
                    }
                }
                Entry::Started {
                    op_id,
                    incarnation,
                    reserved,
                } => {
                    started.insert((op_id, incarnation), (record.lsn, reserved));
                }
            }
        }
        let mut pending = Vec::new();
        let mut held = FxHashSet::default();
        for id in order {
            let Some((lsn, op)) = accepted.remove(&id) else {
                continue;
            };
            let done = view
                .get(store.keyspace(store::OPS), op.op_id.as_bytes())
                .map_err(|e| storage_error("read ops", e))?
                .is_some();
            if !done {
                let mark = started.remove(&(op.op_id, op.incarnation));
                held.insert(lsn);
                held.extend(mark.as_ref().map(|(lsn, _)| *lsn));
                let exec = Exec::parse(&services.components, &op.kind, &op.args).unwrap_or_else(|error| {
                    tracing::warn!(op = %op.op_id, kind = %op.kind, %error, "a recovered op is refused: it completes with the error");
                    Exec::Refused(error)
                });
                pending.push(engine::Recovered {
                    record: op,
                    exec,
                    lsn,
                    started: mark,
                });
            }
        }
        released.retain(|lsn| !held.contains(lsn));
        journal.release(released);
        let ring = Arc::new(Self::new(config, store, journal, metrics, tasks.clone(), services));
        if !pending.is_empty() {
            tracing::info!(ops = pending.len(), "re-queued journaled ops that had not completed");
        }
        ring.recover(pending)?;
        tasks.spawn(ring.clone().dispatch());
        tasks.spawn(ring.clone().copy_forward_every());
        tasks.spawn(ring.clone().evict_idle_breakers());
        tasks.spawn(ring.clone().expire_every());
        Ok(ring)
    }

    pub(super) fn new(
        config: RingConfig,
        store: Arc<Store>,
        journal: JournalWriter,
        metrics: RingMetrics,
        tasks: TaskTracker,
        Services { quotas, components }: Services,
    ) -> Self {
        let scheduler = SchedulerConfig {
            capacity: config.submission_capacity,
            agent_capacity: config.agent_capacity,
            aging: Duration::from_millis(config.aging_ms),
            shed_low_above: config.shed_low_above,
        };
        let breakers = Breakers::new(BreakerConfig {
            failure_threshold: config.breaker_failures,
            open_for: Duration::from_millis(config.breaker_open_ms),
            half_open_trials: config.breaker_trials,
        });
        let work = Arc::new(Notify::new());
        let key_epochs = Arc::new(KeyEpochs::default());
        let started = Instant::now();
        let engine = Engine::new(
            engine::EngineConfig {
                scheduler,
                recent_completions: config.recent_completions,
            },
            Arc::new(InFlightOps(quotas.clone())),
            key_epochs.clone(),
            metrics.clone(),
            started,
        );
        Self {
            running: Capacity::new(config.max_running, work.clone()),
            completing: Capacity::new(config.completion_capacity, work.clone()),
            work,
            state: Mutex::new(engine),
            config,
            store,
            journal,
            room: tokio::sync::Notify::new(),
            room_waiters: AtomicUsize::new(0),
            breakers,
            key_epochs,
            events: broadcast::channel(EVENT_BUFFER).0,
            closing: AtomicBool::new(false),
            poisoned: AtomicBool::new(false),
            stopping: CancellationToken::new(),
            started,
            metrics,
            tasks,
            quotas,
            components,
        }
    }

    /// Puts recovered ops back (see [`Engine::recover`]), with the budgets their
    /// start marks reserved.
    pub(super) fn recover(self: &Arc<Self>, pending: Vec<engine::Recovered<KernelHost>>) -> Result<()> {
        for op in &pending {
            if let Some((_, Some(reservation))) = &op.started {
                self.quotas.rereserve(&op.record.tenant, op.record.agent, reservation);
            }
        }
        let mut finish = Vec::new();
        let preread = Preread::default();
        self.lock()
            .recover(pending, &preread.with(self), Instant::now(), &mut finish)?;
        self.work.notify_one();
        self.finish_all(finish);
        Ok(())
    }
}
