//! The one error type of the config module.

use std::fmt;
use std::path::{Path, PathBuf};

/// A configuration error: which file, which key, and why.
///
/// `key` is the dotted TOML path of the offending value, such as `identity[1].principal`
/// or `interface.mtu` (array indices count from 0). For TOML syntax, type and unknown-field
/// errors it is the position toml reported, as `line N, column M`. It is empty only for
/// errors about the file as a whole (for example, a file that cannot be read), and then
/// `Display` leaves it out: `{file}: {reason}` instead of `{file}: {key}: {reason}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub key: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(file: &Path, key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            key: key.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.reason)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.reason)
        }
    }
}

/// 1-based line and column of a byte offset in `text` (for TOML spans).
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, col)
}
