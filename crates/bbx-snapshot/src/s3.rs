//! Objects in an S3 bucket (AWS, or any S3-compatible server: SeaweedFS,
//! MinIO, Ceph), through `object_store`. A `put` that returned is stored as
//! the server stores it; names go under `prefix/` in the bucket.

use crate::store::{SnapshotStore, check_name, unavailable};
use bbx_component::Pending;
use bbx_core::{Error, Result};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use std::ops::Range;

/// Where the bucket is and who signs for it.
pub struct S3Settings<'a> {
    pub bucket: &'a str,
    pub prefix: &'a str,
    /// An S3-compatible server's URL; AWS's own when `None`.
    pub endpoint: Option<&'a str>,
    pub region: &'a str,
    /// Keys from the configuration; else what the AWS SDKs would find
    /// (`AWS_*` variables, the instance's role).
    pub access_key_id: Option<&'a str>,
    pub secret_access_key: Option<&'a str>,
    /// Unsigned requests, for a server that allows anonymous access.
    pub anonymous: bool,
}

pub struct S3Store {
    store: AmazonS3,
    bucket: String,
    prefix: String,
}

impl S3Store {
    pub fn new(settings: &S3Settings<'_>) -> Result<Self> {
        let prefix = settings.prefix.trim_matches('/');
        if prefix.is_empty() || check_name(prefix).is_err() {
            return Err(Error::invalid_field(
                "snapshots.stores",
                format!(
                    "an S3 store's prefix must be a name like bbx-snapshots, not {:?}",
                    settings.prefix
                ),
            ));
        }
        // A store that is down fails its calls in seconds, not the minutes of
        // the defaults' retries: the other stores are written around it.
        let retry = object_store::RetryConfig {
            max_retries: 2,
            retry_timeout: std::time::Duration::from_secs(10),
            ..Default::default()
        };
        let client = object_store::ClientOptions::default()
            .with_connect_timeout(std::time::Duration::from_secs(5))
            .with_timeout(std::time::Duration::from_secs(60));
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(settings.bucket)
            .with_region(settings.region)
            .with_retry(retry)
            .with_client_options(client);
        if let Some(endpoint) = settings.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        if let (Some(id), Some(secret)) = (settings.access_key_id, settings.secret_access_key) {
            builder = builder.with_access_key_id(id).with_secret_access_key(secret);
        }
        if settings.anonymous {
            builder = builder.with_skip_signature(true);
        }
        let store = builder
            .build()
            .map_err(|e| Error::invalid_field("snapshots.stores", format!("S3 bucket {}: {e}", settings.bucket)))?;
        Ok(Self {
            store,
            bucket: settings.bucket.to_owned(),
            prefix: prefix.to_owned(),
        })
    }

    fn path(&self, name: &str) -> Result<Path> {
        check_name(name)?;
        Ok(Path::from(format!("{}/{name}", self.prefix)))
    }

    fn fail(&self, what: &str, e: impl std::fmt::Display) -> Error {
        unavailable(&self.describe(), what, e)
    }
}

impl SnapshotStore for S3Store {
    fn describe(&self) -> String {
        format!("s3 {}/{}", self.bucket, self.prefix)
    }

    fn put<'a>(&'a self, name: &'a str, bytes: Bytes) -> Pending<'a, ()> {
        Box::pin(async move {
            self.store
                .put(&self.path(name)?, bytes.into())
                .await
                .map(drop)
                .map_err(|e| self.fail(&format!("writing {name}"), e))
        })
    }

    fn get<'a>(&'a self, name: &'a str) -> Pending<'a, Option<Bytes>> {
        Box::pin(async move {
            match self.store.get(&self.path(name)?).await {
                Ok(found) => found
                    .bytes()
                    .await
                    .map(Some)
                    .map_err(|e| self.fail(&format!("reading {name}"), e)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.fail(&format!("reading {name}"), e)),
            }
        })
    }

    fn get_range<'a>(&'a self, name: &'a str, range: Range<u64>) -> Pending<'a, Option<Bytes>> {
        Box::pin(async move {
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
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> Pending<'a, Vec<(String, u64)>> {
        Box::pin(async move {
            // Names have one level of directory: list the prefix's directory.
            let (dir, start) = prefix.rsplit_once('/').unwrap_or(("", prefix));
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
        })
    }

    fn delete<'a>(&'a self, name: &'a str) -> Pending<'a, ()> {
        Box::pin(async move {
            match self.store.delete(&self.path(name)?).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(self.fail(&format!("removing {name}"), e)),
            }
        })
    }
}
