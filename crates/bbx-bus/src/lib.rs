//! The MessageBus: topics in tenant namespaces, published to durably and consumed
//! through consumer groups with leases, acks, redelivery and dead letters.
//!
//! `bbx-bus` owns the bus's data in the kernel's store and guarantees:
//! - **Acknowledged means durable.** A publish answers once its messages are in a
//!   group commit that reached `fdatasync`; a batch is stored whole or not at all.
//!   The log is the store: a message is written once.
//! - **Order per partition.** A message's partition is chosen by its ordering key
//!   (or its id); offsets in a partition are given in commit order, without reuse.
//! - **Dedup.** A message id published again within `bus.dedup_window_secs` stores
//!   nothing and answers where the first one is.
//! - **At-least-once to consumers.** A group delivers each message until it is
//!   acknowledged; a lease that passes its ack wait, or a nack, delivers it again
//!   (after a backoff); after the topic's `max_deliveries` it goes to the topic's
//!   dead letters with the reason, and is settled for the group. Acks are durable
//!   before they are answered; leases are not, so a restart delivers again what was
//!   not acknowledged. The message's `id` is the consumer's idempotency key.
//! - **Retention** by age, count and bytes never drops a message a group has not
//!   settled, unless the topic says `drop_unconsumed` (and then counts it).
//! - **Exactly once into agents' ops.** A route ([`route`]) turns each message of
//!   a topic into an op of an agent whose idempotency key names the message, so
//!   its effect happens once however often the message is delivered.
//! - **Tenants never meet.** Every key starts with the tenant; a caller sees its
//!   own tenant's topics only.
//!
//! [`keys`] lays the data out, [`log`] writes and reads messages, [`group`] is the
//! consumer-group state machine, [`topic`] a topic's settings, `bus` the runtime
//! that ties them to the store, `retention` the sweeper, `endpoints` the API.

mod bus;
mod component;
pub mod direct;
mod endpoints;
pub mod group;
pub mod keys;
pub mod log;
pub(crate) mod ops;
mod retention;
pub mod route;
pub mod topic;

pub use bus::{Bus, DeadLetter, Delivered, Start};

use bbx_store::KeyspaceDef;

/// tenant, topic -> [`topic::TopicConfig`] as JSON. Ids are what redo records
/// carry: never change them.
pub const BUS_TOPICS: KeyspaceDef = KeyspaceDef {
    id: 19,
    name: "bus_topics",
};
/// topic, partition, offset -> a [`keys::Stored`] message.
pub const BUS_MESSAGES: KeyspaceDef = KeyspaceDef {
    id: 20,
    name: "bus_messages",
};
/// topic, message id -> where it was stored and when.
pub const BUS_DEDUP: KeyspaceDef = KeyspaceDef {
    id: 21,
    name: "bus_dedup",
};
/// topic, group -> the group's settings (`m`) and each partition's floor (`f`).
pub const BUS_GROUPS: KeyspaceDef = KeyspaceDef {
    id: 22,
    name: "bus_groups",
};
/// topic, group, partition, offset -> nothing: an ack above the floor.
pub const BUS_ACKS: KeyspaceDef = KeyspaceDef {
    id: 23,
    name: "bus_acks",
};
/// topic, sequence -> a dead letter as JSON.
pub const BUS_DEAD: KeyspaceDef = KeyspaceDef {
    id: 24,
    name: "bus_dead",
};
/// topic, partition -> the partition's next offset.
pub const BUS_HEADS: KeyspaceDef = KeyspaceDef {
    id: 25,
    name: "bus_heads",
};

pub const KEYSPACES: [KeyspaceDef; 8] = [
    BUS_TOPICS,
    BUS_MESSAGES,
    BUS_DEDUP,
    BUS_GROUPS,
    BUS_ACKS,
    BUS_DEAD,
    BUS_HEADS,
    route::BUS_ROUTES,
];
