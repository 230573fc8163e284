//! Agents and their state: the kernel objects, their listing, and the tenant
//! each belongs to.

use super::*;

impl Kernel {
    /// The agent's tenant, once the agent is known to exist and the caller may see it.
    pub(crate) fn agent_tenant(&self, caller: &Caller, id: &AgentId) -> Result<Arc<str>> {
        if let Some(tenant) = self.tenants.tenants.read().get(id) {
            caller.check_owner(tenant, "agent", id)?;
            caller.check_agent(id)?;
            return Ok(tenant.clone());
        }
        let deletions = self.tenants.deletions.load(Ordering::Acquire);
        let tenant: Arc<str> = self.load_agent(caller, id)?.tenant.into();
        let mut tenants = self.tenants.tenants.write();
        if self.tenants.deletions.load(Ordering::Acquire) == deletions {
            if tenants.len() >= TENANT_CACHE_AGENTS {
                tenants.clear();
            }
            tenants.insert(*id, tenant.clone());
        }
        Ok(tenant)
    }

    pub(crate) fn load_agent(&self, caller: &Caller, id: &AgentId) -> Result<Agent> {
        let bytes = self
            .store
            .view()
            .get(self.store.keyspace(bbx_agents::AGENTS), id.as_bytes())
            .map_err(|e| storage_error("read", e))?;
        let agent = decode_agent(&bytes.ok_or_else(|| Error::not_found("agent", id))?)?;
        caller.check_owner(&agent.tenant, "agent", id)?;
        caller.check_agent(id)?;
        Ok(agent)
    }

    pub async fn create_agent(&self, caller: &Caller, req: CreateAgent) -> Result<Agent> {
        caller.may(Action::Operate)?;
        validate::name("name", &req.name)?;
        let tenant = match (req.tenant, &caller.tenant) {
            (Some(tenant), _) => tenant,
            (None, Some(own)) => own.clone(),
            (None, None) => DEFAULT_TENANT.to_owned(),
        };
        validate::tenant(&tenant)?;
        caller.check_tenant(&tenant)?;
        let labels = req.labels.unwrap_or_default();
        validate::labels(&labels)?;
        let tools = req.tools.unwrap_or_default();
        bbx_tools::net::validate_settings(&tools)?;
        if !tools.allow_networks.is_empty() || !tools.env_allow.is_empty() {
            // Private networks (the metadata service among them) and the kernel's own
            // environment (where endpoint keys live) are the operator's to open.
            caller.require_admin("let an agent's tools reach private networks or the kernel's environment")?;
        }
        let agent = Agent {
            id: AgentId::generate(),
            name: req.name,
            tenant,
            labels,
            status: AgentStatus::Idle,
            created_at: Utc::now(),
            tools,
        };
        self.authorize(
            caller,
            &Access::new("agent.create", Some(Action::Operate), None).on(&agent),
        )?;
        self.store.write(bbx_agents::AgentWrite::Create(agent.clone())).await?;
        Ok(agent)
    }

    pub fn get_agent(&self, caller: &Caller, id: &AgentId) -> Result<Agent> {
        let agent = self.load_agent(caller, id)?;
        self.authorize(caller, &Access::new("agent.get", Some(Action::Read), None).on(&agent))?;
        Ok(agent)
    }

    pub async fn delete_agent(&self, caller: &Caller, id: &AgentId) -> Result<()> {
        caller.may(Action::Operate)?;
        let agent = self.load_agent(caller, id)?;
        self.authorize(
            caller,
            &Access::new("agent.delete", Some(Action::Operate), None).on(&agent),
        )?;
        // Under the quota updates' lock: a concurrent `set_quota` on this agent
        // either lands before (and its limits go with the agent) or finds no agent.
        let _serial = self.quota_updates.lock().await;
        self.store.write(bbx_agents::AgentWrite::Delete(*id)).await?;
        self.tenants.deletions.fetch_add(1, Ordering::AcqRel);
        self.tenants.tenants.write().remove(id);
        self.components.agent_deleted(&self.context, *id);
        self.quotas.remove(&bbx_quota::Node::Agent(*id));
        self.store
            .write(bbx_quota::stored::PutLimits {
                node: bbx_quota::Node::Agent(*id),
                limits: None,
            })
            .await?;
        Ok(())
    }

    /// The agent's data that every component holds (its state, ...), as of what
    /// is durable.
    pub fn export_agent(&self, caller: &Caller, id: &AgentId) -> Result<bbx_component::AgentData> {
        let agent = self.load_agent(caller, id)?;
        self.authorize(
            caller,
            &Access::new("agent.export", Some(Action::Read), None).on(&agent),
        )?;
        self.components.export(&self.store, &self.store.view(), id)
    }

    /// Replaces the agent's data in every component that `data` has a part for,
    /// atomically.
    pub async fn import_agent(&self, caller: &Caller, data: bbx_component::AgentData) -> Result<()> {
        caller.may(Action::Operate)?;
        let agent = self.load_agent(caller, &data.agent)?;
        self.authorize(
            caller,
            &Access::new("agent.import", Some(Action::Operate), None).on(&agent),
        )?;
        let parts = bbx_component::AgentData {
            agent: data.agent,
            parts: data.parts.iter().map(|(name, _)| (name.clone(), Vec::new())).collect(),
        };
        self.store.write(self.components.import(data)?).await?;
        self.components.imported(&parts);
        Ok(())
    }

    /// Deleted agents whose state is still being removed in the background.
    pub fn pending_purges(&self) -> Result<usize> {
        Ok(bbx_agents::pending_purges(&self.store)?.len())
    }

    pub fn list_agents(&self, caller: &Caller, req: ListAgents) -> Result<AgentPage> {
        if caller.agent.is_some() {
            return Err(Error::permission_denied(
                "a key confined to one agent cannot list agents",
            ));
        }
        let limit = page_limit(req.limit)?;
        let view = self.store.view();
        let tenant = match (req.tenant, &caller.tenant) {
            (Some(tenant), _) => {
                caller.check_tenant(&tenant)?;
                Some(tenant)
            }
            (None, own) => own.clone(),
        };
        self.authorize(
            caller,
            &Access::new("agent.list", Some(Action::Read), tenant.as_deref()),
        )?;
        let label = req.label.as_deref().map(validate::label_selector).transpose()?;
        let after: Option<AgentId> = req
            .cursor
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|_: Error| Error::invalid_field("cursor", "cursor is not one this API returned"))?;

        let ids: Box<dyn Iterator<Item = Result<AgentId>>> = match &tenant {
            Some(tenant) => {
                validate::tenant(tenant)?;
                let start = match &after {
                    Some(id) => Bound::Excluded(bbx_agents::tenant_index_key(tenant, id)),
                    None => Bound::Included(format!("{tenant}\0").into_bytes()),
                };
                let end = Bound::Excluded(format!("{tenant}\u{1}").into_bytes());
                Box::new(
                    view.range(self.store.keyspace(bbx_agents::TENANTS), (start, end))
                        .map(|item| {
                            let key = item.key().map_err(|e| storage_error("scan agents", e))?;
                            let id: [u8; 16] = key[key.len() - 16..].try_into().expect("index keys end in an id");
                            Ok(AgentId::from_bytes(id))
                        }),
                )
            }
            None => {
                let start = match &after {
                    Some(id) => Bound::Excluded(id.as_bytes().to_vec()),
                    None => Bound::Unbounded,
                };
                Box::new(
                    view.range(
                        self.store.keyspace(bbx_agents::AGENTS),
                        (start, Bound::<Vec<u8>>::Unbounded),
                    )
                    .map(|item| {
                        let key = item.key().map_err(|e| storage_error("scan agents", e))?;
                        Ok(AgentId::from_bytes(
                            key.as_ref()
                                .try_into()
                                .map_err(|_| Error::internal("corrupt agent key"))?,
                        ))
                    }),
                )
            }
        };

        let mut agents = Vec::with_capacity(limit.min(128) + 1);
        // A label that few agents carry must not make one request read them all:
        // past the budget the page ends early, and its cursor resumes the scan.
        let mut budget = LIST_SCAN_BUDGET;
        let mut last_read = None;
        let mut out_of_budget = false;
        for id in ids {
            let id = id?;
            if budget == 0 {
                out_of_budget = true;
                break;
            }
            budget -= 1;
            last_read = Some(id);
            let Some(bytes) = view
                .get(self.store.keyspace(bbx_agents::AGENTS), id.as_bytes())
                .map_err(|e| storage_error("read", e))?
            else {
                continue;
            };
            let agent = decode_agent(&bytes)?;
            if let Some((key, value)) = &label
                && agent.labels.get(key) != Some(value)
            {
                continue;
            }
            agents.push(agent);
            if agents.len() > limit {
                break;
            }
        }
        let next_cursor = if agents.len() > limit {
            agents.truncate(limit);
            Some(agents[limit - 1].id.to_string())
        } else {
            // The cursor names the last agent read, matching or not.
            last_read.filter(|_| out_of_budget).map(|id| id.to_string())
        };
        Ok(AgentPage { agents, next_cursor })
    }

    pub fn state_get(&self, caller: &Caller, agent: &AgentId, key: &str) -> Result<StateEntry> {
        validate::state_key(key)?;
        self.agent_tenant(caller, agent)?;
        self.authorize_on_agent(
            caller,
            Access::new("state.get", Some(Action::Read), None).key(key),
            agent,
        )?;
        let bytes = self
            .store
            .view()
            .get(
                self.store.keyspace(bbx_agents::STATE),
                bbx_agents::state_key(agent, key),
            )
            .map_err(|e| storage_error("read", e))?;
        let entry = match bytes {
            Some(bytes) => decode_entry(key.to_owned(), &bytes)?,
            None => None,
        };
        entry.ok_or_else(|| Error::not_found("state key", key))
    }

    pub async fn state_set(&self, caller: &Caller, agent: &AgentId, key: String, req: SetState) -> Result<StateEntry> {
        caller.may(Action::Act)?;
        validate::state_key(&key)?;
        let json = serde_json::to_vec(&req.value).map_err(|e| Error::invalid_field("value", e.to_string()))?;
        if json.len() > self.config.max_body_bytes {
            return Err(Error::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "the value is {} bytes; the limit is {}",
                    json.len(),
                    self.config.max_body_bytes
                ),
            ));
        }
        self.agent_tenant(caller, agent)?;
        self.authorize_on_agent(
            caller,
            Access::new("state.set", Some(Action::Act), None).key(&key),
            agent,
        )?;
        let at = Utc::now();
        // Written outside any op, the value is still labelled as an op's would be.
        let labels = self.components.label_write(agent, &req.value);
        let write = bbx_agents::AgentWrite::SetState {
            agent: *agent,
            key: key.clone(),
            value: json,
            if_version: req.if_version,
            at,
            labels: labels.clone(),
        };
        match self.store.write(write).await? {
            Applied::Version(version) => Ok(StateEntry {
                key,
                value: req.value,
                version,
                updated_at: at,
                labels,
            }),
            _ => Err(Error::internal("state write reported no version")),
        }
    }

    pub async fn state_delete(
        &self,
        caller: &Caller,
        agent: &AgentId,
        key: String,
        if_version: Option<u64>,
    ) -> Result<()> {
        caller.may(Action::Act)?;
        validate::state_key(&key)?;
        self.agent_tenant(caller, agent)?;
        self.authorize_on_agent(
            caller,
            Access::new("state.delete", Some(Action::Act), None).key(&key),
            agent,
        )?;
        self.store
            .write(bbx_agents::AgentWrite::DeleteState {
                agent: *agent,
                key,
                if_version,
                at: Utc::now(),
            })
            .await
            .map(drop)
    }

    pub fn state_list(&self, caller: &Caller, agent: &AgentId, req: ListState) -> Result<StatePage> {
        let limit = page_limit(req.limit)?;
        self.agent_tenant(caller, agent)?;
        let listed = Access::new("state.list", Some(Action::Read), None).key(req.prefix.as_deref().unwrap_or(""));
        self.authorize_on_agent(caller, listed, agent)?;
        let prefix = bbx_agents::state_key(agent, req.prefix.as_deref().unwrap_or(""));
        let start = match req.cursor.as_deref() {
            Some(cursor) => {
                // A cursor is the last key of a page of this listing, so it lies
                // inside the prefix; anything else would silently end the listing.
                let after = hex::decode(cursor)
                    .ok()
                    .and_then(|bytes| String::from_utf8(bytes).ok())
                    .filter(|after| after.starts_with(req.prefix.as_deref().unwrap_or("")))
                    .ok_or_else(|| Error::invalid_field("cursor", "cursor is not one this listing returned"))?;
                Bound::Excluded(bbx_agents::state_key(agent, &after))
            }
            None => Bound::Included(prefix.clone()),
        };
        // Deleted keys leave tombstones, which a page skips; bounding the keys one page
        // may examine keeps a request cheap however many keys were deleted. A page cut
        // short this way still carries a cursor.
        let max_scan = limit.saturating_mul(4).max(1024);
        let mut entries = Vec::with_capacity(limit.min(128) + 1);
        let mut last_scanned = None;
        let mut scanned = 0;
        for item in self.store.view().range(
            self.store.keyspace(bbx_agents::STATE),
            (start, Bound::<Vec<u8>>::Unbounded),
        ) {
            let (raw_key, value) = item.into_inner().map_err(|e| storage_error("scan state", e))?;
            if !raw_key.starts_with(&prefix) {
                last_scanned = None;
                break;
            }
            let key = String::from_utf8(raw_key[16..].to_vec()).map_err(|_| Error::internal("corrupt state key"))?;
            if let Some(entry) = decode_entry(key.clone(), &value)? {
                entries.push(entry);
            }
            if entries.len() > limit {
                break;
            }
            scanned += 1;
            last_scanned = Some(key);
            if scanned >= max_scan {
                break;
            }
        }
        let next_cursor = if entries.len() > limit {
            entries.truncate(limit);
            Some(hex::encode(entries[limit - 1].key.as_bytes()))
        } else if scanned >= max_scan {
            last_scanned.map(|key| hex::encode(key.as_bytes()))
        } else {
            None
        };
        Ok(StatePage { entries, next_cursor })
    }

    pub fn status(&self, caller: &Caller) -> Result<Status> {
        self.authorize(
            caller,
            &Access::new("status", Some(Action::Read), caller.tenant.as_deref()),
        )?;
        let (agents, host) = match &caller.tenant {
            None => (bbx_agents::agent_count(&self.store)?, true),
            Some(tenant) => {
                let mut count = 0;
                for item in self
                    .store
                    .view()
                    .prefix(self.store.keyspace(bbx_agents::TENANTS), format!("{tenant}\0"))
                {
                    item.key().map_err(|e| storage_error("count agents", e))?;
                    count += 1;
                }
                (count, false)
            }
        };
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_secs: self.started.elapsed().as_secs(),
            agents,
            listen: self.config.listen.to_string(),
            data_dir: host.then(|| self.config.data_dir.display().to_string()),
            storage: host.then(|| StorageStatus {
                engine: "fjall".into(),
                disk_bytes: self.store.database().disk_space().unwrap_or(0),
                writes_committed: self.store.metrics().writes.get(),
                syncs: self.store.metrics().syncs.get(),
            }),
        })
    }
}

/// The entry a stored value holds, or `None` for a deleted key's tombstone.
fn decode_entry(key: String, bytes: &[u8]) -> Result<Option<StateEntry>> {
    let stored = decode_state(bytes)?;
    if stored.is_tombstone() {
        return Ok(None);
    }
    let value =
        serde_json::from_slice(stored.json).map_err(|e| Error::internal(format!("stored value is unreadable: {e}")))?;
    Ok(Some(StateEntry {
        key,
        value,
        version: stored.version,
        updated_at: stored.updated_at,
        labels: stored.labels,
    }))
}
