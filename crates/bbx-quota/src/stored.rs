//! Quotas in the store: each node's limits, and what each node spent in each
//! budget window, loaded at start and written through the store's group commit.
//!
//! Layout (ids are what redo records carry: never change one):
//! - `quotas`: node (`tenant/NAME`, `agent/ID`)          -> QuotaLimits as JSON
//! - `spend`:  node `|` window (`2026-11-24`, `2026-11`) -> micro-dollars spent (u64)

use crate::{Quotas, parse_spend_key};
use bbx_core::quota::{Node, QuotaLimits};
use bbx_core::{Error, Result};
use bbx_store::{Applied, GroupTx, KeyspaceDef, Staged, Store, storage_error};

pub const QUOTAS: KeyspaceDef = KeyspaceDef { id: 8, name: "quotas" };
pub const SPEND: KeyspaceDef = KeyspaceDef { id: 9, name: "spend" };
pub const KEYSPACES: [KeyspaceDef; 2] = [QUOTAS, SPEND];

/// Loads every stored node's limits and spend.
pub fn load(store: &Store) -> Result<Quotas> {
    let quotas = Quotas::new();
    for item in store.keyspace(QUOTAS).iter() {
        let (key, value) = item.into_inner().map_err(|e| storage_error("load quotas", e))?;
        let node: Node = String::from_utf8_lossy(&key).parse()?;
        let limits: QuotaLimits = serde_json::from_slice(&value)
            .map_err(|e| Error::internal(format!("the stored quota of {node} is unreadable: {e}")))?;
        quotas.set(node, limits)?;
    }
    for item in store.keyspace(SPEND).iter() {
        let (key, value) = item.into_inner().map_err(|e| storage_error("load spend", e))?;
        let key = String::from_utf8_lossy(&key);
        let (node, window) = parse_spend_key(&key)
            .ok_or_else(|| Error::internal(format!("a stored spend key is unreadable: {key:?}")))?;
        let micros = value
            .as_ref()
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| Error::internal(format!("the spend of {key:?} is unreadable")))?;
        quotas.load_spent(node, &window, micros);
    }
    Ok(quotas)
}

/// Sets (or with `None` removes) a node's stored limits.
#[derive(Debug)]
pub struct PutLimits {
    pub node: Node,
    pub limits: Option<QuotaLimits>,
}

impl Staged for PutLimits {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        let key = self.node.to_string().into_bytes();
        match &self.limits {
            Some(limits) => {
                let json = serde_json::to_vec(limits).map_err(|e| Error::internal(e.to_string()))?;
                tx.put(QUOTAS, key, json);
            }
            None => tx.remove(QUOTAS, key),
        }
        Ok(Applied::Done)
    }
}

/// Adds `micros` to each spend counter in `keys` ([`crate::spend_key`]), in the
/// group of the op's completion that spent them.
pub fn stage_charge(tx: &mut GroupTx<'_>, keys: &[String], micros: u64) -> Result<()> {
    for key in keys {
        let spent = tx
            .read(SPEND, key.as_bytes())?
            .and_then(|v| <[u8; 8]>::try_from(&v[..]).ok().map(u64::from_be_bytes))
            .unwrap_or(0);
        tx.put(SPEND, key.as_bytes().to_vec(), (spent + micros).to_be_bytes().to_vec());
    }
    Ok(())
}
