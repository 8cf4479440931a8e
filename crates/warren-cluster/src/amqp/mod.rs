//! RabbitMQ (AMQP 0-9-1 through lapin): warren's node-to-node transport, [`AmqpTransport`], and the
//! mqant-compatible CallInfo/ResultInfo bridge (docs/cluster.md, "Compatibility bridges"),
//! [`MqantBridge`], through which mqant peers call warren module instances and are called by them.
//!
//! Both stand on a `Link`: one broker connection, one publisher-confirm channel for every
//! publish, and a background task that notices a lost connection, fails sends fast while it is
//! down and reconnects with backoff (lapin's own recovery is not used: the link owns it, so
//! that the first connection, the declarations and the consumers follow one rule). Consumers run
//! on channels of their own and subscribe again after every reconnect.

mod link;
mod mqant;
mod transport;

pub use mqant::{MqantBridge, MqantClient};
pub use transport::AmqpTransport;

use warren::error::Detail;

/// Largest message warren publishes on RabbitMQ, in bytes.
///
/// The broker's limit is `max_message_size`: 128 MiB by default up to RabbitMQ 3.13, lowered
/// to 16 MiB in 4.0. warren uses the lower of the two defaults so that a frame it sends is never
/// refused by a broker left at its defaults, whatever its version; larger calls are refused
/// before sending with [`TransportError::TooLarge`](warren::remote::TransportError::TooLarge).
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// Why the mqant bridge could not start. The detail keeps lapin's error as the source.
#[derive(Debug)]
pub enum AmqpError {
    /// A module entry is not an mqant AMQP instance or has unusable settings.
    Config {
        /// Instance id of the entry.
        instance: String,
        /// What is wrong with it.
        why: Detail,
    },
    /// The broker could not be reached or refused the connection.
    Connect {
        /// Broker URL, without credentials.
        url: String,
        /// The cause.
        why: Detail,
    },
    /// The broker refused a declaration or a subscription.
    Broker {
        /// What was being set up.
        what: String,
        /// The broker's answer.
        why: Detail,
    },
}

impl std::fmt::Display for AmqpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AmqpError::Config { instance, why } => {
                write!(f, "module instance {instance}: {}", why.summary())
            }
            AmqpError::Connect { url, why } => {
                write!(f, "cannot connect to {url}: {}", why.summary())
            }
            AmqpError::Broker { what, why } => write!(f, "{what}: {}", why.summary()),
        }
    }
}

impl std::error::Error for AmqpError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AmqpError::Config { why, .. }
            | AmqpError::Connect { why, .. }
            | AmqpError::Broker { why, .. } => why
                .source()
                .map(|s| s as &(dyn std::error::Error + 'static)),
        }
    }
}

/// A broker URL fit for logs and errors: the password is replaced.
pub(crate) fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "<unparsable url>".to_owned(),
    }
}

/// Unix time in milliseconds (mqant's `Expired` is on this clock).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_password() {
        assert_eq!(
            redact("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://h:1/"), "amqp://h:1/");
        assert_eq!(redact("::"), "<unparsable url>");
    }
}
