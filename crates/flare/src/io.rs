//! Crash-safe file writing.
//!
//! [`write_atomic`] and [`write_atomic_with`] write the new contents to a temporary file in the
//! target's directory, flush it to disk (`sync_all`), rename it over the target and then flush
//! the directory, so that a crash or a failed write at any point leaves either the complete old
//! file or the complete new one under the target's name, never a mix or a truncated file. A
//! temporary file left behind by a crash is named `.<target name>.tmp.<pid>.<n>` and can be
//! deleted.
//!
//! ```
//! # let dir = std::env::temp_dir().join(format!("flare-io-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("numbers.txt");
//! flare::io::write_atomic(&path, b"1 2 3\n")?;
//! flare::io::write_atomic_with(&path, |w| {
//!     for i in 4..7 {
//!         write!(w, "{i} ")?;
//!     }
//!     Ok(())
//! })?;
//! assert_eq!(std::fs::read_to_string(&path).unwrap(), "4 5 6 ");
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok::<(), flare::Error>(())
//! ```

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Error, Result};

/// Writes `bytes` to `path` atomically: afterwards `path` holds exactly `bytes`, and a crash at
/// any point leaves either the old file (or no file, if there was none) or the new one.
///
/// The parent directory must exist. Errors are [`Error::Io`] naming the path and the step that
/// failed.
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Like [`write_atomic`], with the contents produced by `write`, which gets a buffered writer
/// on the temporary file. If `write` fails (or panics), the temporary file is removed and
/// `path` is left as it was; the error names the path and carries `write`'s error as its
/// source. Errors from other layers can be passed through with [`std::io::Error::other`].
pub fn write_atomic_with<F>(path: impl AsRef<Path>, write: F) -> Result<()>
where
    F: FnOnce(&mut dyn Write) -> std::io::Result<()>,
{
    let path = path.as_ref();
    let io_err = |action: &str, source: std::io::Error| Error::Io {
        context: format!("writing {}: {action}", path.display()),
        source,
    };
    let file_name = path.file_name().ok_or_else(|| {
        io_err(
            "the path has no file name",
            std::io::Error::from(std::io::ErrorKind::InvalidInput),
        )
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };

    let (file, tmp) = create_temp(&dir, &file_name.to_string_lossy())
        .map_err(|e| io_err("creating a temporary file in its directory", e))?;
    // From here on the guard removes the temporary file on every early return and on panic.
    let mut guard = TempGuard(Some(tmp));
    let tmp_path = guard.path().to_path_buf();
    let tmp_action = |what: &str| format!("{what} temporary file {}", tmp_path.display());

    // Keep the permissions of the file being replaced (best effort: a new file gets the
    // process's defaults).
    if let Ok(meta) = std::fs::metadata(path) {
        let _ = file.set_permissions(meta.permissions());
    }

    let mut w = BufWriter::new(file);
    write(&mut w).map_err(|e| io_err(&tmp_action("writing"), e))?;
    let file = w
        .into_inner()
        .map_err(|e| io_err(&tmp_action("flushing"), e.into_error()))?;
    file.sync_all()
        .map_err(|e| io_err(&tmp_action("syncing"), e))?;
    drop(file);

    std::fs::rename(&tmp_path, path).map_err(|e| {
        io_err(
            &format!("renaming temporary file {} over it", tmp_path.display()),
            e,
        )
    })?;
    guard.0 = None; // renamed: nothing to clean up
    sync_dir(&dir).map_err(|e| io_err(&format!("syncing directory {}", dir.display()), e))?;
    Ok(())
}

/// Creates a new, uniquely named file `.<name>.tmp.<pid>.<n>` in `dir`.
fn create_temp(dir: &Path, name: &str) -> std::io::Result<(File, PathBuf)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let pid = std::process::id();
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.tmp.{pid}.{n}"));
        match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => return Ok((f, tmp)),
            // Left behind by an earlier process with our pid: try the next number.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Flushes a directory's entries (the rename) to disk. A no-op where directories cannot be
/// opened as files (Windows), where `rename` is durable on its own terms.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Removes the temporary file when dropped, unless disarmed.
struct TempGuard(Option<PathBuf>);

impl TempGuard {
    fn path(&self) -> &Path {
        self.0.as_deref().expect("temporary file guard is armed")
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system's temporary directory, removed on drop.
    struct TestDir(PathBuf);

    impl TestDir {
        fn new(tag: &str) -> Self {
            static N: AtomicU64 = AtomicU64::new(0);
            let p = std::env::temp_dir().join(format!(
                "flare-io-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TestDir(p)
        }

        /// The names of the entries of the directory, sorted.
        fn entries(&self) -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(&self.0)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn creates_and_replaces() {
        let d = TestDir::new("replace");
        let p = d.0.join("f.bin");
        write_atomic(&p, b"first").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"first");
        write_atomic(&p, b"second, longer").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second, longer");
        write_atomic(&p, b"").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"");
        assert_eq!(d.entries(), ["f.bin"], "no temporary file left behind");
    }

    #[test]
    fn write_with_streams_content() {
        let d = TestDir::new("with");
        let p = d.0.join("f.txt");
        write_atomic_with(&p, |w| {
            for i in 0..1000 {
                writeln!(w, "{i}")?;
            }
            Ok(())
        })
        .unwrap();
        let s = std::fs::read_to_string(&p).unwrap();
        assert_eq!(s.lines().count(), 1000);
        assert_eq!(s.lines().last(), Some("999"));
    }

    #[test]
    fn old_file_survives_failing_writer() {
        let d = TestDir::new("fail");
        let p = d.0.join("keep.json");
        write_atomic(&p, b"{\"old\": true}").unwrap();
        let err = write_atomic_with(&p, |w| {
            // Half the new content, more than the buffer holds, so some of it reaches the
            // temporary file before the failure.
            w.write_all(&vec![b'x'; 100_000])?;
            Err(std::io::Error::other("disk on fire"))
        })
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("keep.json"), "{msg}");
        assert!(msg.contains("disk on fire"), "{msg}");
        assert!(matches!(err, Error::Io { .. }));
        assert_eq!(std::fs::read(&p).unwrap(), b"{\"old\": true}");
        assert_eq!(d.entries(), ["keep.json"], "temporary file removed");
    }

    #[test]
    fn old_file_survives_panicking_writer() {
        let d = TestDir::new("panic");
        let p = d.0.join("keep.bin");
        write_atomic(&p, b"old").unwrap();
        let r = std::panic::catch_unwind(|| {
            let _ = write_atomic_with(&p, |w| {
                w.write_all(b"new")?;
                panic!("writer panicked");
            });
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(d.entries(), ["keep.bin"], "temporary file removed");
    }

    #[test]
    fn failing_writer_without_old_file_leaves_nothing() {
        let d = TestDir::new("none");
        let p = d.0.join("new.bin");
        assert!(write_atomic_with(&p, |_| Err(std::io::Error::other("no"))).is_err());
        assert!(d.entries().is_empty());
    }

    #[test]
    fn missing_directory_is_a_named_error() {
        let d = TestDir::new("missing");
        let p = d.0.join("no/such/dir/f.bin");
        let err = write_atomic(&p, b"x").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("no/such/dir/f.bin"), "{msg}");
        match err {
            Error::Io { source, .. } => assert_eq!(source.kind(), std::io::ErrorKind::NotFound),
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn stale_temporary_name_is_skipped() {
        let d = TestDir::new("stale");
        let p = d.0.join("f.bin");
        // Occupy the next few names this process might pick.
        let next = {
            // Peek at the counter by creating (and keeping) one temporary file.
            let (_, tmp) = create_temp(&d.0, "f.bin").unwrap();
            tmp
        };
        let n: u64 = next
            .to_string_lossy()
            .rsplit('.')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        for k in 1..4 {
            let stale =
                d.0.join(format!(".f.bin.tmp.{}.{}", std::process::id(), n + k));
            std::fs::write(stale, b"stale").unwrap();
        }
        write_atomic(&p, b"fresh").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"fresh");
    }

    #[cfg(unix)]
    #[test]
    fn keeps_permissions_of_replaced_file() {
        use std::os::unix::fs::PermissionsExt;
        let d = TestDir::new("perm");
        let p = d.0.join("f.sh");
        write_atomic(&p, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o750)).unwrap();
        write_atomic(&p, b"#!/bin/sh\necho hi\n").unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o750);
    }
}
