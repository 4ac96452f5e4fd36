//! The one output writer: every file the engine writes goes through [`write_atomically`], so a partial
//! output never looks complete and nothing outside the named path is touched.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use crate::{Error, Result};

/// Writes `contents` to `path` through a temporary file in the same folder and a rename.
///
/// - An existing `path` that is not a regular file (a device, a FIFO, a directory, a symlink) is refused,
///   so `--output /dev/null` cannot replace `/dev/null`.
/// - The temporary file has an unpredictable name and is created with `create_new`, so a file or symlink
///   planted at a guessable name is never written through.
/// - On any error the temporary file is removed.
pub fn write_atomically(path: &Path, contents: &[u8]) -> Result<()> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_file() {
            return Err(Error::io(
                path,
                std::io::Error::other("exists and is not a regular file; refusing to replace it"),
            ));
        }
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or("out".into(), |n| n.to_string_lossy());
    let nonce: u64 = rand::random();
    let tmp = dir.join(format!(
        ".{name}.{}.{nonce:016x}.partial",
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_non_regular_targets_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("iso-out-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(
            write_atomically(&dir, b"x").is_err(),
            "a directory is refused"
        );
        let target = dir.join("out.bin");
        write_atomically(&target, b"hello").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"hello");
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
        }
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
}
