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
//!
//! [`write_dir_atomic`] does the same for a whole directory (a checkpoint, an adapter, a merged
//! model): it is filled under a temporary name beside the target, flushed, and swapped in by
//! renames, so the target's name holds the complete old directory or the complete new one,
//! never a mix of their files. [`remove_stale`] deletes what a killed process left behind
//! (temporary files and directories) and puts back a directory whose swap was interrupted.

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
    let dir = parent_of(path);

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

/// The `n` of this process's temporary names.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Creates a new, uniquely named file `.<name>.tmp.<pid>.<n>` in `dir`.
fn create_temp(dir: &Path, name: &str) -> std::io::Result<(File, PathBuf)> {
    let pid = std::process::id();
    loop {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
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

/// Writes the directory `target` as one unit.
///
/// `fill` gets a fresh, empty temporary directory `.<name>.tmp.<pid>.<n>` beside `target` and
/// writes the directory's files into it. Every file is then flushed to disk and the temporary
/// directory takes `target`'s name by renames: an existing `target` is first renamed aside to
/// `.<name>.old.<pid>.<n>`, the new directory renamed into place, and the old one removed. At
/// every instant `target` is the complete old directory, the complete new one, or (between the
/// two renames) absent: never a mix of their files. If `fill` fails or panics, the temporary
/// directory is removed and `target` is left as it was. A crash between the two renames leaves
/// the old directory under its `.old` name, which [`remove_stale`] puts back.
///
/// The parent of `target` must exist, and `target`, if it exists, must be a directory. Errors
/// are [`Error::Io`] naming `target` and the step that failed, or `fill`'s own error.
pub fn write_dir_atomic<F>(target: impl AsRef<Path>, fill: F) -> Result<()>
where
    F: FnOnce(&Path) -> Result<()>,
{
    let target = target.as_ref();
    let err = |action: &str, source: std::io::Error| Error::Io {
        context: format!("writing directory {}: {action}", target.display()),
        source,
    };
    let name = target
        .file_name()
        .ok_or_else(|| {
            err(
                "the path has no final component",
                std::io::Error::from(std::io::ErrorKind::InvalidInput),
            )
        })?
        .to_string_lossy()
        .into_owned();
    let parent = parent_of(target);
    if let Ok(meta) = std::fs::symlink_metadata(target) {
        if !meta.is_dir() {
            return Err(err(
                "it exists and is not a directory",
                std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            ));
        }
    }
    let tmp = create_temp_dir(&parent, &name)
        .map_err(|e| err("creating a temporary directory beside it", e))?;
    // From here on the guard removes the temporary directory on every early return and panic.
    let mut guard = DirGuard(Some(tmp.clone()));
    fill(&tmp)?;
    sync_tree(&tmp).map_err(|e| err(&format!("syncing {}", tmp.display()), e))?;

    if std::fs::symlink_metadata(target).is_ok() {
        let old = unused_name(&parent, &name, "old");
        std::fs::rename(target, &old).map_err(|e| {
            err(
                &format!("renaming the old directory aside to {}", old.display()),
                e,
            )
        })?;
        if let Err(e) = std::fs::rename(&tmp, target) {
            // Put the old directory back; the guard removes the new one.
            let _ = std::fs::rename(&old, target);
            return Err(err(
                &format!("renaming temporary directory {} to it", tmp.display()),
                e,
            ));
        }
        guard.0 = None;
        // The new directory is in place. An old one that cannot be removed now is only
        // clutter: `remove_stale` deletes it at the next start.
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, target).map_err(|e| {
            err(
                &format!("renaming temporary directory {} to it", tmp.display()),
                e,
            )
        })?;
        guard.0 = None;
    }
    sync_dir(&parent).map_err(|e| err(&format!("syncing directory {}", parent.display()), e))?;
    Ok(())
}

/// What [`remove_stale`] did with one thing a killed process left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leftover {
    /// A temporary file or directory (or the old copy of a replaced directory) was deleted.
    Removed(PathBuf),
    /// A directory whose replacement was interrupted was put back under its name.
    Restored {
        /// The name it had been moved aside to.
        from: PathBuf,
        /// Its own name.
        to: PathBuf,
    },
}

impl std::fmt::Display for Leftover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Leftover::Removed(p) => write!(f, "removed {}", p.display()),
            Leftover::Restored { from, to } => {
                write!(f, "restored {} from {}", to.display(), from.display())
            }
        }
    }
}

/// Cleans up `dir` (not its subdirectories) after a crash: deletes the temporary files of
/// [`write_atomic`] (`.<name>.tmp.<pid>.<n>`), the temporary directories of
/// [`write_dir_atomic`] and the trainer's older `.tmp-checkpoint-<step>-<pid>` directories, and
/// for each directory moved aside by an interrupted [`write_dir_atomic`]
/// (`.<name>.old.<pid>.<n>`) puts it back if `<name>` is missing, else deletes it. Entries of
/// a process that is still running (Linux: `/proc/<pid>` exists) are left alone, so two
/// processes never clean each other's writes. Returns what was done, in name order; a missing
/// `dir` has nothing to clean.
pub fn remove_stale(dir: impl AsRef<Path>) -> Result<Vec<Leftover>> {
    clean(dir.as_ref(), None)
}

/// [`remove_stale`] for the leftovers of one target only (`.<name>.tmp.*`, `.<name>.old.*`
/// beside `target`): for a directory of the user's, where other files are none of flare's
/// business.
pub fn remove_stale_of(target: impl AsRef<Path>) -> Result<Vec<Leftover>> {
    let target = target.as_ref();
    let Some(name) = target.file_name() else {
        return Ok(Vec::new());
    };
    clean(&parent_of(target), Some(&name.to_string_lossy()))
}

fn clean(dir: &Path, only: Option<&str>) -> Result<Vec<Leftover>> {
    let listing_err = |source| Error::Io {
        context: format!(
            "listing {} for leftovers of an interrupted run",
            dir.display()
        ),
        source,
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(listing_err(e)),
    };
    let mut names: Vec<String> = Vec::new();
    for e in entries {
        names.push(
            e.map_err(listing_err)?
                .file_name()
                .to_string_lossy()
                .into_owned(),
        );
    }
    names.sort();
    let mut done = Vec::new();
    for name in names {
        let Some((base, kind, pid)) = parse_leftover(&name) else {
            continue;
        };
        if pid_alive(pid) || only.is_some_and(|o| o != base) {
            continue;
        }
        let path = dir.join(&name);
        let remove = |done: &mut Vec<Leftover>| -> Result<()> {
            let meta = std::fs::symlink_metadata(&path).map_err(|e| Error::Io {
                context: format!("inspecting leftover {}", path.display()),
                source: e,
            })?;
            let r = if meta.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            r.map_err(|e| Error::Io {
                context: format!("removing leftover {}", path.display()),
                source: e,
            })?;
            done.push(Leftover::Removed(path.clone()));
            Ok(())
        };
        match kind {
            LeftoverKind::Temporary => remove(&mut done)?,
            LeftoverKind::Old => {
                let own = dir.join(base);
                if std::fs::symlink_metadata(&own).is_ok() {
                    remove(&mut done)?;
                } else {
                    std::fs::rename(&path, &own).map_err(|e| Error::Io {
                        context: format!("restoring {} from {}", own.display(), path.display()),
                        source: e,
                    })?;
                    done.push(Leftover::Restored {
                        from: path.clone(),
                        to: own,
                    });
                }
            }
        }
    }
    if !done.is_empty() {
        sync_dir(dir).map_err(|e| Error::Io {
            context: format!("syncing directory {}", dir.display()),
            source: e,
        })?;
    }
    Ok(done)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeftoverKind {
    Temporary,
    Old,
}

/// Splits a leftover's name into (the name it stands for, its kind, the pid that made it):
/// `.<base>.tmp.<pid>.<n>`, `.<base>.old.<pid>.<n>` or `.tmp-checkpoint-<step>-<pid>`.
fn parse_leftover(name: &str) -> Option<(&str, LeftoverKind, u32)> {
    if let Some(rest) = name.strip_prefix(".tmp-checkpoint-") {
        let (_, pid) = rest.rsplit_once('-')?;
        return Some((name, LeftoverKind::Temporary, pid.parse().ok()?));
    }
    let body = name.strip_prefix('.')?;
    let (rest, n) = body.rsplit_once('.')?;
    let (rest, pid) = rest.rsplit_once('.')?;
    let (base, kind) = rest.rsplit_once('.')?;
    n.parse::<u64>().ok()?;
    let kind = match kind {
        "tmp" => LeftoverKind::Temporary,
        "old" => LeftoverKind::Old,
        _ => return None,
    };
    (!base.is_empty()).then_some((base, kind, pid.parse().ok()?))
}

/// Whether process `pid` is running. Only Linux can tell (`/proc`); elsewhere only our own
/// process counts as running.
fn pid_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    #[cfg(target_os = "linux")]
    {
        Path::new("/proc").join(pid.to_string()).exists()
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// The directory `path` lives in (`.` for a bare name).
fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Creates a new, uniquely named directory `.<name>.tmp.<pid>.<n>` in `dir`.
fn create_temp_dir(dir: &Path, name: &str) -> std::io::Result<PathBuf> {
    loop {
        let tmp = unused_name(dir, name, "tmp");
        match std::fs::create_dir(&tmp) {
            Ok(()) => return Ok(tmp),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// `.<name>.<kind>.<pid>.<n>` in `dir`, with the first `n` of this process's counter that is
/// not taken.
fn unused_name(dir: &Path, name: &str, kind: &str) -> PathBuf {
    let pid = std::process::id();
    loop {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let p = dir.join(format!(".{name}.{kind}.{pid}.{n}"));
        if std::fs::symlink_metadata(&p).is_err() {
            return p;
        }
    }
}

/// Flushes every file under `dir`, then the directories themselves, to disk.
fn sync_tree(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let ty = e.file_type()?;
        if ty.is_dir() {
            sync_tree(&e.path())?;
        } else if ty.is_file() {
            File::open(e.path())?.sync_all()?;
        }
    }
    sync_dir(dir)
}

/// Removes the temporary directory when dropped, unless disarmed.
struct DirGuard(Option<PathBuf>);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
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

    /// A pid no process can have (above Linux's `pid_max` limit of 2^22).
    const DEAD_PID: u32 = 4_000_000_000;

    fn names_in(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn directory_is_created_and_replaced_as_a_unit() {
        let d = TestDir::new("dir");
        let target = d.0.join("adapter");
        write_dir_atomic(&target, |tmp| {
            write_atomic(tmp.join("a.json"), b"old a")?;
            write_atomic(tmp.join("b.bin"), b"old b")
        })
        .unwrap();
        assert_eq!(names_in(&target), ["a.json", "b.bin"]);
        // The new directory replaces the old one whole: a file only the old one had is gone.
        write_dir_atomic(&target, |tmp| write_atomic(tmp.join("a.json"), b"new a")).unwrap();
        assert_eq!(names_in(&target), ["a.json"]);
        assert_eq!(std::fs::read(target.join("a.json")).unwrap(), b"new a");
        assert_eq!(
            d.entries(),
            ["adapter"],
            "no temporary or old directory left"
        );
    }

    #[test]
    fn failing_or_panicking_fill_leaves_the_old_directory() {
        let d = TestDir::new("dirfail");
        let target = d.0.join("ckpt");
        write_dir_atomic(&target, |tmp| write_atomic(tmp.join("w"), b"good")).unwrap();
        let e = write_dir_atomic(&target, |tmp| {
            write_atomic(tmp.join("w"), b"half")?;
            Err(Error::InvalidArgument {
                op: "test",
                msg: "disk on fire".into(),
            })
        })
        .unwrap_err();
        assert!(e.to_string().contains("disk on fire"), "{e}");
        let r = std::panic::catch_unwind(|| {
            let _ = write_dir_atomic(&target, |tmp| {
                write_atomic(tmp.join("w"), b"half").unwrap();
                panic!("fill panicked");
            });
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read(target.join("w")).unwrap(), b"good");
        assert_eq!(d.entries(), ["ckpt"]);
        // Nothing is created when the first write fails.
        let fresh = d.0.join("fresh");
        assert!(write_dir_atomic(&fresh, |_| Err(Error::InvalidArgument {
            op: "test",
            msg: "no".into()
        }))
        .is_err());
        assert_eq!(d.entries(), ["ckpt"]);
        // A file in the way is a named error, and is left alone.
        std::fs::write(&fresh, b"a file").unwrap();
        let e = write_dir_atomic(&fresh, |_| Ok(())).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        assert_eq!(std::fs::read(&fresh).unwrap(), b"a file");
    }

    #[test]
    fn stale_leftovers_are_removed_or_restored() {
        let d = TestDir::new("stale-dirs");
        let p = DEAD_PID;
        // A temporary file of write_atomic, a temporary directory, a legacy checkpoint temp.
        std::fs::write(d.0.join(format!(".metrics.jsonl.tmp.{p}.3")), b"x").unwrap();
        std::fs::create_dir_all(d.0.join(format!(".adapter.tmp.{p}.0/sub"))).unwrap();
        std::fs::create_dir_all(d.0.join(format!(".tmp-checkpoint-9-{p}"))).unwrap();
        // An interrupted swap: the old directory moved aside, the new one never renamed in.
        std::fs::create_dir_all(d.0.join(format!(".merged.old.{p}.1"))).unwrap();
        std::fs::write(d.0.join(format!(".merged.old.{p}.1/model")), b"old").unwrap();
        // A swap interrupted after the new directory was in place: the old copy goes.
        std::fs::create_dir_all(d.0.join("ckpt")).unwrap();
        std::fs::create_dir_all(d.0.join(format!(".ckpt.old.{p}.2"))).unwrap();
        // Left alone: files of a running process (ours), and other names.
        let live = format!(".loss.png.tmp.{}.7", std::process::id());
        std::fs::write(d.0.join(&live), b"in flight").unwrap();
        std::fs::write(d.0.join(".hidden"), b"user").unwrap();
        std::fs::write(d.0.join("a.tmp.1.2"), b"user").unwrap();
        let done = remove_stale(&d.0).unwrap();
        assert_eq!(done.len(), 5, "{done:?}");
        assert!(done.contains(&Leftover::Restored {
            from: d.0.join(format!(".merged.old.{p}.1")),
            to: d.0.join("merged"),
        }));
        assert_eq!(
            d.entries(),
            [".hidden", live.as_str(), "a.tmp.1.2", "ckpt", "merged"]
        );
        assert_eq!(std::fs::read(d.0.join("merged/model")).unwrap(), b"old");
        assert!(remove_stale(&d.0).unwrap().is_empty(), "nothing left to do");
        assert!(remove_stale(d.0.join("missing")).unwrap().is_empty());
    }
}
