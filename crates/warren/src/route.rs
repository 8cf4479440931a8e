//! Route parsing: `Module[@target]/Handler[/msgid]`, the address every client message and every
//! call carries (docs/protocols/mqtt.md, "Requests, replies and pushes").

use std::fmt;

/// A parsed route. Borrowed from the topic so that routing a message allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route<'a> {
    /// Module type name (`Chat`).
    pub module: &'a str,
    /// Optional instance or node id after `@` (`Chat@Chat001`).
    pub target: Option<&'a str>,
    /// Handler name (`HD_Say`).
    pub handler: &'a str,
    /// Present when the client wants a reply: the third segment, when there are exactly three
    /// and it is not empty.
    pub msgid: Option<&'a str>,
}

/// Why a topic is not a route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// Fewer than two segments, or an empty module or handler segment.
    #[error("route needs Module/Handler, got {0:?}")]
    TooShort(String),
}

impl<'a> Route<'a> {
    /// Parse a topic into a route.
    pub fn parse(topic: &'a str) -> Result<Route<'a>, RouteError> {
        let mut parts = topic.split('/');
        let first = parts.next().unwrap_or_default();
        let handler = parts.next().unwrap_or_default();
        let third = parts.next();
        let more = parts.next().is_some();
        if first.is_empty() || handler.is_empty() {
            return Err(RouteError::TooShort(topic.to_owned()));
        }
        let (module, target) = match first.split_once('@') {
            Some((m, t)) => (m, (!t.is_empty()).then_some(t)),
            None => (first, None),
        };
        if module.is_empty() {
            return Err(RouteError::TooShort(topic.to_owned()));
        }
        let msgid = match (third, more) {
            (Some(id), false) if !id.is_empty() => Some(id),
            _ => None,
        };
        Ok(Route {
            module,
            target,
            handler,
            msgid,
        })
    }

    /// The first segment of a topic, without parsing the rest: enough to decide whether the topic
    /// names a module at all.
    pub fn module_of(topic: &str) -> &str {
        let first = topic.split('/').next().unwrap_or_default();
        first.split_once('@').map_or(first, |(m, _)| m)
    }
}

impl fmt::Display for Route<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.module)?;
        if let Some(t) = self.target {
            write!(f, "@{t}")?;
        }
        write!(f, "/{}", self.handler)?;
        if let Some(m) = self.msgid {
            write!(f, "/{m}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_of_section_1_4() {
        let r = Route::parse("Login/HD_Login/1").unwrap();
        assert_eq!(
            (r.module, r.target, r.handler, r.msgid),
            ("Login", None, "HD_Login", Some("1"))
        );
        let r = Route::parse("Login/HD_Login").unwrap();
        assert_eq!(r.msgid, None);
        let r = Route::parse("Chat@Chat001/HD_Say/7").unwrap();
        assert_eq!(
            (r.module, r.target, r.msgid),
            ("Chat", Some("Chat001"), Some("7"))
        );
        // empty third segment: no msgid
        assert_eq!(Route::parse("A/B/").unwrap().msgid, None);
        // four or more segments: routes, but no msgid
        let r = Route::parse("A/B/C/D").unwrap();
        assert_eq!((r.module, r.handler, r.msgid), ("A", "B", None));
        assert!(Route::parse("Login").is_err());
        assert!(Route::parse("/x").is_err());
        assert!(Route::parse("x/").is_err());
        assert!(Route::parse("@n/x").is_err());
        assert_eq!(
            Route::parse("Chat@Chat001/HD_Say/7").unwrap().to_string(),
            "Chat@Chat001/HD_Say/7"
        );
        assert_eq!(Route::module_of("Chat@x/HD_Say"), "Chat");
        assert_eq!(Route::module_of("sensors/1/temp"), "sensors");
    }
}
