//! The one way the `bitstack` tool writes its output files: checked before any work starts
//! ([`check_output`]), written atomically ([`write_atomic`]).
//!
//! # What is refused
//!
//! * A target that exists and is not a regular file: a directory, a device node (`/dev/full`,
//!   `/dev/null`), a FIFO, a socket, **or a symbolic link** (also one pointing at a regular
//!   file). Writing through a temporary file and a rename would replace the link or the node
//!   by a regular file, and writing in place would lose atomicity, so neither is done.
//!   `/dev/stdout` is a symbolic link (to `/proc/self/fd/1`) and is refused like any other;
//!   the tool prints its reports on stdout anyway, so an output file is always a real file.
//! * A target that is one of the command's inputs: the same path, or the same file reached
//!   another way (a hard link, `./x`, a link to it), compared by device and inode number.
//! * A target whose folder does not exist, is not a folder, or is not writable (probed by
//!   creating and removing an empty file there, which also catches read-only mounts).
//!
//! # How a regular file is written
//!
//! The bytes go to a new temporary file in the target's folder (`create_new`, never an
//! existing file), which is fsynced and renamed over the target; then the folder is fsynced so
//! that the rename itself is durable. On any failure the temporary file is removed and the old
//! target is untouched. Writers that stream (the stack-file writer of `bitstack-format`)
//! follow the same temp-fsync-rename protocol; callers run [`check_output`] on their target
//! first.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Why an output file cannot be (or was not) written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutputError {
    /// The target exists and is not a regular file.
    #[error("output {path}: is {kind}, not a regular file; refusing to replace it (give the path of a regular file)")]
    NotRegular {
        /// The target.
        path: PathBuf,
        /// What it is (`a symbolic link`, `a directory`, `a character device`, ...).
        kind: &'static str,
    },
    /// The target is one of the command's inputs.
    #[error("output {path} is the same file as the input {input}; refusing to overwrite an input (choose another output path)")]
    SameAsInput {
        /// The target.
        path: PathBuf,
        /// The input it names.
        input: PathBuf,
    },
    /// The target's folder is missing, not a folder, or not writable.
    #[error("output {path}: cannot write into folder {dir}: {reason}")]
    BadFolder {
        /// The target.
        path: PathBuf,
        /// Its folder.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The target has no file name (`/`, `..`).
    #[error("output {0}: not a file path")]
    NoFileName(PathBuf),
    /// Writing, syncing or renaming failed (disk full, I/O error).
    #[error("writing {path}: {source}")]
    Io {
        /// The target (or its temporary file).
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// A command-line argument that cannot work (a bad count, a flag that does not apply): the
/// `bitstack` binary exits with status 2 on it, as on clap's own usage errors.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

impl OutputError {
    /// Whether the error is about the path the user gave (a usage error, exit status 2)
    /// rather than a failure while writing (a runtime error, exit status 1).
    pub fn is_usage(&self) -> bool {
        !matches!(self, OutputError::Io { .. })
    }
}

fn kind_of(ft: std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_char_device() {
            return "a character device";
        }
        if ft.is_block_device() {
            return "a block device";
        }
        if ft.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// The folder `path` lives in (`.` for a bare file name).
fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(unix)]
fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

#[cfg(not(unix))]
fn same_file(_: &std::fs::Metadata, _: &std::fs::Metadata) -> bool {
    false
}

static PROBE: AtomicU64 = AtomicU64::new(0);

fn temp_name(path: &Path, tag: &str) -> Result<PathBuf, OutputError> {
    let name = path
        .file_name()
        .ok_or_else(|| OutputError::NoFileName(path.to_path_buf()))?;
    let mut tmp = OsString::from(".");
    tmp.push(name);
    tmp.push(format!(
        ".{tag}-{}-{}",
        std::process::id(),
        PROBE.fetch_add(1, Ordering::Relaxed)
    ));
    Ok(folder_of(path).join(tmp))
}

/// Checks the target's own kind: absent or a regular file (not a link).
fn check_target_kind(path: &Path) -> Result<Option<std::fs::Metadata>, OutputError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => Ok(Some(m)),
        Ok(m) => Err(OutputError::NotRegular {
            path: path.to_path_buf(),
            kind: kind_of(m.file_type()),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(OutputError::BadFolder {
            path: path.to_path_buf(),
            dir: folder_of(path),
            reason: e.to_string(),
        }),
    }
}

/// Checks, before any work, that `path` can be written as an output of a command that reads
/// `inputs`: see the [module docs](self) for what is refused. Creates nothing that stays.
pub fn check_output(path: &Path, inputs: &[&Path]) -> Result<(), OutputError> {
    if path.file_name().is_none() {
        return Err(OutputError::NoFileName(path.to_path_buf()));
    }
    let target = check_target_kind(path)?;
    for input in inputs {
        let same = if let Some(t) = &target {
            // `metadata` follows links: an input given through a link is still its file.
            std::fs::metadata(input).is_ok_and(|m| same_file(t, &m))
        } else {
            false
        };
        let same_name = match (std::fs::canonicalize(input), canonical_target(path)) {
            (Ok(a), Some(b)) => a == b,
            _ => path == *input,
        };
        if same || same_name {
            return Err(OutputError::SameAsInput {
                path: path.to_path_buf(),
                input: input.to_path_buf(),
            });
        }
    }
    let dir = folder_of(path);
    let bad = |reason: String| OutputError::BadFolder {
        path: path.to_path_buf(),
        dir: dir.clone(),
        reason,
    };
    match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(bad("not a directory".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(bad("no such directory".into()))
        }
        Err(e) => return Err(bad(e.to_string())),
    }
    let probe = temp_name(path, "probe")?;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(f) => {
            drop(f);
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(bad(e.to_string())),
    }
}

/// The canonical path a (possibly not yet existing) target will have: its folder's
/// canonical path joined with its file name.
fn canonical_target(path: &Path) -> Option<PathBuf> {
    let dir = std::fs::canonicalize(folder_of(path)).ok()?;
    Some(dir.join(path.file_name()?))
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, fsync, rename,
/// fsync of the folder. Refuses a target that is not a regular file (see the
/// [module docs](self)); on failure the old target is untouched and the temporary file gone.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), OutputError> {
    check_target_kind(path)?;
    let tmp = temp_name(path, "tmp-write")?;
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| OutputError::Io { path: p, source }
    };
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(path))?;
        f.sync_all().map_err(io(path))?;
        drop(f);
        // Re-check just before the rename: the target may have been replaced meanwhile.
        check_target_kind(path)?;
        std::fs::rename(&tmp, path).map_err(io(path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    // Make the rename itself durable (best effort: not every platform opens folders).
    if let Ok(d) = std::fs::File::open(folder_of(path)) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("bitstack-output-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn writes_and_replaces_regular_files() {
        let d = dir("regular");
        let p = d.join("a.txt");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        // Nothing else is left in the folder.
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn refuses_links_devices_directories_and_inputs() {
        let d = dir("refuse");
        let real = d.join("real.txt");
        std::fs::write(&real, b"keep").unwrap();
        let link = d.join("link.txt");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = write_atomic(&link, b"x").unwrap_err();
        assert!(matches!(
            err,
            OutputError::NotRegular {
                kind: "a symbolic link",
                ..
            }
        ));
        assert!(err.to_string().contains("link.txt"));
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&real).unwrap(), b"keep");
        if Path::new("/dev/full").exists() {
            let err = check_output(Path::new("/dev/full"), &[]).unwrap_err();
            assert!(matches!(
                err,
                OutputError::NotRegular {
                    kind: "a character device",
                    ..
                }
            ));
        }
        assert!(matches!(
            check_output(&d, &[]),
            Err(OutputError::NotRegular {
                kind: "a directory",
                ..
            })
        ));
        // The same file by another name, and through a link, is an input.
        let err = check_output(&real, &[&real]).unwrap_err();
        assert!(matches!(err, OutputError::SameAsInput { .. }));
        let dotted = d.join(".").join("real.txt");
        assert!(matches!(
            check_output(&dotted, &[&real]),
            Err(OutputError::SameAsInput { .. })
        ));
        let hard = d.join("hard.txt");
        std::fs::hard_link(&real, &hard).unwrap();
        assert!(matches!(
            check_output(&hard, &[&real]),
            Err(OutputError::SameAsInput { .. })
        ));
        assert!(matches!(
            check_output(&real, &[&link]),
            Err(OutputError::SameAsInput { .. })
        ));
        // A fresh name next to an input is fine; a missing folder is not.
        check_output(&d.join("new.txt"), &[&real]).unwrap();
        let err = check_output(&d.join("missing/x.json"), &[]).unwrap_err();
        assert!(matches!(err, OutputError::BadFolder { .. }));
        assert!(err.is_usage());
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 3);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
