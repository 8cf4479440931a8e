//! Typed call errors. Every call ends in a reply, one of these, or a deadline error; each variant
//! renders to the exact string the compatible protocols expect on the wire (PROTOCOLS.md §1.5,
//! §1.8, §7.3), so a client of the original systems sees the same text.

use std::fmt;

/// Why a call did not produce a result. Callers branch on [`CallError::kind`]; the `Display` form is
/// the wire text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The request body had to be a JSON object (mqant mode) and was not.
    #[error("body must be JSON format")]
    BodyNotJson,
    /// No live instance of the module type exists.
    #[error("Service(type:{0}) not found")]
    ServiceNotFound(String),
    /// A client tried to call a handler that is not client-visible.
    #[error("Method({handler}) must begin with '{prefix}'")]
    NotClientVisible {
        /// Handler name the client asked for.
        handler: String,
        /// The first configured client-visible prefix, quoted in the message.
        prefix: String,
    },
    /// The module has no handler of that name.
    #[error("Remote function({0}) not found")]
    HandlerNotFound(String),
    /// The call's deadline passed before a result arrived.
    #[error("timeout: This is Call")]
    Timeout,
    /// The session id is unknown to its gate (the misspelling is the upstream wire text).
    #[error("No Sesssion found")]
    NoSession,
    /// The session's connection has already closed.
    #[error("connection is closed")]
    ConnectionClosed,
    /// The gate instance owning a session is gone.
    #[error("Service not found id({0})")]
    GateNotFound(String),
    /// The target module is shutting down or its mailbox is gone.
    #[error("client closed")]
    Closed,
    /// The handler panicked; the text is the panic message.
    #[error("{0}")]
    Panicked(String),
    /// The request body could not be decoded into the handler's argument type.
    #[error("{0}")]
    BadRequest(String),
    /// An error the handler itself returned; the text goes to the caller unchanged.
    #[error("{0}")]
    App(String),
}

/// The kind of a [`CallError`], for metrics labels and for callers that branch on the cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallErrorKind {
    /// See [`CallError::BodyNotJson`].
    BodyNotJson,
    /// See [`CallError::ServiceNotFound`].
    ServiceNotFound,
    /// See [`CallError::NotClientVisible`].
    NotClientVisible,
    /// See [`CallError::HandlerNotFound`].
    HandlerNotFound,
    /// See [`CallError::Timeout`].
    Timeout,
    /// See [`CallError::NoSession`].
    NoSession,
    /// See [`CallError::ConnectionClosed`].
    ConnectionClosed,
    /// See [`CallError::GateNotFound`].
    GateNotFound,
    /// See [`CallError::Closed`].
    Closed,
    /// See [`CallError::Panicked`].
    Panicked,
    /// See [`CallError::BadRequest`].
    BadRequest,
    /// See [`CallError::App`].
    App,
}

impl CallError {
    /// The kind of this error.
    pub fn kind(&self) -> CallErrorKind {
        match self {
            CallError::BodyNotJson => CallErrorKind::BodyNotJson,
            CallError::ServiceNotFound(_) => CallErrorKind::ServiceNotFound,
            CallError::NotClientVisible { .. } => CallErrorKind::NotClientVisible,
            CallError::HandlerNotFound(_) => CallErrorKind::HandlerNotFound,
            CallError::Timeout => CallErrorKind::Timeout,
            CallError::NoSession => CallErrorKind::NoSession,
            CallError::ConnectionClosed => CallErrorKind::ConnectionClosed,
            CallError::GateNotFound(_) => CallErrorKind::GateNotFound,
            CallError::Closed => CallErrorKind::Closed,
            CallError::Panicked(_) => CallErrorKind::Panicked,
            CallError::BadRequest(_) => CallErrorKind::BadRequest,
            CallError::App(_) => CallErrorKind::App,
        }
    }

    /// An application error with the given text, as a handler returns it.
    pub fn app(text: impl fmt::Display) -> Self {
        CallError::App(text.to_string())
    }
}

impl CallErrorKind {
    /// A short stable label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            CallErrorKind::BodyNotJson => "body_not_json",
            CallErrorKind::ServiceNotFound => "service_not_found",
            CallErrorKind::NotClientVisible => "not_client_visible",
            CallErrorKind::HandlerNotFound => "handler_not_found",
            CallErrorKind::Timeout => "timeout",
            CallErrorKind::NoSession => "no_session",
            CallErrorKind::ConnectionClosed => "connection_closed",
            CallErrorKind::GateNotFound => "gate_not_found",
            CallErrorKind::Closed => "closed",
            CallErrorKind::Panicked => "panicked",
            CallErrorKind::BadRequest => "bad_request",
            CallErrorKind::App => "app",
        }
    }
}

impl From<String> for CallError {
    fn from(text: String) -> Self {
        CallError::App(text)
    }
}

impl From<&str> for CallError {
    fn from(text: &str) -> Self {
        CallError::App(text.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_texts_match_the_contract() {
        assert_eq!(
            CallError::BodyNotJson.to_string(),
            "body must be JSON format"
        );
        assert_eq!(
            CallError::ServiceNotFound("Nope".into()).to_string(),
            "Service(type:Nope) not found"
        );
        assert_eq!(
            CallError::NotClientVisible {
                handler: "getRand".into(),
                prefix: "HD_".into()
            }
            .to_string(),
            "Method(getRand) must begin with 'HD_'"
        );
        assert_eq!(CallError::Timeout.to_string(), "timeout: This is Call");
        assert_eq!(CallError::NoSession.to_string(), "No Sesssion found");
        assert_eq!(
            CallError::HandlerNotFound("x".into()).to_string(),
            "Remote function(x) not found"
        );
    }
}
