//! Opening what a user names as input. Regular files only: a FIFO would block the open until a writer came,
//! a device such as `/dev/zero` never ends, and a directory is not data. Each is refused by name before a
//! byte is read, the counterpart of the one output writer ([`super::output`]), which refuses non-regular
//! targets.

use std::fs::{File, Metadata};
use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

/// Largest configuration file read (JSON configs, `config.json`, a FASTA index): far above any real one.
pub const MAX_CONFIG_BYTES: u64 = 64 << 20;

fn kind(meta: &Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

fn refuse(path: &Path, meta: &Metadata) -> Error {
    Error::Parse {
        path: path.to_path_buf(),
        line: None,
        msg: format!("is {}, not a regular file; give a file", kind(meta)),
    }
}

/// Opens `path` for reading if it is a regular file (symbolic links followed).
pub fn open_regular(path: &Path) -> Result<File> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(refuse(path, &meta));
    }
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // The path may have been replaced between the two calls: what was opened is checked too.
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(refuse(path, &meta));
    }
    Ok(file)
}

/// The bytes of a regular file of at most `limit` bytes.
pub fn read_regular(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let file = open_regular(path)?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len > limit {
        return Err(Error::Parse {
            path: path.to_path_buf(),
            line: None,
            msg: format!("is {len} bytes, above the {limit} this input may have"),
        });
    }
    // Reserved fallibly, as `std::fs::read` does: a file larger than memory (a sparse one, say) is an
    // error, not an abort in the allocator.
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(len as usize)
        .map_err(|_| Error::Parse {
            path: path.to_path_buf(),
            line: None,
            msg: format!("is {len} bytes, more than this machine can hold in memory"),
        })?;
    // A file that grows while it is read stops at the limit too.
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(Error::Parse {
            path: path.to_path_buf(),
            line: None,
            msg: format!("grew past the {limit} bytes this input may have while it was read"),
        });
    }
    Ok(bytes)
}

/// A regular text file of at most [`MAX_CONFIG_BYTES`] as UTF-8.
pub fn read_config_text(path: &Path) -> Result<String> {
    String::from_utf8(read_regular(path, MAX_CONFIG_BYTES)?).map_err(|e| Error::Parse {
        path: path.to_path_buf(),
        line: None,
        msg: format!("not UTF-8 text ({e})"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory, a device and a FIFO are refused by kind without blocking; a regular file (and a link to
    /// one) is read; a file past the limit is refused.
    #[test]
    fn only_regular_files_are_read() {
        let dir = std::env::temp_dir().join(format!("iso-input-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .is_ok_and(|s| s.success());
        let mut refused = vec![
            (dir.clone(), "a directory"),
            ("/dev/zero".into(), "a device"),
        ];
        if made {
            refused.push((fifo.clone(), "a FIFO"));
        }
        for (path, what) in refused {
            let e = read_regular(&path, 1 << 20).unwrap_err().to_string();
            assert!(e.contains(what) && e.contains("not a regular file"), "{e}");
            assert!(open_regular(&path).is_err());
        }
        let file = dir.join("config.json");
        std::fs::write(&file, "{\"a\": 1}").unwrap();
        let link = dir.join("link.json");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(read_config_text(&link).unwrap(), "{\"a\": 1}");
        assert_eq!(read_regular(&file, u64::MAX).unwrap(), b"{\"a\": 1}");
        let e = read_regular(&file, 3).unwrap_err().to_string();
        assert!(e.contains("8 bytes, above the 3"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
