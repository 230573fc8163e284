//! Identifiers of kernel objects.
//!
//! Agent ids are UUIDv7, so their byte order is their creation order: listing agents
//! in key order lists them oldest first, and a page cursor is simply the last id.
//! Parsing is strict (the canonical hyphenated form only), so an id taken from a URL
//! can never carry `/`, `..` or control characters into a storage key.

use crate::error::{Error, ErrorCode};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(Uuid);

        impl $name {
            /// A fresh, time-ordered id.
            pub fn generate() -> Self {
                Self(Uuid::now_v7())
            }

            pub fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }

            pub fn from_bytes(bytes: [u8; 16]) -> Self {
                Self(Uuid::from_bytes(bytes))
            }

            /// Milliseconds since the Unix epoch at which the id was generated.
            pub fn timestamp_ms(&self) -> u64 {
                self.0.get_timestamp().map_or(0, |t| {
                    let (secs, nanos) = t.to_unix();
                    secs * 1000 + u64::from(nanos) / 1_000_000
                })
            }

            /// The smallest id generated at `ms`: ids below it are older.
            pub fn lowest_at(ms: u64) -> Self {
                Self(uuid::Builder::from_unix_timestamp_millis(ms, &[0; 10]).into_uuid())
            }
        }

        impl FromStr for $name {
            type Err = Error;

            fn from_str(s: &str) -> Result<Self, Error> {
                // Only the 36-character hyphenated form: Uuid::parse_str would also take
                // braces, URNs and the simple form, which would give one id many spellings.
                if s.len() == 36 {
                    if let Ok(uuid) = Uuid::try_parse(s) {
                        return Ok(Self(uuid));
                    }
                }
                let shown: String = s.chars().take(64).flat_map(char::escape_default).collect();
                Err(Error::new(
                    ErrorCode::InvalidId,
                    format!(concat!("{:?} is not a valid ", $kind, " id"), shown),
                ))
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(s: String) -> Result<Self, Error> {
                s.parse()
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.to_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0.hyphenated())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .description(Some(concat!("A ", $kind, " id (UUIDv7)")))
                    .into()
            }
        }

        impl utoipa::ToSchema for $name {}

        impl schemars::JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }

            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({
                    "type": "string",
                    "description": concat!("A ", $kind, " id, as returned when it was created")
                })
            }
        }
    };
}

uuid_id!(
    /// The id of an agent, e.g. `0193c7f0-...`.
    AgentId, "agent"
);
uuid_id!(
    /// The id of an op submitted to the AgentRing; time-ordered like every id.
    OpId, "op"
);
impl OpId {
    /// A fresh id for an op admitted at `at`, so that a batch of ops costs one
    /// reading of the clock. Ids made on one thread increase, as
    /// [`generate`](Self::generate)'s do; ids made on two threads within one
    /// millisecond need not be in order (the random bits still keep them apart).
    pub fn generate_at(at: chrono::DateTime<chrono::Utc>) -> Self {
        Self(Uuid::from_u128(next_op_bits(
            u64::try_from(at.timestamp_millis()).unwrap_or(0),
        )))
    }
}

/// The bits of a UUIDv7 made at `ms` on this thread (RFC 9562, section 6.2,
/// method 2): the 12 bits of `rand_a` are drawn once per millisecond, and the 62
/// of `rand_b` are a counter that starts at a random value with its top bit clear
/// (room for 2^61 ids a millisecond) and counts up within it. A clock that steps
/// back does not reorder: the thread stays in its last millisecond. One random
/// draw per millisecond instead of one per id, and no 128-bit division to split a
/// time into parts: `uuid::Uuid::new_v7` took 4 % of the `inproc` bench.
fn next_op_bits(ms: u64) -> u128 {
    use std::cell::Cell;
    const RAND_B: u64 = (1 << 62) - 1;
    thread_local! {
        /// The millisecond of this thread's last id, its `rand_a` and counter;
        /// a spent counter at first, so that a thread's first id draws its bits
        /// even at millisecond 0 (a clock set before 1970).
        static LAST: Cell<(u64, u16, u64)> = const { Cell::new((0, 0, RAND_B)) };
    }
    let (ms, rand_a, counter) = LAST.with(|last| {
        let (last_ms, rand_a, counter) = last.get();
        let next = if ms > last_ms || counter >= RAND_B {
            let seed = Uuid::new_v4().as_u128();
            (
                ms.max(last_ms + u64::from(counter >= RAND_B)),
                // Bits of the v4 seed that are random (not its version or variant).
                (seed >> 80) as u16 & 0xfff,
                seed as u64 & (RAND_B >> 1),
            )
        } else {
            (last_ms, rand_a, counter + 1)
        };
        last.set(next);
        next
    });
    u128::from(ms & 0xffff_ffff_ffff) << 80 | 0x7 << 76 | u128::from(rand_a) << 64 | 0b10 << 62 | u128::from(counter)
}

uuid_id!(
    /// The public id of an API key; the secret part is never stored.
    KeyId, "API key"
);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn generated_ids_round_trip_and_sort_by_creation() {
        let a = AgentId::generate();
        let b = AgentId::generate();
        assert_eq!(a.to_string().parse::<AgentId>().unwrap(), a);
        assert!(a.as_bytes() < b.as_bytes());
    }

    #[test]
    fn ids_of_one_instant_differ_and_increase_with_their_timestamp() {
        let at = chrono::Utc::now();
        let ids: Vec<OpId> = (0..1000).map(|_| OpId::generate_at(at)).collect();
        assert!(ids.windows(2).all(|pair| pair[0].as_bytes() < pair[1].as_bytes()));
        assert_eq!(ids[0].timestamp_ms(), at.timestamp_millis() as u64);
        let later = OpId::generate_at(at + chrono::Duration::milliseconds(5));
        assert!(ids[999].as_bytes() < later.as_bytes());
    }

    #[test]
    fn op_ids_are_uuid_v7_and_stay_ordered_when_the_clock_steps_back() {
        let at = chrono::Utc::now();
        let first = OpId::generate_at(at);
        let uuid = Uuid::from_bytes(*first.as_bytes());
        assert_eq!(uuid.get_version_num(), 7);
        assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122);
        let earlier = OpId::generate_at(at - chrono::Duration::seconds(3));
        assert!(first.as_bytes() < earlier.as_bytes());
        assert_eq!(earlier.timestamp_ms(), at.timestamp_millis() as u64);
    }

    #[test]
    fn op_ids_of_a_clock_before_1970_still_differ_between_threads() {
        let epoch = chrono::DateTime::UNIX_EPOCH - chrono::Duration::days(1);
        let ids: Vec<OpId> = (0..4)
            .map(|_| std::thread::spawn(move || OpId::generate_at(epoch)).join().unwrap())
            .collect();
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len(), "{ids:?}");
    }

    #[test]
    fn hostile_ids_are_rejected() {
        for bad in [
            "",
            "..",
            "../etc/passwd",
            "a/b",
            "0193c7f0\n",
            "{0193c7f0-0000-7000-8000-000000000000}",
        ] {
            let err = bad.parse::<AgentId>().unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidId, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_accepts_only_canonical_form(s in ".{0,80}") {
            if let Ok(id) = s.parse::<AgentId>() {
                prop_assert_eq!(id.to_string(), s.to_ascii_lowercase());
            }
        }
    }
}
