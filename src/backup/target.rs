//! Where a repository's objects live: one small synchronous trait, and the local directory
//! implementation. The S3 target (feature `s3`) is in `s3.rs`.
//!
//! The trait is the least a repository needs from an object store: put (optionally create
//! only, for manifests: a manifest that exists is a complete backup), ranged get, head, list
//! by prefix and delete. Keys are `/`-separated relative paths such as `chunks/ab/ab…`.

use crate::error::{Error, Result};
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// An object as listed or headed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The object's key, relative to the target's root.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last written, by the target's clock.
    pub modified: SystemTime,
}

/// An object store holding a backup repository. Implementations must be safe to call from
/// many threads at once (pushes and restores transfer in parallel).
pub trait Target: Send + Sync {
    /// Stores `data` under `key`, durably when this returns. With `create_only`, an existing
    /// object is left as it is and `Ok(false)` is returned; otherwise `Ok(true)`.
    fn put(&self, key: &str, data: &[u8], create_only: bool) -> Result<bool>;
    /// The object's bytes (only `range` of them, if given; a range past the end returns what
    /// there is), or `None` when there is no such object.
    fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Option<Vec<u8>>>;
    /// The object's size and time, or `None` when there is no such object.
    fn head(&self, key: &str) -> Result<Option<ObjectMeta>>;
    /// Calls `each` for every object whose key starts with `prefix`, in no particular order.
    fn list(&self, prefix: &str, each: &mut dyn FnMut(ObjectMeta) -> Result<()>) -> Result<()>;
    /// Removes an object; removing one that does not exist is not an error.
    fn delete(&self, key: &str) -> Result<()>;
    /// As a create-only [`Target::put`], except that the object need only be durable after
    /// the next [`Target::sync`] (pushes store chunks this way and sync after each batch and
    /// before their manifest). An object that is visible is still whole. By default, a
    /// plain put.
    fn put_batched(&self, key: &str, data: &[u8]) -> Result<bool> {
        self.put(key, data, true)
    }
    /// Makes every `put_batched` so far durable. By default there is nothing to do.
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    /// Removes what interrupted puts left behind (temporary files of a killed process) that
    /// is older than `age` (and than an hour, whatever `age` says); returns how many. By
    /// default there is nothing to remove.
    fn sweep_leftovers(&self, _age: std::time::Duration) -> Result<u64> {
        Ok(0)
    }
    /// Where the target is, for messages (`/backups`, `s3://bucket/prefix`).
    fn describe(&self) -> String;
}

pub(crate) fn target_err(op: &'static str, key: &str, source: std::io::Error) -> Error {
    Error::Target {
        op,
        key: key.to_string(),
        source,
    }
}

/// A repository in a local directory (or any mounted filesystem). Objects are files; a put
/// writes a temporary file, syncs it, and links (create-only) or renames it into place, then
/// syncs the directory, so an object is either whole or absent after a crash.
#[derive(Debug)]
pub struct DirTarget {
    root: PathBuf,
    /// Folders whose new entries `put_batched` has not yet made durable.
    unsynced: parking_lot::Mutex<std::collections::HashSet<PathBuf>>,
}

/// Temporary files carry this in their name; listings skip them.
const TMP_MARK: &str = ".tmp-";

impl DirTarget {
    /// A target rooted at `root`, which is created if missing.
    pub fn new(root: impl AsRef<Path>) -> Result<DirTarget> {
        let root = root.as_ref().to_path_buf();
        fs::create_dir_all(&root)
            .map_err(|e| target_err("create", &root.display().to_string(), e))?;
        Ok(DirTarget {
            root,
            unsynced: parking_lot::Mutex::new(std::collections::HashSet::new()),
        })
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        // Keys come from the repository code, but a listed name could be anything: refuse
        // anything that would leave the root.
        if key.is_empty()
            || key.starts_with('/')
            || key
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(Error::InvalidArgument(format!("bad object key {key:?}")));
        }
        Ok(self.root.join(key))
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl DirTarget {
    /// Writes a temporary file, syncs it, and links (create-only) or renames it into place;
    /// returns whether it was placed and the folder it went into.
    fn place(&self, key: &str, data: &[u8], create_only: bool) -> Result<(bool, PathBuf)> {
        let path = self.path(key)?;
        let err = |e| target_err("put", key, e);
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        if create_only && path.exists() {
            return Ok((false, dir));
        }
        fs::create_dir_all(&dir).map_err(err)?;
        let tmp = dir.join(format!(
            "{}{TMP_MARK}{:032x}",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("object"),
            crate::ids::new_id()
        ));
        let written = (|| {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(data)?;
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(err(e));
        }
        let placed = if create_only {
            // A hard link fails if the name exists: create-only, even between processes.
            let r = fs::hard_link(&tmp, &path);
            let _ = fs::remove_file(&tmp);
            match r {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok((false, dir)),
                Err(e) => Err(e),
            }
        } else {
            fs::rename(&tmp, &path).map(|_| true).inspect_err(|_| {
                let _ = fs::remove_file(&tmp);
            })
        };
        Ok((placed.map_err(err)?, dir))
    }
}

impl Target for DirTarget {
    fn put(&self, key: &str, data: &[u8], create_only: bool) -> Result<bool> {
        let (created, dir) = self.place(key, data, create_only)?;
        if created {
            sync_dir(&dir).map_err(|e| target_err("put", key, e))?;
        }
        Ok(created)
    }

    fn put_batched(&self, key: &str, data: &[u8]) -> Result<bool> {
        // The file's bytes are synced before its name appears; only the name's durability
        // waits for `sync`, which then costs one folder sync per folder, not one per chunk.
        let (created, dir) = self.place(key, data, true)?;
        if created {
            self.unsynced.lock().insert(dir);
        }
        Ok(created)
    }

    fn sync(&self) -> Result<()> {
        let dirs: Vec<PathBuf> = self.unsynced.lock().drain().collect();
        for (i, d) in dirs.iter().enumerate() {
            if let Err(e) = sync_dir(d) {
                // Still unsynced: the next sync tries them again.
                self.unsynced.lock().extend(dirs[i..].iter().cloned());
                return Err(target_err("sync", &d.display().to_string(), e));
            }
        }
        Ok(())
    }

    fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Option<Vec<u8>>> {
        let path = self.path(key)?;
        let err = |e| target_err("get", key, e);
        let mut f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(err(e)),
        };
        let mut out = Vec::new();
        match range {
            None => {
                f.read_to_end(&mut out).map_err(err)?;
            }
            Some(r) => {
                f.seek(SeekFrom::Start(r.start)).map_err(err)?;
                f.take(r.end.saturating_sub(r.start))
                    .read_to_end(&mut out)
                    .map_err(err)?;
            }
        }
        Ok(Some(out))
    }

    fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        let path = self.path(key)?;
        match fs::metadata(&path) {
            Ok(m) => Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: m.len(),
                modified: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            })),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(target_err("head", key, e)),
        }
    }

    fn list(&self, prefix: &str, each: &mut dyn FnMut(ObjectMeta) -> Result<()>) -> Result<()> {
        // Walk the deepest directory the prefix names, then filter by the whole prefix.
        let dir_part = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let start = if dir_part.is_empty() {
            self.root.clone()
        } else {
            self.path(dir_part)?
        };
        let mut stack = vec![(start, dir_part.to_string())];
        while let Some((dir, rel)) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(target_err("list", prefix, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| target_err("list", prefix, e))?;
                let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                let key = if rel.is_empty() {
                    name.clone()
                } else {
                    format!("{rel}/{name}")
                };
                let meta = match entry.metadata() {
                    Ok(m) => m,
                    // Removed between the listing and now (a lock released, a chunk swept):
                    // not there any more, so not listed.
                    Err(e) if e.kind() == ErrorKind::NotFound => continue,
                    Err(e) => return Err(target_err("list", &key, e)),
                };
                if meta.is_dir() {
                    if key.starts_with(prefix) || prefix.starts_with(&format!("{key}/")) {
                        stack.push((entry.path(), key));
                    }
                } else if !name.contains(TMP_MARK) && key.starts_with(prefix) {
                    each(ObjectMeta {
                        key,
                        size: meta.len(),
                        modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    })?;
                }
            }
        }
        Ok(())
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        match fs::remove_file(&path) {
            Ok(()) => {
                let dir = path.parent().unwrap_or(&self.root);
                sync_dir(dir).map_err(|e| target_err("delete", key, e))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(target_err("delete", key, e)),
        }
    }

    fn sweep_leftovers(&self, age: std::time::Duration) -> Result<u64> {
        // A put in flight has a temporary file for moments; one an hour old is dead whatever
        // the grace period asked for (a push's lock is written while a gc may run).
        let age = age.max(std::time::Duration::from_secs(3600));
        let now = SystemTime::now();
        let mut removed = 0;
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(target_err("list", &dir.display().to_string(), e)),
            };
            for entry in entries.flatten() {
                let Ok(meta) = entry.metadata() else { continue };
                if meta.is_dir() {
                    stack.push(entry.path());
                    continue;
                }
                let old = meta
                    .modified()
                    .ok()
                    .and_then(|m| now.duration_since(m).ok())
                    .is_some_and(|a| a >= age);
                if old && entry.file_name().to_string_lossy().contains(TMP_MARK) {
                    fs::remove_file(entry.path()).map_err(|e| {
                        target_err("delete", &entry.path().display().to_string(), e)
                    })?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_list_delete_and_create_only() {
        let dir = tempfile::tempdir().unwrap();
        let t = DirTarget::new(dir.path().join("repo")).unwrap();
        assert!(t.put("chunks/ab/abc", b"hello", true).unwrap());
        assert!(!t.put("chunks/ab/abc", b"other", true).unwrap());
        assert_eq!(t.get("chunks/ab/abc", None).unwrap().unwrap(), b"hello");
        assert_eq!(t.get("chunks/ab/abc", Some(1..3)).unwrap().unwrap(), b"el");
        assert_eq!(t.get("chunks/ab/abc", Some(3..99)).unwrap().unwrap(), b"lo");
        assert!(t.put("chunks/ab/abc", b"other", false).unwrap());
        assert_eq!(t.get("chunks/ab/abc", None).unwrap().unwrap(), b"other");
        t.put("manifests/1", b"m", true).unwrap();
        let mut keys = Vec::new();
        t.list("chunks/", &mut |m| {
            keys.push(m.key);
            Ok(())
        })
        .unwrap();
        assert_eq!(keys, ["chunks/ab/abc"]);
        assert_eq!(t.head("manifests/1").unwrap().unwrap().size, 1);
        assert!(t.head("manifests/2").unwrap().is_none());
        assert!(t.get("manifests/2", None).unwrap().is_none());
        t.delete("manifests/1").unwrap();
        t.delete("manifests/1").unwrap();
        assert!(t.head("manifests/1").unwrap().is_none());
        assert!(matches!(
            t.get("../escape", None),
            Err(Error::InvalidArgument(_))
        ));
    }
}

/// A repository in memory: for tests, fuzzing and embedders' own tests. Objects are kept
/// with the time they were written.
#[derive(Debug, Default)]
pub struct MemoryTarget {
    objects: parking_lot::Mutex<std::collections::BTreeMap<String, (Vec<u8>, SystemTime)>>,
}

impl MemoryTarget {
    /// An empty target.
    pub fn new() -> MemoryTarget {
        MemoryTarget::default()
    }
}

impl Target for MemoryTarget {
    fn put(&self, key: &str, data: &[u8], create_only: bool) -> Result<bool> {
        let mut o = self.objects.lock();
        if create_only && o.contains_key(key) {
            return Ok(false);
        }
        o.insert(key.to_string(), (data.to_vec(), SystemTime::now()));
        Ok(true)
    }

    fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Option<Vec<u8>>> {
        let o = self.objects.lock();
        Ok(o.get(key).map(|(b, _)| match &range {
            None => b.clone(),
            Some(r) => {
                let len = b.len() as u64;
                let (s, e) = (r.start.min(len) as usize, r.end.min(len) as usize);
                b[s..e.max(s)].to_vec()
            }
        }))
    }

    fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        Ok(self.objects.lock().get(key).map(|(b, t)| ObjectMeta {
            key: key.to_string(),
            size: b.len() as u64,
            modified: *t,
        }))
    }

    fn list(&self, prefix: &str, each: &mut dyn FnMut(ObjectMeta) -> Result<()>) -> Result<()> {
        // Copied out first: `each` may call back into the target.
        let found: Vec<ObjectMeta> = self
            .objects
            .lock()
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (b, t))| ObjectMeta {
                key: k.clone(),
                size: b.len() as u64,
                modified: *t,
            })
            .collect();
        found.into_iter().try_for_each(each)
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.objects.lock().remove(key);
        Ok(())
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}
