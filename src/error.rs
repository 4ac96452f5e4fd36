//! The crate's one error type. Every user-facing failure names what it was about: the op and the shapes, the
//! file and line, or the tensor.

use std::fmt;
use std::path::PathBuf;

#[derive(Debug)]
pub enum Error {
    /// Operands whose sizes do not agree with the dimensions an op was given.
    Shape { op: &'static str, msg: String },
    /// A caller-supplied value outside its domain (an id past the vocabulary, a zero dimension, …).
    InvalidArgument { what: String, msg: String },
    /// A device that cannot be used: not built in, library missing, no GPU.
    Device(String),
    /// Reading or writing a file failed.
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file's contents are malformed; `line` is 1-based when the format has lines.
    Parse {
        path: PathBuf,
        line: Option<usize>,
        msg: String,
    },
    /// A named tensor is missing, mis-shaped or of the wrong dtype.
    Tensor { name: String, msg: String },
    /// Non-finite values where finite ones are required.
    NonFinite { what: String, index: usize },
    /// Another error with a description of what was being done.
    Context { context: String, source: Box<Error> },
}

pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Shape { op, msg } => write!(f, "{op}: shape mismatch: {msg}"),
            Error::InvalidArgument { what, msg } => write!(f, "invalid {what}: {msg}"),
            Error::Device(msg) => write!(f, "device error: {msg}"),
            Error::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Error::Parse {
                path,
                line: Some(line),
                msg,
            } => write!(f, "{}:{line}: {msg}", path.display()),
            Error::Parse {
                path,
                line: None,
                msg,
            } => write!(f, "{}: {msg}", path.display()),
            Error::Tensor { name, msg } => write!(f, "tensor '{name}': {msg}"),
            Error::NonFinite { what, index } => {
                write!(f, "{what}: non-finite value at index {index}")
            }
            Error::Context { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::Context { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }
}

impl Error {
    pub fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape {
            op,
            msg: msg.into(),
        }
    }

    pub fn invalid(what: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::InvalidArgument {
            what: what.into(),
            msg: msg.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Adds a description of the surrounding work to an error, as `anyhow::Context` does.
pub trait Context<T> {
    fn context(self, context: impl Into<String>) -> Result<T>;
    fn with_context<S: Into<String>>(self, f: impl FnOnce() -> S) -> Result<T>;
}

impl<T> Context<T> for Result<T> {
    fn context(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|e| Error::Context {
            context: context.into(),
            source: Box::new(e),
        })
    }

    fn with_context<S: Into<String>>(self, f: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| Error::Context {
            context: f().into(),
            source: Box::new(e),
        })
    }
}

/// Checks that a buffer holds exactly `want` elements; the message names the operand.
pub fn check_len(op: &'static str, operand: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::shape(
            op,
            format!("{operand} has {got} elements, expected {want}"),
        ))
    }
}

/// The product of `dims`, or an error naming `op` when it overflows: sizes from user input must not wrap
/// around and pass a bounds check before an allocation or unsafe code.
pub fn checked_product(op: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::invalid(op, format!("the size {dims:?} overflows")))
}
