//! Where snapshots are kept: the [`SnapshotStore`] trait, a flat namespace of
//! immutable objects (packs of chunks, manifests), and its implementations: a
//! local directory ([`LocalDir`], the default) and Redis ([`RedisStore`]).
//!
//! An object is written whole or not at all, and a `put` that returned is
//! durable as far as the store can make it: a local object is written to a
//! temporary file, `fdatasync`ed, renamed into place and its directory synced.

use bbx_component::Pending;
use bbx_core::{Error, Result};
use bytes::Bytes;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A flat namespace of immutable objects named like `packs/ID.pack`.
pub trait SnapshotStore: Send + Sync {
    /// What it is, for `list-replicas` and errors (`local /var/lib/bbx/snapshots`).
    fn describe(&self) -> String;

    /// Writes an object whole; durable once this returns.
    fn put<'a>(&'a self, name: &'a str, bytes: Bytes) -> Pending<'a, ()>;

    /// A whole object, or `None` if it is not there.
    fn get<'a>(&'a self, name: &'a str) -> Pending<'a, Option<Bytes>>;

    /// An object's bytes in `range`, or `None` if the object is not there. A
    /// range past its end is an error.
    fn get_range<'a>(&'a self, name: &'a str, range: Range<u64>) -> Pending<'a, Option<Bytes>>;

    /// Every object whose name starts with `prefix`, with its size.
    fn list<'a>(&'a self, prefix: &'a str) -> Pending<'a, Vec<(String, u64)>>;

    /// Removes an object (nothing if it is not there).
    fn delete<'a>(&'a self, name: &'a str) -> Pending<'a, ()>;
}

pub(crate) fn unavailable(store: &str, what: &str, e: impl std::fmt::Display) -> Error {
    Error::unavailable(format!("snapshot store {store}: {what} failed: {e}"))
}

/// Object names are built by this crate, but a manifest read back names its
/// packs: nothing that could leave the store's namespace is accepted.
pub(crate) use bbx_objects::check_name;

/// Objects as files under a directory.
pub struct LocalDir {
    root: PathBuf,
}

impl LocalDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn path(&self, name: &str) -> Result<PathBuf> {
        check_name(name)?;
        Ok(self.root.join(name))
    }

    fn describe(&self) -> String {
        format!("local {}", self.root.display())
    }

    fn fail(&self, what: &str, e: impl std::fmt::Display) -> Error {
        unavailable(&self.describe(), what, e)
    }

    fn put_blocking(&self, name: &str, bytes: &[u8]) -> Result<()> {
        use std::io::Write;
        let path = self.path(name)?;
        let dir = path.parent().expect("object paths have a parent");
        std::fs::create_dir_all(dir).map_err(|e| self.fail("mkdir", e))?;
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            path.file_name().expect("named").to_string_lossy(),
            uuid::Uuid::new_v4().simple()
        ));
        let written = (|| {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(bytes)?;
            file.sync_data()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(dir)?.sync_all()
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.map_err(|e| self.fail(&format!("writing {name}"), e))
    }

    fn get_blocking(&self, name: &str) -> Result<Option<Bytes>> {
        match std::fs::read(self.path(name)?) {
            Ok(bytes) => Ok(Some(bytes.into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.fail(&format!("reading {name}"), e)),
        }
    }

    fn get_range_blocking(&self, name: &str, range: Range<u64>) -> Result<Option<Bytes>> {
        if range.end < range.start {
            return Err(self.fail(&format!("reading {name}"), "a range that ends before it starts"));
        }
        use std::os::unix::fs::FileExt;
        let path = self.path(name)?;
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.fail(&format!("opening {name}"), e)),
        };
        let mut bytes = vec![0; (range.end - range.start) as usize];
        file.read_exact_at(&mut bytes, range.start)
            .map_err(|e| self.fail(&format!("reading {name} at {range:?}"), e))?;
        Ok(Some(bytes.into()))
    }

    fn list_blocking(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        // Names have one level of directory: list the prefix's directory.
        let (dir, start) = prefix.rsplit_once('/').unwrap_or(("", prefix));
        let entries = match std::fs::read_dir(self.root.join(dir)) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.fail("listing", e)),
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| self.fail("listing", e))?;
            let file = entry.file_name().to_string_lossy().into_owned();
            if file.starts_with('.') || !file.starts_with(start) {
                continue;
            }
            let size = entry.metadata().map_err(|e| self.fail("listing", e))?.len();
            found.push((if dir.is_empty() { file } else { format!("{dir}/{file}") }, size));
        }
        found.sort();
        Ok(found)
    }

    fn delete_blocking(&self, name: &str) -> Result<()> {
        match std::fs::remove_file(self.path(name)?) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.fail(&format!("removing {name}"), e)),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// Runs blocking file I/O off the async threads.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::internal(format!("a snapshot store task failed: {e}")))?
}

impl SnapshotStore for std::sync::Arc<LocalDir> {
    fn describe(&self) -> String {
        LocalDir::describe(self)
    }

    fn put<'a>(&'a self, name: &'a str, bytes: Bytes) -> Pending<'a, ()> {
        let (me, name) = (self.clone(), name.to_owned());
        Box::pin(blocking(move || me.put_blocking(&name, &bytes)))
    }

    fn get<'a>(&'a self, name: &'a str) -> Pending<'a, Option<Bytes>> {
        let (me, name) = (self.clone(), name.to_owned());
        Box::pin(blocking(move || me.get_blocking(&name)))
    }

    fn get_range<'a>(&'a self, name: &'a str, range: Range<u64>) -> Pending<'a, Option<Bytes>> {
        let (me, name) = (self.clone(), name.to_owned());
        Box::pin(blocking(move || me.get_range_blocking(&name, range)))
    }

    fn list<'a>(&'a self, prefix: &'a str) -> Pending<'a, Vec<(String, u64)>> {
        let (me, prefix) = (self.clone(), prefix.to_owned());
        Box::pin(blocking(move || me.list_blocking(&prefix)))
    }

    fn delete<'a>(&'a self, name: &'a str) -> Pending<'a, ()> {
        let (me, name) = (self.clone(), name.to_owned());
        Box::pin(blocking(move || me.delete_blocking(&name)))
    }
}

/// Objects as Redis strings under `prefix:`. As durable as the server is
/// configured to be (its AOF with `appendfsync always` for a `put` that is on
/// disk when it returns); a replica of another store rather than the only one.
/// It connects when first used and again after a connection fails, and no
/// command waits longer than [`REDIS_TIMEOUT`], so a server that is down makes
/// this store fail its calls, not the snapshots of the other stores.
pub struct RedisStore {
    url: String,
    prefix: String,
    client: redis::Client,
    connection: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
}

/// The longest a Redis command (or a connection) may take.
const REDIS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl RedisStore {
    /// A store on the server at `url` (checked now; connected when used).
    pub fn new(url: &str, prefix: &str) -> Result<Self> {
        let client =
            redis::Client::open(url).map_err(|e| Error::invalid_field("snapshots.stores", format!("{url}: {e}")))?;
        Ok(Self {
            url: url.to_owned(),
            prefix: prefix.to_owned(),
            client,
            connection: tokio::sync::Mutex::new(None),
        })
    }

    fn key(&self, name: &str) -> Result<String> {
        check_name(name)?;
        Ok(format!("{}:{name}", self.prefix))
    }

    fn fail(&self, what: &str, e: impl std::fmt::Display) -> Error {
        unavailable(&self.describe(), what, e)
    }

    async fn connection(&self) -> Result<redis::aio::MultiplexedConnection> {
        let mut held = self.connection.lock().await;
        if let Some(connection) = &*held {
            return Ok(connection.clone());
        }
        let connection = tokio::time::timeout(REDIS_TIMEOUT, self.client.get_multiplexed_async_connection())
            .await
            .map_err(|_| self.fail("connecting", "timed out"))?
            .map_err(|e| self.fail("connecting", e))?;
        *held = Some(connection.clone());
        Ok(connection)
    }

    /// Runs a pipeline; a failure forgets the connection, so the next call
    /// connects again.
    async fn query<T: redis::FromRedisValue>(&self, what: &str, pipe: &redis::Pipeline) -> Result<T> {
        let mut connection = self.connection().await?;
        let outcome = tokio::time::timeout(REDIS_TIMEOUT, pipe.query_async::<T>(&mut connection)).await;
        let failure = match outcome {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => self.fail(what, e),
            Err(_) => self.fail(what, "timed out"),
        };
        *self.connection.lock().await = None;
        Err(failure)
    }
}

impl SnapshotStore for RedisStore {
    /// Without the URL's password: this goes into errors and logs.
    fn describe(&self) -> String {
        let shown = match url::Url::parse(&self.url) {
            Ok(mut url) => {
                let _ = url.set_password(None);
                let _ = url.set_username("");
                url.to_string()
            }
            Err(_) => "redis (a URL that does not parse)".to_owned(),
        };
        format!("redis {shown} {}", self.prefix)
    }

    fn put<'a>(&'a self, name: &'a str, bytes: Bytes) -> Pending<'a, ()> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            pipe.cmd("SET").arg(self.key(name)?).arg(bytes.as_ref()).ignore();
            self.query(&format!("writing {name}"), &pipe).await
        })
    }

    fn get<'a>(&'a self, name: &'a str) -> Pending<'a, Option<Bytes>> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            pipe.cmd("GET").arg(self.key(name)?);
            let (bytes,): (Option<Vec<u8>>,) = self.query(&format!("reading {name}"), &pipe).await?;
            Ok(bytes.map(Bytes::from))
        })
    }

    fn get_range<'a>(&'a self, name: &'a str, range: Range<u64>) -> Pending<'a, Option<Bytes>> {
        Box::pin(async move {
            if range.end <= range.start {
                return match range.end == range.start {
                    true => Ok(Some(Bytes::new())),
                    false => Err(self.fail(&format!("reading {name}"), "a range that ends before it starts")),
                };
            }
            let key = self.key(name)?;
            let mut pipe = redis::pipe();
            pipe.cmd("EXISTS")
                .arg(&key)
                .cmd("GETRANGE")
                .arg(&key)
                .arg(range.start)
                .arg(range.end - 1);
            let (exists, bytes): (bool, Vec<u8>) = self.query(&format!("reading {name}"), &pipe).await?;
            if !exists {
                return Ok(None);
            }
            if bytes.len() as u64 != range.end - range.start {
                return Err(self.fail(&format!("reading {name} at {range:?}"), "the object is shorter"));
            }
            Ok(Some(bytes.into()))
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> Pending<'a, Vec<(String, u64)>> {
        Box::pin(async move {
            let pattern = format!("{}:{}*", self.prefix, prefix.replace(['*', '?', '[', ']', '\\'], ""));
            let mut keys: Vec<String> = Vec::new();
            let mut cursor: u64 = 0;
            loop {
                let mut pipe = redis::pipe();
                pipe.cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000);
                let ((next, batch),): ((u64, Vec<String>),) = self.query("listing", &pipe).await?;
                keys.extend(batch);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
            keys.sort();
            keys.dedup();
            let mut sizes = Vec::with_capacity(keys.len());
            for batch in keys.chunks(1000) {
                let mut pipe = redis::pipe();
                for key in batch {
                    pipe.cmd("STRLEN").arg(key);
                }
                let found: Vec<u64> = self.query("listing", &pipe).await?;
                sizes.extend(found);
            }
            let strip = self.prefix.len() + 1;
            Ok(keys
                .into_iter()
                .zip(sizes)
                .map(|(key, size)| (key[strip..].to_owned(), size))
                .collect())
        })
    }

    fn delete<'a>(&'a self, name: &'a str) -> Pending<'a, ()> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            pipe.cmd("DEL").arg(self.key(name)?).ignore();
            self.query(&format!("removing {name}"), &pipe).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_local_directory_keeps_objects_whole_and_lists_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(LocalDir::new(dir.path()));
        store
            .put("packs/a.pack", Bytes::from_static(b"hello world"))
            .await
            .unwrap();
        store.put("manifests/m1", Bytes::from_static(b"{}")).await.unwrap();
        assert_eq!(
            store.get_range("packs/a.pack", 6..11).await.unwrap().unwrap(),
            Bytes::from_static(b"world")
        );
        assert!(store.get_range("packs/a.pack", 6..20).await.is_err());
        assert_eq!(store.get_range("packs/none", 0..1).await.unwrap(), None);
        assert_eq!(
            store.list("packs/").await.unwrap(),
            vec![("packs/a.pack".to_owned(), 11)]
        );
        store.delete("packs/a.pack").await.unwrap();
        store.delete("packs/a.pack").await.unwrap();
        assert!(store.list("packs/").await.unwrap().is_empty());
        assert!(store.put("../escape", Bytes::new()).await.is_err());
    }
}
