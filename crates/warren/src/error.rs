//! Typed call errors, in the manner of async-nats: a kind callers can match, a detail, and the
//! lower-level error that caused it. Every call ends in a reply, one of these, or a deadline
//! error; each variant renders to the exact string the compatible protocols expect on the wire
//! (docs/protocols/mqtt.md, docs/cluster.md), so a client of the original systems sees the same
//! text, while programs on this side branch on the kind and walk the source chain instead of
//! reading text.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

/// The lower-level error behind a [`Detail`] (a broker client's error, a `serde_json` error, an
/// I/O error), shared so the errors that hold it stay `Clone`.
pub type Source = Arc<dyn StdError + Send + Sync + 'static>;

/// What went wrong, in words, and the lower-level error that caused it when there is one.
///
/// The words are for whoever reads the error (a client on the wire, a log); the source is for
/// programs: the `source()` of the error holding this returns it, so a caller can walk the chain
/// or downcast it without parsing text. `Display` shows the message followed by the source's own
/// words (`cannot connect to NATS at nats://h:4222: IO error: …`), the text such an error always
/// had; equality compares that text and ignores the source object, so an error rebuilt from a
/// peer's text equals the one the peer had.
#[derive(Clone, Debug)]
pub struct Detail {
    message: String,
    source: Option<Source>,
}

impl Detail {
    /// A detail of words only.
    pub fn new(message: impl Into<String>) -> Detail {
        Detail {
            message: message.into(),
            source: None,
        }
    }

    /// A detail whose cause is `source`: `message` says what was being done, `source` why it
    /// failed (its words follow the message in `Display`).
    pub fn caused(
        message: impl Into<String>,
        source: impl Into<Box<dyn StdError + Send + Sync + 'static>>,
    ) -> Detail {
        Detail {
            message: message.into(),
            source: Some(Arc::from(source.into())),
        }
    }

    /// A detail that is `source` itself: its words are the source's words.
    pub fn from_error(source: impl Into<Box<dyn StdError + Send + Sync + 'static>>) -> Detail {
        Detail::caused(String::new(), source)
    }

    /// This side's own words, without the source's (empty for [`Detail::from_error`]). An error
    /// that returns the source from `source()` and owes no wire text shows these, so a printed
    /// chain names each cause once.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The lower-level error, if one caused this.
    pub fn source(&self) -> Option<&(dyn StdError + Send + Sync + 'static)> {
        self.source.as_deref()
    }

    /// The message, or the source's words when there is no message of its own: what an error
    /// type that returns the source from `source()` puts in its own `Display`.
    pub fn summary(&self) -> Summary<'_> {
        Summary(self)
    }
}

/// [`Detail::summary`]: a detail's own words for a `Display` that leaves its cause to the chain.
#[derive(Debug, Clone, Copy)]
pub struct Summary<'a>(&'a Detail);

impl fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0.message.is_empty(), &self.0.source) {
            (true, Some(s)) => write!(f, "{s}"),
            _ => f.write_str(&self.0.message),
        }
    }
}

impl fmt::Display for Detail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.source, self.message.is_empty()) {
            (None, _) => f.write_str(&self.message),
            (Some(s), true) => write!(f, "{s}"),
            (Some(s), false) => write!(f, "{}: {s}", self.message),
        }
    }
}

impl PartialEq for Detail {
    fn eq(&self, other: &Detail) -> bool {
        match (&self.source, &other.source) {
            (None, None) => self.message == other.message,
            _ => self.to_string() == other.to_string(),
        }
    }
}

impl Eq for Detail {}

impl From<String> for Detail {
    fn from(message: String) -> Detail {
        Detail::new(message)
    }
}

impl From<&str> for Detail {
    fn from(message: &str) -> Detail {
        Detail::new(message)
    }
}

/// Why a call did not produce a result.
///
/// Callers branch on the variant or on [`CallError::kind`] (and read [`CallError::detail`]);
/// protocols put [`CallError::wire_text`] on the wire; `Display` is for people and logs (today
/// the same words, which include a source's words); [`std::error::Error::source`] returns the
/// lower-level error when one caused this (a `serde_json` error for a body that does not decode,
/// the broker client's error for a bus that cannot carry the call). Nothing parses either text
/// except [`CallError::from_wire_text`], for peers whose protocol carries only text. Equality
/// compares kind and detail and ignores the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// The request body had to be a JSON object (mqant mode) and was not.
    BodyNotJson,
    /// No live instance of the module type exists.
    ServiceNotFound(String),
    /// A client tried to call a handler that is not client-visible.
    NotClientVisible {
        /// Handler name the client asked for.
        handler: String,
        /// The first configured client-visible prefix, quoted in the message.
        prefix: String,
    },
    /// The module has no handler of that name.
    HandlerNotFound(String),
    /// The call's deadline passed before a result arrived.
    Timeout,
    /// The session id is unknown to its gate (the misspelling is the upstream wire text).
    NoSession,
    /// The session's connection has already closed.
    ConnectionClosed,
    /// The gate instance owning a session is gone.
    GateNotFound(String),
    /// The target module is shutting down or its mailbox is gone.
    Closed,
    /// The handler panicked; the text is the panic message.
    Panicked(String),
    /// The request could not be used as sent: its body does not decode into the handler's
    /// argument type (the source is the decoder's error), or it breaks a rule of the gate.
    BadRequest(Detail),
    /// An error the handler itself returned; the text goes to the caller unchanged.
    App(String),
    /// The bus could not carry the call (broker down, not connected); the call was not sent.
    /// The wire text starts with mqant's wording (docs/cluster.md, "Compatibility bridges");
    /// the source is the broker client's error when it gave one.
    Unavailable(Detail),
    /// The node running the target instance left the cluster before replying.
    NodeLost(String),
    /// A client without a bound uid called a handler that is not a login handler (the login
    /// rule). The wire text is the mqant demo's, so its clients see the words they expect.
    LoginRequired,
    /// Binding a uid that a live session on the gate holds, under `uid_conflict = "reject"`.
    UidInUse(String),
    /// The call is larger than the bus carries; it was refused before sending.
    TooLarge {
        /// Encoded size of the call.
        size: usize,
        /// The bus's limit.
        max: usize,
    },
}

impl CallError {
    /// The exact text a protocol puts on the wire for this error (mqant's `Error`, pomelo's
    /// `msg`, JSON-WS `error`, pomelo-rpc's error message): the words the original systems'
    /// clients expect (docs/protocols/mqtt.md, docs/cluster.md).
    pub fn wire_text(&self) -> String {
        match self {
            CallError::BodyNotJson => "body must be JSON format".to_owned(),
            CallError::ServiceNotFound(x) => format!("Service(type:{x}) not found"),
            CallError::NotClientVisible { handler, prefix } => {
                format!("Method({handler}) must begin with '{prefix}'")
            }
            CallError::HandlerNotFound(x) => format!("Remote function({x}) not found"),
            CallError::Timeout => "timeout: This is Call".to_owned(),
            CallError::NoSession => "No Sesssion found".to_owned(),
            CallError::ConnectionClosed => "connection is closed".to_owned(),
            CallError::GateNotFound(x) => format!("Service not found id({x})"),
            CallError::Closed => "client closed".to_owned(),
            CallError::Panicked(x) | CallError::App(x) => x.clone(),
            CallError::BadRequest(x) => x.to_string(),
            CallError::Unavailable(x) => format!("rpc service connection failed: {x}"),
            CallError::NodeLost(x) => format!("node {x} left the cluster"),
            CallError::LoginRequired => "Not Logined".to_owned(),
            CallError::UidInUse(x) => format!("user {x} is already logged in"),
            CallError::TooLarge { size, max } => {
                format!("call of {size} bytes exceeds the bus limit of {max} bytes")
            }
        }
    }

    /// The error a peer meant by `text`, for protocols that carry only an error's text (mqant
    /// over RabbitMQ): the fixed texts of [`CallError::wire_text`] map back to their kinds,
    /// anything else is the handler's own error ([`CallError::App`]).
    pub fn from_wire_text(text: &str) -> CallError {
        for fixed in [
            CallError::BodyNotJson,
            CallError::Timeout,
            CallError::NoSession,
            CallError::ConnectionClosed,
            CallError::Closed,
            CallError::LoginRequired,
        ] {
            if text == fixed.wire_text() {
                return fixed;
            }
        }
        if let Some(f) = text
            .strip_prefix("Remote function(")
            .and_then(|s| s.strip_suffix(") not found"))
        {
            return CallError::HandlerNotFound(f.to_owned());
        }
        if let Some(m) = text
            .strip_prefix("Service(type:")
            .and_then(|s| s.strip_suffix(") not found"))
        {
            return CallError::ServiceNotFound(m.to_owned());
        }
        CallError::App(text.to_owned())
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.wire_text())
    }
}

impl StdError for CallError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            CallError::BadRequest(d) | CallError::Unavailable(d) => {
                d.source().map(|s| s as &(dyn StdError + 'static))
            }
            _ => None,
        }
    }
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
    /// See [`CallError::Unavailable`].
    Unavailable,
    /// See [`CallError::NodeLost`].
    NodeLost,
    /// See [`CallError::TooLarge`].
    TooLarge,
    /// See [`CallError::LoginRequired`].
    LoginRequired,
    /// See [`CallError::UidInUse`].
    UidInUse,
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
            CallError::Unavailable(_) => CallErrorKind::Unavailable,
            CallError::NodeLost(_) => CallErrorKind::NodeLost,
            CallError::TooLarge { .. } => CallErrorKind::TooLarge,
            CallError::LoginRequired => CallErrorKind::LoginRequired,
            CallError::UidInUse(_) => CallErrorKind::UidInUse,
        }
    }

    /// An application error with the given text, as a handler returns it.
    pub fn app(text: impl fmt::Display) -> Self {
        CallError::App(text.to_string())
    }

    /// A [`CallError::BadRequest`]: pass words, or a [`Detail::caused`] to keep the cause.
    pub fn bad_request(detail: impl Into<Detail>) -> Self {
        CallError::BadRequest(detail.into())
    }

    /// A [`CallError::Unavailable`]: pass words, or a [`Detail::caused`] to keep the broker
    /// client's error.
    pub fn unavailable(detail: impl Into<Detail>) -> Self {
        CallError::Unavailable(detail.into())
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
            CallErrorKind::Unavailable => "unavailable",
            CallErrorKind::NodeLost => "node_lost",
            CallErrorKind::TooLarge => "too_large",
            CallErrorKind::LoginRequired => "login_required",
            CallErrorKind::UidInUse => "uid_in_use",
        }
    }

    /// Read a kind back from its label (errors crossing the bus travel as label and text).
    pub fn from_label(label: &str) -> Option<CallErrorKind> {
        Some(match label {
            "body_not_json" => CallErrorKind::BodyNotJson,
            "service_not_found" => CallErrorKind::ServiceNotFound,
            "not_client_visible" => CallErrorKind::NotClientVisible,
            "handler_not_found" => CallErrorKind::HandlerNotFound,
            "timeout" => CallErrorKind::Timeout,
            "no_session" => CallErrorKind::NoSession,
            "connection_closed" => CallErrorKind::ConnectionClosed,
            "gate_not_found" => CallErrorKind::GateNotFound,
            "closed" => CallErrorKind::Closed,
            "panicked" => CallErrorKind::Panicked,
            "bad_request" => CallErrorKind::BadRequest,
            "app" => CallErrorKind::App,
            "unavailable" => CallErrorKind::Unavailable,
            "node_lost" => CallErrorKind::NodeLost,
            "too_large" => CallErrorKind::TooLarge,
            "login_required" => CallErrorKind::LoginRequired,
            "uid_in_use" => CallErrorKind::UidInUse,
            _ => return None,
        })
    }
}

impl CallError {
    /// The error's payload text, without the fixed wording of its kind: what [`CallError::rebuild`]
    /// needs to make the same error on the other side of a bus.
    pub fn detail(&self) -> String {
        match self {
            CallError::ServiceNotFound(s)
            | CallError::HandlerNotFound(s)
            | CallError::GateNotFound(s)
            | CallError::Panicked(s)
            | CallError::App(s)
            | CallError::NodeLost(s)
            | CallError::UidInUse(s) => s.clone(),
            CallError::BadRequest(d) | CallError::Unavailable(d) => d.to_string(),
            CallError::NotClientVisible { handler, prefix } => format!("{handler}\n{prefix}"),
            CallError::TooLarge { size, max } => format!("{size}\n{max}"),
            CallError::BodyNotJson
            | CallError::Timeout
            | CallError::NoSession
            | CallError::ConnectionClosed
            | CallError::Closed
            | CallError::LoginRequired => String::new(),
        }
    }

    /// Rebuild an error from its kind label and [`CallError::detail`]; an unknown label becomes
    /// an application error carrying the detail.
    pub fn rebuild(label: &str, detail: String) -> CallError {
        let Some(kind) = CallErrorKind::from_label(label) else {
            return CallError::App(detail);
        };
        let pair = |d: &str| {
            let (a, b) = d.split_once('\n').unwrap_or((d, ""));
            (a.to_owned(), b.to_owned())
        };
        match kind {
            CallErrorKind::BodyNotJson => CallError::BodyNotJson,
            CallErrorKind::ServiceNotFound => CallError::ServiceNotFound(detail),
            CallErrorKind::NotClientVisible => {
                let (handler, prefix) = pair(&detail);
                CallError::NotClientVisible { handler, prefix }
            }
            CallErrorKind::HandlerNotFound => CallError::HandlerNotFound(detail),
            CallErrorKind::Timeout => CallError::Timeout,
            CallErrorKind::NoSession => CallError::NoSession,
            CallErrorKind::ConnectionClosed => CallError::ConnectionClosed,
            CallErrorKind::GateNotFound => CallError::GateNotFound(detail),
            CallErrorKind::Closed => CallError::Closed,
            CallErrorKind::Panicked => CallError::Panicked(detail),
            CallErrorKind::BadRequest => CallError::BadRequest(detail.into()),
            CallErrorKind::App => CallError::App(detail),
            CallErrorKind::Unavailable => CallError::Unavailable(detail.into()),
            CallErrorKind::NodeLost => CallError::NodeLost(detail),
            CallErrorKind::LoginRequired => CallError::LoginRequired,
            CallErrorKind::UidInUse => CallError::UidInUse(detail),
            CallErrorKind::TooLarge => {
                let (a, b) = pair(&detail);
                CallError::TooLarge {
                    size: a.parse().unwrap_or(0),
                    max: b.parse().unwrap_or(0),
                }
            }
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
        // the texts peers send back map to the same kinds; anything else is the handler's own
        for e in [
            CallError::Timeout,
            CallError::Closed,
            CallError::NoSession,
            CallError::LoginRequired,
            CallError::BodyNotJson,
            CallError::HandlerNotFound("HD_X".into()),
            CallError::ServiceNotFound("Chat".into()),
        ] {
            assert_eq!(CallError::from_wire_text(&e.wire_text()), e);
        }
        assert_eq!(
            CallError::from_wire_text("No room"),
            CallError::App("No room".into())
        );
        assert_eq!(CallError::NoSession.to_string(), "No Sesssion found");
        assert_eq!(
            CallError::HandlerNotFound("x".into()).to_string(),
            "Remote function(x) not found"
        );
        assert_eq!(
            CallError::unavailable("not connected to NATS (reconnecting)").wire_text(),
            "rpc service connection failed: not connected to NATS (reconnecting)"
        );
        assert_eq!(
            CallError::BadRequest("invalid route \"x\"".into()).wire_text(),
            "invalid route \"x\""
        );
    }

    fn refused() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused")
    }

    #[test]
    fn a_bus_failure_keeps_its_cause() {
        let e =
            CallError::unavailable(Detail::caused("cannot connect to nats://h:4222", refused()));
        assert_eq!(e.kind(), CallErrorKind::Unavailable);
        // programs walk the chain down to the lower-level error
        let cause = e.source().expect("a source");
        let io = cause
            .downcast_ref::<std::io::Error>()
            .expect("the I/O error");
        assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);
        // the wire text is the words such an error always had: message, then the cause's words
        assert_eq!(
            e.wire_text(),
            "rpc service connection failed: cannot connect to nats://h:4222: connection refused"
        );
        assert_eq!(e.to_string(), e.wire_text());
        // errors of kinds that never have a cause have no source
        assert!(CallError::Timeout.source().is_none());
        assert!(CallError::unavailable("no queue group").source().is_none());
    }

    #[test]
    fn a_decode_failure_keeps_the_decoder_error() {
        let json = serde_json::from_slice::<u32>(b"\"x\"").expect_err("not a number");
        let words = json.to_string();
        let e = CallError::bad_request(Detail::caused("invalid request body", json));
        let cause = e.source().expect("a source");
        assert!(
            cause
                .downcast_ref::<serde_json::Error>()
                .is_some_and(|j| j.is_data())
        );
        assert_eq!(e.wire_text(), format!("invalid request body: {words}"));
        assert_eq!(e.detail(), e.wire_text());
        // words without a cause, as the gate refuses a route
        assert!(CallError::bad_request("invalid route").source().is_none());
    }

    #[test]
    fn equality_ignores_the_source() {
        let e = CallError::unavailable(Detail::caused("cannot connect", refused()));
        // a peer rebuilds it from kind label and detail: no source, the same error
        let back = CallError::rebuild(e.kind().as_str(), e.detail());
        assert!(back.source().is_none());
        assert_eq!(back, e);
        assert_eq!(
            e,
            CallError::unavailable("cannot connect: connection refused")
        );
        assert_ne!(e, CallError::unavailable("cannot connect"));
        assert_ne!(e, CallError::app("cannot connect: connection refused"));
        let json = serde_json::from_slice::<u32>(b"{").expect_err("not JSON");
        let e = CallError::bad_request(Detail::caused("invalid request body", json));
        assert_eq!(CallError::rebuild("bad_request", e.detail()), e);
    }

    #[test]
    fn details_show_message_and_cause() {
        assert_eq!(Detail::new("no answer").to_string(), "no answer");
        assert_eq!(
            Detail::from_error(refused()).to_string(),
            "connection refused"
        );
        let d = Detail::caused("subscribe a.b", refused());
        assert_eq!(d.to_string(), "subscribe a.b: connection refused");
        // its own words, for an error whose chain shows the cause
        assert_eq!(d.message(), "subscribe a.b");
        assert_eq!(d.summary().to_string(), "subscribe a.b");
        assert_eq!(
            Detail::from_error(refused()).summary().to_string(),
            "connection refused"
        );
        assert!(Detail::new("x").source().is_none());
        assert!(d.source().is_some_and(|s| s.is::<std::io::Error>()));
    }
}
