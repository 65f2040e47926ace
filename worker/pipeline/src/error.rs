//! The error classes of a destination: a failed write or flush says whether retrying can
//! help ([`ErrorClass`]) and what the user can do ([`DestinationError::hint`]).

use std::fmt;

/// Whether retrying can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Network blips, timeouts, throttling, a full disk that may be freed: retry with
    /// backoff.
    Transient,
    /// Bad credentials, a rejected schema, a missing bucket: retrying the same batch will
    /// fail the same way until a human changes something.
    Permanent,
}

impl ErrorClass {
    /// Lower-case name for status and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Transient => "transient",
            Self::Permanent => "permanent",
        }
    }
}

/// A failed write or flush.
#[derive(Debug, Clone)]
pub struct DestinationError {
    /// Retry class.
    pub class: ErrorClass,
    /// What failed.
    pub message: String,
    /// What the user can do about it.
    pub hint: Option<String>,
}

impl DestinationError {
    /// A transient error.
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Transient,
            message: message.into(),
            hint: None,
        }
    }

    /// A permanent error.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Permanent,
            message: message.into(),
            hint: None,
        }
    }

    /// Adds a hint.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Classifies an I/O error: interruptions, timeouts and a full disk are worth retrying;
    /// permission and path problems are not.
    pub fn from_io(context: &str, e: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        let message = format!("{context}: {e}");
        match e.kind() {
            K::PermissionDenied | K::ReadOnlyFilesystem => Self::permanent(message)
                .with_hint("give the worker write access to the destination path"),
            K::NotFound | K::NotADirectory | K::IsADirectory | K::InvalidInput => {
                Self::permanent(message).with_hint("check the destination path")
            }
            K::StorageFull | K::QuotaExceeded => {
                Self::transient(message).with_hint("free disk space on the destination volume")
            }
            _ => Self::transient(message),
        }
    }
}

impl fmt::Display for DestinationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.class.as_str())?;
        if let Some(hint) = &self.hint {
            write!(f, "; hint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for DestinationError {}
