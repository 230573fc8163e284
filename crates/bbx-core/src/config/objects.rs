//! An S3 bucket, as every component that keeps objects names one: AWS, or an
//! S3-compatible server (SeaweedFS, MinIO, Ceph) at `endpoint`.

use serde::{Deserialize, Serialize};

/// A bucket and who signs for it. Keys from here, else where the AWS SDKs
/// look (`AWS_*` variables, the instance's role); `anonymous = true` sends
/// unsigned requests (a server that allows them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Bucket {
    pub bucket: String,
    /// Objects go under `prefix/` [default: the component's own, such as
    /// `bbx-snapshots`].
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub secret_access_key: Option<String>,
    #[serde(default)]
    pub anonymous: bool,
}

fn default_region() -> String {
    "us-east-1".to_owned()
}

impl S3Bucket {
    /// Its prefix, or `default`.
    pub fn prefix_or<'a>(&'a self, default: &'a str) -> &'a str {
        self.prefix.as_deref().unwrap_or(default)
    }
}
