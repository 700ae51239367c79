//! Errors in the files a person writes (node, peer and policy files), and the TOML helpers
//! that both the config and the policy loaders use to say where a value is.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// An error in a file: which file, which key, and why.
///
/// `key` is the path of the offending value: `identity[1].principal` or
/// `policy[1].rules[0].from[0].principals[2]` in TOML (indices count from 0),
/// `document 2: spec.rules[0].to[0].operation.methods` in YAML (documents count from 1).
/// For syntax, type and unknown-field errors it is the position the parser reported, as
/// `line N, column M`. When the value's line is known, `reason` starts with `line N: `.
/// `key` is empty only for errors about the file as a whole (a file that cannot be read),
/// and then `Display` leaves it out: `{file}: {reason}` instead of `{file}: {key}: {reason}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct FileError {
    pub file: PathBuf,
    pub key: String,
    pub reason: String,
}

impl FileError {
    pub fn new(file: &Path, key: impl Into<String>, reason: impl Into<String>) -> Self {
        FileError {
            file: file.to_path_buf(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// An error about the whole file.
    pub fn whole_file(file: &Path, reason: impl Into<String>) -> Self {
        FileError::new(file, "", reason)
    }
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.reason)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.reason)
        }
    }
}

/// Reads a whole file as text.
pub fn read_to_string(path: &Path) -> Result<String, FileError> {
    std::fs::read_to_string(path)
        .map_err(|e| FileError::whole_file(path, format!("cannot read file: {e}")))
}

/// Prefixes a reason with `line N: ` when the line is known.
pub fn at_line(line: Option<usize>, reason: impl fmt::Display) -> String {
    match line {
        Some(l) => format!("line {l}: {reason}"),
        None => reason.to_string(),
    }
}

/// A TOML file being read: its path and text, to turn spans into line numbers.
#[derive(Clone, Copy)]
pub struct TomlFile<'a> {
    pub path: &'a Path,
    pub text: &'a str,
}

impl<'a> TomlFile<'a> {
    pub fn new(path: &'a Path, text: &'a str) -> Self {
        TomlFile { path, text }
    }

    /// 1-based line and column of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = self.text.get(..offset).unwrap_or(self.text);
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
        (line, col)
    }

    /// The line a span starts on.
    pub fn line(&self, span: &Range<usize>) -> usize {
        self.line_col(span.start).0
    }

    /// Deserializes the whole file; a syntax, type or unknown-key error names its
    /// position as the key.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, FileError> {
        toml::from_str(self.text).map_err(|e| {
            let key = match e.span() {
                Some(span) => {
                    let (line, col) = self.line_col(span.start);
                    format!("line {line}, column {col}")
                }
                None => String::new(),
            };
            FileError::new(self.path, key, e.message().trim_end())
        })
    }

    /// An error about `key`, with no position.
    pub fn error(&self, key: impl Into<String>, reason: impl Into<String>) -> FileError {
        FileError::new(self.path, key, reason)
    }

    /// An error about `key`, whose value is at `span`.
    pub fn error_at(
        &self,
        key: impl Into<String>,
        span: Range<usize>,
        reason: impl fmt::Display,
    ) -> FileError {
        FileError::new(self.path, key, at_line(Some(self.line(&span)), reason))
    }
}
