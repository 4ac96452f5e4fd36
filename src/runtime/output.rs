//! The one output writer: every file the engine writes goes through [`AtomicOutput`] (or
//! [`write_atomically`] for a buffer), so a partial output never looks complete and nothing outside the
//! named path is touched.
//!
//! - An existing target that is not a regular file (a device, a FIFO, a directory, a symlink) is refused,
//!   so `--output /dev/null` cannot replace `/dev/null`.
//! - A target that is the same file as one of the command's inputs is refused before any compute.
//! - The temporary file sits beside the target (so the rename is atomic), has an unpredictable name and is
//!   created with `create_new`, so a file or symlink planted at a guessable name is never written through.
//!   Creating it first also proves the folder writable before the work starts.
//! - On an error, or when the writer is dropped without [`AtomicOutput::commit`], the temporary is removed.
//!
//! [`lock_output_dir`] claims a folder that a run fills with several files (its lock file, which must stay
//! one file to be locked, is the one file written in place).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

fn refuse(path: &Path, why: &str) -> Error {
    Error::io(path, std::io::Error::other(why.to_string()))
}

/// Creates an output directory (and its parents); an existing path that is not a directory (a file, a
/// device) is refused by name rather than reported as the system's "File exists".
pub fn create_output_dir(path: &Path) -> Result<()> {
    if let Ok(meta) = std::fs::metadata(path) {
        if !meta.is_dir() {
            return Err(refuse(
                path,
                "exists and is not a directory; give a directory for the outputs",
            ));
        }
    }
    std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))
}

/// An exclusive claim on an output folder for as long as it lives: two runs writing checkpoints, metrics
/// and plots into one folder would leave a mix of both. The lock is the operating system's (released when
/// the process ends, however it ends), on a hidden file that names the holder's process id.
#[derive(Debug)]
pub struct OutputDirLock {
    _file: File,
}

/// Claims `dir` (which must exist) for this process, or says which process holds it.
pub fn lock_output_dir(dir: &Path) -> Result<OutputDirLock> {
    let path = dir.join(".isoformer-engine.lock");
    if let Ok(meta) = std::fs::symlink_metadata(&path) {
        if !meta.file_type().is_file() {
            return Err(refuse(&path, "exists and is not a regular file"));
        }
    }
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = std::io::Read::read_to_string(&mut file, &mut holder);
            return Err(refuse(
                dir,
                &format!(
                    "another run (process {}) is writing into this folder; give another --out, or wait \
                     for it to finish",
                    holder.trim()
                ),
            ));
        }
        // Some network file systems (Lustre without its flock option) have no locks: the run goes on, as
        // it would without this claim, rather than being stopped by it.
        Err(std::fs::TryLockError::Error(e)) => {
            eprintln!(
                "note: {} cannot be locked ({e}); a second run into this folder will not be stopped",
                path.display()
            );
        }
    }
    file.set_len(0)
        .and_then(|_| file.write_all(std::process::id().to_string().as_bytes()))
        .map_err(|e| Error::io(&path, e))?;
    Ok(OutputDirLock { _file: file })
}

/// Checks an output path before any work: not an existing non-regular file, not one of `inputs`.
pub fn check_target(path: &Path, inputs: &[&Path]) -> Result<()> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_file() {
            return Err(refuse(
                path,
                "exists and is not a regular file; refusing to replace it",
            ));
        }
        for input in inputs {
            if same_file(path, input) {
                return Err(refuse(
                    path,
                    &format!(
                        "is the same file as the input {}; refusing to overwrite an input",
                        input.display()
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(unix)]
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// [`check_target`], and proof that the target's folder takes a new file: for commands that compute first
/// and write at the end, so a bad output path fails before the work, not after it.
pub fn check_writable_target(path: &Path, inputs: &[&Path]) -> Result<()> {
    // Creating (and dropping, which removes) the temporary file is the check.
    AtomicOutput::create(path, inputs).map(drop)
}

/// Temporary files being written, removed by the Ctrl-C / SIGTERM handler so an interrupted command leaves
/// no hidden partial file behind.
static LIVE: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
static HANDLER: std::sync::Once = std::sync::Once::new();

fn register(tmp: &Path) {
    HANDLER.call_once(|| {
        // If the embedding program installed its own handler first, keep it (the error is ignored).
        let _ = ctrlc::set_handler(|| {
            if let Ok(live) = LIVE.lock() {
                for p in live.iter() {
                    let _ = std::fs::remove_file(p);
                }
            }
            eprintln!("interrupted: partial outputs removed");
            std::process::exit(130);
        });
    });
    if let Ok(mut live) = LIVE.lock() {
        live.push(tmp.to_path_buf());
    }
}

fn unregister(tmp: &Path) {
    if let Ok(mut live) = LIVE.lock() {
        live.retain(|p| p != tmp);
    }
}

/// A file being written under a temporary name, renamed over its target by [`Self::commit`].
pub struct AtomicOutput {
    target: PathBuf,
    tmp: PathBuf,
    writer: Option<BufWriter<File>>,
}

impl AtomicOutput {
    /// Starts writing `target` (checked as by [`check_target`] against `inputs`).
    pub fn create(target: &Path, inputs: &[&Path]) -> Result<Self> {
        check_target(target, inputs)?;
        let dir = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = target
            .file_name()
            .map_or("out".into(), |n| n.to_string_lossy());
        let nonce: u64 = rand::random();
        let tmp = dir.join(format!(
            ".{name}.{}.{nonce:016x}.partial",
            std::process::id()
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::io(dir, e))?;
        register(&tmp);
        Ok(AtomicOutput {
            target: target.to_path_buf(),
            tmp,
            writer: Some(BufWriter::with_capacity(1 << 20, file)),
        })
    }

    /// The file this output becomes, for messages.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The buffered writer of the temporary file.
    pub fn writer(&mut self) -> &mut BufWriter<File> {
        self.writer.as_mut().expect("only taken by commit")
    }

    /// Flushes, syncs and renames the file over the target (re-checking that the target is still not a
    /// non-regular file).
    pub fn commit(mut self) -> Result<()> {
        let writer = self.writer.take().expect("committed once");
        let file = writer
            .into_inner()
            .map_err(|e| Error::io(&self.target, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&self.target, e))?;
        drop(file);
        let result = check_target(&self.target, &[]).and_then(|_| {
            std::fs::rename(&self.tmp, &self.target).map_err(|e| Error::io(&self.target, e))
        });
        if result.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        unregister(&self.tmp);
        result
    }
}

impl Drop for AtomicOutput {
    fn drop(&mut self) {
        if self.writer.is_some() {
            self.writer = None;
            let _ = std::fs::remove_file(&self.tmp);
            unregister(&self.tmp);
        }
    }
}

/// Writes `contents` to `path` atomically (see the module comment).
pub fn write_atomically(path: &Path, contents: &[u8]) -> Result<()> {
    let mut out = AtomicOutput::create(path, &[])?;
    out.writer()
        .write_all(contents)
        .map_err(|e| Error::io(path, e))?;
    out.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_non_regular_targets_and_inputs_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("iso-out-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(
            write_atomically(&dir, b"x").is_err(),
            "a directory is refused"
        );
        let target = dir.join("out.bin");
        write_atomically(&target, b"hello").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"hello");
        // An output directory where a file or a device is: refused by name; new and existing ones made.
        for not_dir in [target.as_path(), Path::new("/dev/null")] {
            let e = create_output_dir(not_dir).unwrap_err().to_string();
            assert!(e.contains("exists and is not a directory"), "{e}");
        }
        create_output_dir(&dir.join("a/b")).unwrap();
        create_output_dir(&dir.join("a/b")).unwrap();
        assert!(dir.join("a/b").is_dir());
        #[cfg(unix)]
        {
            let link = dir.join("link");
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&target, &link).unwrap();
            assert!(
                write_atomically(&link, b"x").is_err(),
                "a symlink is refused"
            );
            assert_eq!(std::fs::read(&target).unwrap(), b"hello");
            assert!(check_target(Path::new("/dev/null"), &[]).is_err());
        }
        assert!(
            AtomicOutput::create(&target, &[&target]).is_err(),
            "an input is refused"
        );
        {
            let mut unfinished = AtomicOutput::create(&dir.join("never.bin"), &[]).unwrap();
            unfinished.writer().write_all(b"partial").unwrap();
        }
        assert!(!dir.join("never.bin").exists());
        let leftovers = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".partial")
            })
            .count();
        assert_eq!(leftovers, 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_output_folder_is_claimed_by_one_run_at_a_time() {
        let dir = std::env::temp_dir().join(format!("iso-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let held = lock_output_dir(&dir).unwrap();
        // A second claim (another open file, as another process would hold) is refused, naming the holder.
        let e = lock_output_dir(&dir).unwrap_err().to_string();
        assert!(
            e.contains(&format!("another run (process {})", std::process::id())),
            "{e}"
        );
        drop(held);
        let again = lock_output_dir(&dir).unwrap();
        drop(again);
        // A lock path that is not a regular file is refused, not opened.
        let other = dir.join("other");
        std::fs::create_dir_all(other.join(".isoformer-engine.lock")).unwrap();
        let e = lock_output_dir(&other).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
