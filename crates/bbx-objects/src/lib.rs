//! Object storage for BBX's components: an S3 bucket (AWS, or any
//! S3-compatible server: SeaweedFS, MinIO, Ceph) through `object_store`,
//! named the same way everywhere ([`S3Bucket`]).
//!
//! `bbx-objects` guarantees:
//! - **A `put` that returned is stored** as the server stores it.
//! - **Names stay under the prefix.** A name is checked before it is used:
//!   nothing that could leave `prefix/` is accepted, so a name read back from
//!   stored data cannot reach another component's objects.
//! - **A store that is down fails in seconds**, not the minutes of the
//!   defaults' retries (two retries within 10 s, a 5 s connect timeout), so a
//!   caller can go around it.
//! - **Errors name the bucket and the object, never a secret**, and are
//!   `unavailable`: a server that cannot be reached is not damaged data.

use bbx_core::{Error, Result};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use std::ops::Range;

pub use bbx_core::config::S3Bucket;

/// A bucket, under a prefix.
pub struct S3Store {
    store: AmazonS3,
    bucket: String,
    prefix: String,
}

/// Whether `name` may name an object: ASCII letters, digits and `-_./`,
/// with no empty, `.` or `..` part, at most 200 bytes.
pub fn check_name(name: &str) -> Result<()> {
    let fine = !name.is_empty()
        && name.len() <= 200
        && name
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
    if fine {
        Ok(())
    } else {
        Err(Error::invalid_field("name", format!("{name:?} is not an object name")))
    }
}

impl S3Store {
    /// The bucket under its prefix (`default_prefix` when it names none).
    /// `field` names the setting in errors (`snapshots.stores`).
    pub fn new(bucket: &S3Bucket, default_prefix: &str, field: &str) -> Result<Self> {
        let given = bucket.prefix_or(default_prefix);
        let prefix = given.trim_matches('/');
        if prefix.is_empty() || check_name(prefix).is_err() {
            return Err(Error::invalid_field(
                field,
                format!("an S3 prefix must be a name like {default_prefix}, not {given:?}"),
            ));
        }
        let retry = object_store::RetryConfig {
            max_retries: 2,
            retry_timeout: std::time::Duration::from_secs(10),
            ..Default::default()
        };
        let client = object_store::ClientOptions::default()
            .with_connect_timeout(std::time::Duration::from_secs(5))
            .with_timeout(std::time::Duration::from_secs(60));
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&bucket.bucket)
            .with_region(&bucket.region)
            .with_retry(retry)
            .with_client_options(client);
        if let Some(endpoint) = &bucket.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        if let (Some(id), Some(secret)) = (&bucket.access_key_id, &bucket.secret_access_key) {
            builder = builder.with_access_key_id(id).with_secret_access_key(secret);
        }
        if bucket.anonymous {
            builder = builder.with_skip_signature(true);
        }
        let store = builder
            .build()
            .map_err(|e| Error::invalid_field(field, format!("S3 bucket {}: {e}", bucket.bucket)))?;
        Ok(Self {
            store,
            bucket: bucket.bucket.clone(),
            prefix: prefix.to_owned(),
        })
    }

    /// `s3 BUCKET/PREFIX`.
    pub fn describe(&self) -> String {
        format!("s3 {}/{}", self.bucket, self.prefix)
    }

    fn path(&self, name: &str) -> Result<Path> {
        check_name(name)?;
        Ok(Path::from(format!("{}/{name}", self.prefix)))
    }

    fn fail(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::unavailable(format!("object store {}: {what} failed: {e}", self.describe()))
    }

    pub async fn put(&self, name: &str, bytes: Bytes) -> Result<()> {
        self.store
            .put(&self.path(name)?, bytes.into())
            .await
            .map(drop)
            .map_err(|e| self.fail(&format!("writing {name}"), e))
    }

    /// The object, or `None` where there is none.
    pub async fn get(&self, name: &str) -> Result<Option<Bytes>> {
        match self.store.get(&self.path(name)?).await {
            Ok(found) => found
                .bytes()
                .await
                .map(Some)
                .map_err(|e| self.fail(&format!("reading {name}"), e)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.fail(&format!("reading {name}"), e)),
        }
    }

    /// Bytes `range` of the object, or `None` where there is none; an object
    /// shorter than the range is an error.
    pub async fn get_range(&self, name: &str, range: Range<u64>) -> Result<Option<Bytes>> {
        if range.end < range.start {
            return Err(self.fail(&format!("reading {name}"), "a range that ends before it starts"));
        }
        if range.is_empty() {
            return Ok(Some(Bytes::new()));
        }
        let want = range.end - range.start;
        match self.store.get_range(&self.path(name)?, range.clone()).await {
            Ok(bytes) if bytes.len() as u64 == want => Ok(Some(bytes)),
            Ok(_) => Err(self.fail(&format!("reading {name} at {range:?}"), "the object is shorter")),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.fail(&format!("reading {name} at {range:?}"), e)),
        }
    }

    /// The objects in directory `dir` (one level) whose file names start
    /// with `start`, as (name under the prefix, size), sorted.
    pub async fn list(&self, dir: &str, start: &str) -> Result<Vec<(String, u64)>> {
        let listed = Path::from(format!("{}/{dir}", self.prefix));
        let objects: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&listed))
            .try_collect()
            .await
            .map_err(|e| self.fail("listing", e))?;
        let strip = self.prefix.len() + 1;
        let mut found: Vec<(String, u64)> = objects
            .into_iter()
            .filter_map(|object| {
                let name = object.location.as_ref().get(strip..)?.to_owned();
                let file = name.rsplit('/').next()?;
                file.starts_with(start).then_some((name, object.size))
            })
            .collect();
        found.sort();
        Ok(found)
    }

    /// Removes the object; one that is not there is fine.
    pub async fn delete(&self, name: &str) -> Result<()> {
        match self.store.delete(&self.path(name)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.fail(&format!("removing {name}"), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_never_leave_the_prefix() {
        for bad in ["", "..", "a/../b", "/a", "a//b", "a b", "a\\b", &"x".repeat(201)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for good in ["a", "packs/0a-1.pack", "agents/x_y/12-ff"] {
            check_name(good).unwrap();
        }
    }

    #[test]
    fn a_prefix_must_be_a_name() {
        let bucket = |prefix: &str| S3Bucket {
            bucket: "b".into(),
            prefix: Some(prefix.into()),
            endpoint: Some("http://127.0.0.1:1".into()),
            region: "us-east-1".into(),
            access_key_id: None,
            secret_access_key: None,
            anonymous: true,
        };
        assert!(S3Store::new(&bucket("/"), "bbx-x", "f").is_err());
        assert!(S3Store::new(&bucket("../up"), "bbx-x", "f").is_err());
        assert_eq!(
            S3Store::new(&bucket("/ok/"), "bbx-x", "f").unwrap().describe(),
            "s3 b/ok"
        );
    }
}
