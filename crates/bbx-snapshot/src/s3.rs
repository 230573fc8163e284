//! Snapshots in an S3 bucket (AWS, or any S3-compatible server: SeaweedFS,
//! MinIO, Ceph): [`bbx_objects::S3Store`] as a [`SnapshotStore`].

use crate::store::SnapshotStore;
use bbx_component::Pending;
use bbx_objects::S3Store;
use bytes::Bytes;
use std::ops::Range;

impl SnapshotStore for S3Store {
    fn describe(&self) -> String {
        S3Store::describe(self)
    }

    fn put<'a>(&'a self, name: &'a str, bytes: Bytes) -> Pending<'a, ()> {
        Box::pin(S3Store::put(self, name, bytes))
    }

    fn get<'a>(&'a self, name: &'a str) -> Pending<'a, Option<Bytes>> {
        Box::pin(S3Store::get(self, name))
    }

    fn get_range<'a>(&'a self, name: &'a str, range: Range<u64>) -> Pending<'a, Option<Bytes>> {
        Box::pin(S3Store::get_range(self, name, range))
    }

    fn list<'a>(&'a self, prefix: &'a str) -> Pending<'a, Vec<(String, u64)>> {
        // Names have one level of directory: list the prefix's directory.
        let (dir, start) = prefix.rsplit_once('/').unwrap_or(("", prefix));
        Box::pin(S3Store::list(self, dir, start))
    }

    fn delete<'a>(&'a self, name: &'a str) -> Pending<'a, ()> {
        Box::pin(S3Store::delete(self, name))
    }
}
