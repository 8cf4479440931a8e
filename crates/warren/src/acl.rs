//! Topic ACLs for default-mode MQTT, in mosquitto's `acl_file` format (`[auth] acl_file`).
//!
//! ```text
//! # comment
//! topic read public/#              # before any `user` line: anonymous clients
//! user alice
//! topic readwrite rooms/#          # alice only
//! topic deny rooms/secret
//! pattern write users/%u/out       # everyone: %u is the user name, %c the client id
//! pattern read users/%u/in/#
//! ```
//!
//! Lines are `topic [read|write|readwrite|deny] <topic>`, `pattern [read|write|readwrite|deny]
//! <topic>` and `user <name>`; the access word is optional (read and write) unless the topic
//! holds a space. `topic` lines before the first `user` line apply to clients without a user
//! name, later ones to the user named above them; `pattern` lines apply to every client, with
//! `%u` and `%c` substituted where they are a whole level. `deny` rules win over every grant.
//!
//! The file is parsed once into an immutable [`Acl`] (swappable as a whole on reload); each
//! session resolves it once into a [`ClientAcl`] of plain rules for its user and client id, so a
//! check is a few topic comparisons without allocation. A SUBSCRIBE filter is granted only when
//! a read rule covers every topic it can match (the filter is a subset of the rule) and no deny
//! rule can match any of them: deliveries then need no ACL check at all. A PUBLISH needs a write
//! rule matching its topic and no matching deny rule.
//!
//! A verified token that names its topics (JWT claim `topics`) gets a second [`ClientAcl`]
//! ([`ClientAcl::only`]: read and write on those filters, nothing else); the gate checks both,
//! so a token can narrow what the file grants but never widen it.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use warren_proto::mqtt::topic;

/// An ACL file that could not be used: where and why.
#[derive(Debug, thiserror::Error)]
pub enum AclError {
    /// The file could not be read.
    #[error("acl_file {path}: {source}")]
    Io {
        /// The configured path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A line is not a valid ACL line.
    #[error("{path}:{line}: {why}")]
    Line {
        /// The configured path (or the name the text was parsed under).
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        why: String,
    },
}

/// What a rule grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Subscribe (receive).
    Read,
    /// Publish.
    Write,
    /// Both.
    ReadWrite,
    /// Neither, whatever other rules grant.
    Deny,
}

impl Access {
    fn parse(word: &str) -> Option<Access> {
        Some(match word {
            "read" => Access::Read,
            "write" => Access::Write,
            "readwrite" => Access::ReadWrite,
            "deny" => Access::Deny,
            _ => return None,
        })
    }

    fn reads(self) -> bool {
        matches!(self, Access::Read | Access::ReadWrite)
    }

    fn writes(self) -> bool {
        matches!(self, Access::Write | Access::ReadWrite)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    access: Access,
    topic: Box<str>,
}

/// A parsed ACL file: immutable, shared by every session (an `Arc`), replaced as a whole when the
/// file is reloaded.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Acl {
    /// `topic` lines before the first `user` line.
    anonymous: Vec<Rule>,
    /// `topic` lines under each `user` line.
    users: HashMap<Box<str>, Vec<Rule>>,
    /// `pattern` lines, for everyone.
    patterns: Vec<Rule>,
}

impl Acl {
    /// Read and parse an ACL file.
    pub fn load(path: impl AsRef<Path>) -> Result<Acl, AclError> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| AclError::Io {
            path: name.clone(),
            source,
        })?;
        Acl::parse(&text, &name)
    }

    /// Parse the text of an ACL file; `path` names it in errors.
    pub fn parse(text: &str, path: &str) -> Result<Acl, AclError> {
        let mut acl = Acl::default();
        let mut user: Option<Box<str>> = None;
        for (i, raw) in text.lines().enumerate() {
            let err = |why: String| AclError::Line {
                path: path.to_owned(),
                line: i + 1,
                why,
            };
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (keyword, rest) = split_word(line);
            match keyword {
                "user" => {
                    if rest.is_empty() {
                        return Err(err("`user` needs a user name".into()));
                    }
                    let name: Box<str> = rest.into();
                    acl.users.entry(name.clone()).or_default();
                    user = Some(name);
                }
                "topic" | "pattern" => {
                    let rule = parse_rule(rest).map_err(err)?;
                    if keyword == "pattern" {
                        acl.patterns.push(rule);
                    } else {
                        match &user {
                            Some(u) => acl.users.entry(u.clone()).or_default().push(rule),
                            None => acl.anonymous.push(rule),
                        }
                    }
                }
                other => {
                    return Err(err(format!(
                        "unknown keyword {other:?} (expected `topic`, `pattern` or `user`)"
                    )));
                }
            }
        }
        Ok(acl)
    }

    /// The rules that apply to one client: its user's `topic` lines (or the anonymous ones) and
    /// every `pattern` line with `%u` and `%c` substituted.
    ///
    /// As mosquitto does, a user name or client id holding `+` or `#` gets no access at all (it
    /// could otherwise widen a pattern), and a pattern whose `%u` or `%c` would be substituted
    /// by a value holding `/` (reaching into another user's levels) or that names the user of a
    /// client without one grants nothing; deny patterns still apply.
    pub fn for_client(&self, user: Option<&str>, client_id: &str) -> ClientAcl {
        let mut out = ClientAcl::default();
        let wild = |s: &str| s.contains(['+', '#']);
        if user.is_some_and(wild) || wild(client_id) {
            out.nothing = true;
            return out;
        }
        let own = match user {
            Some(u) => self.users.get(u).map(Vec::as_slice).unwrap_or_default(),
            None => &self.anonymous,
        };
        for r in own {
            out.add(r.access, r.topic.clone());
        }
        for r in &self.patterns {
            match substitute(&r.topic, user, client_id) {
                Some(t) => out.add(r.access, t),
                None if r.access == Access::Deny => {
                    // deny whatever any value could have put there
                    let widened = levels_of(&r.topic)
                        .map(|l| if l == "%u" || l == "%c" { "+" } else { l })
                        .collect::<Vec<_>>()
                        .join("/");
                    out.add(Access::Deny, widened.into());
                }
                None => {}
            }
        }
        out
    }
}

/// The first whitespace-separated word of `s` and the rest, trimmed.
fn split_word(s: &str) -> (&str, &str) {
    match s.split_once(char::is_whitespace) {
        Some((w, rest)) => (w, rest.trim()),
        None => (s, ""),
    }
}

fn parse_rule(rest: &str) -> Result<Rule, String> {
    let (first, after) = split_word(rest);
    let (access, topic) = match Access::parse(first) {
        Some(a) if !after.is_empty() => (a, after),
        Some(_) => return Err(format!("missing topic after {first:?}")),
        None if rest.is_empty() => return Err("missing topic".into()),
        None if !after.is_empty() => {
            return Err(format!(
                "{first:?} is not an access word (read, write, readwrite or deny); a topic with spaces needs one before it"
            ));
        }
        None => (Access::ReadWrite, first),
    };
    if !topic::valid_filter(topic) {
        return Err(format!(
            "{topic:?} is not a valid topic or filter (`+` and `#` must be whole levels, `#` the last)"
        ));
    }
    Ok(Rule {
        access,
        topic: topic.into(),
    })
}

fn levels_of(s: &str) -> std::str::Split<'_, char> {
    s.split('/')
}

/// `pattern` with whole `%u` / `%c` levels replaced; `None` when a value is missing or unsafe.
fn substitute(pattern: &str, user: Option<&str>, client_id: &str) -> Option<Box<str>> {
    if !pattern.contains('%') {
        return Some(pattern.into());
    }
    let mut out = String::with_capacity(pattern.len() + 16);
    for (i, level) in levels_of(pattern).enumerate() {
        if i > 0 {
            out.push('/');
        }
        let value = match level {
            "%u" => user?,
            "%c" => client_id,
            l => {
                out.push_str(l);
                continue;
            }
        };
        if value.contains('/') {
            return None;
        }
        out.push_str(value);
    }
    Some(out.into())
}

/// The ACL rules of one client, resolved for its user name and client id.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ClientAcl {
    /// Denied everything (a user name or client id holding a wildcard).
    nothing: bool,
    deny: Vec<Box<str>>,
    read: Vec<Box<str>>,
    write: Vec<Box<str>>,
}

impl ClientAcl {
    /// Read and write on each of `filters` and nothing else: the topics a verified token names
    /// (JWT claim `topics`). The gate applies it on top of the ACL file, both having to allow.
    /// An entry that is not a valid filter grants nothing; an empty list grants nothing at all.
    pub fn only<S: AsRef<str>>(filters: &[S]) -> ClientAcl {
        let mut out = ClientAcl::default();
        for f in filters {
            let f = f.as_ref();
            if topic::valid_filter(f) {
                out.add(Access::ReadWrite, f.into());
            }
        }
        out
    }

    fn add(&mut self, access: Access, topic: Box<str>) {
        if access == Access::Deny {
            self.deny.push(topic);
            return;
        }
        if access.reads() {
            self.read.push(topic.clone());
        }
        if access.writes() {
            self.write.push(topic);
        }
    }

    /// Whether a SUBSCRIBE to `filter` (a valid filter) is granted: a read rule covers every
    /// topic it can match and no deny rule matches any of them.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        !self.nothing
            && !self.deny.iter().any(|d| overlaps(d, filter))
            && self.read.iter().any(|r| covers(r, filter))
    }

    /// Whether a PUBLISH to `topic_name` (a valid topic name) is allowed: a write rule matches it
    /// and no deny rule does.
    pub fn may_publish(&self, topic_name: &str) -> bool {
        !self.nothing
            && !self.deny.iter().any(|d| topic::matches(d, topic_name))
            && self.write.iter().any(|w| topic::matches(w, topic_name))
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::ReadWrite => "readwrite",
            Access::Deny => "deny",
        })
    }
}

/// Whether every topic `filter` matches is also matched by `rule` (both valid filters).
pub fn covers(rule: &str, filter: &str) -> bool {
    // a rule starting with a wildcard does not reach `$` topics; a filter whose first level is a
    // literal `$…` only matches those
    if rule.starts_with(['+', '#']) && filter.starts_with('$') {
        return false;
    }
    let mut r = levels_of(rule);
    let mut f = levels_of(filter);
    loop {
        match (r.next(), f.next()) {
            (Some("#"), _) => return true,
            (None, None) => return true,
            // "a/#" also matches "a": only a rule with the same `#` covers that
            (None, Some(_)) | (Some(_), None) => return false,
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(_), Some("+")) => return false,
            (Some(a), Some(b)) if a == b => {}
            (Some(_), Some(_)) => return false,
        }
    }
}

/// Whether some topic may be matched by both filters (`$` topics are not told apart: a deny
/// rule `#` is taken to overlap `$SYS/#`, which errs on the side of refusing).
pub fn overlaps(a: &str, b: &str) -> bool {
    let mut x = levels_of(a);
    let mut y = levels_of(b);
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            (None, Some(_)) | (Some(_), None) => {
                // "a" and "a/#" overlap on "a": handled by the arm above only when `#` comes
                // next on the longer side
                return false;
            }
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(p), Some(q)) if p == q => {}
            (Some(_), Some(_)) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# anonymous clients
topic read public/#

user alice
topic readwrite rooms/#
topic deny rooms/secret
topic write alerts/+/high

user bob
topic rooms/lobby

pattern write users/%u/out
pattern read users/%u/in/#
pattern readwrite clients/%c/#
pattern deny users/%u/in/forbidden
";

    fn acl() -> Acl {
        Acl::parse(FILE, "acl").expect("parses")
    }

    #[test]
    fn parses_users_topics_and_patterns() {
        let a = acl();
        assert_eq!(a.anonymous.len(), 1);
        assert_eq!(a.users["alice"].len(), 3);
        assert_eq!(
            a.users["bob"],
            vec![Rule {
                access: Access::ReadWrite,
                topic: "rooms/lobby".into()
            }]
        );
        assert_eq!(a.patterns.len(), 4);
        assert_eq!(a.patterns[3].access, Access::Deny);
        // an access word lets a topic hold spaces
        let spaced = Acl::parse("topic read a b/c", "x").expect("parses");
        assert_eq!(&*spaced.anonymous[0].topic, "a b/c");
    }

    #[test]
    fn bad_lines_name_the_file_and_line() {
        let cases = [
            ("topic", "acl:1: missing topic"),
            ("\n\nuser", "acl:3: `user` needs a user name"),
            ("topic read", "acl:1: missing topic after \"read\""),
            ("topic reed a/#", "acl:1: \"reed\" is not an access word"),
            (
                "user x\ntopic read a/#/b",
                "acl:2: \"a/#/b\" is not a valid",
            ),
            ("# ok\nsubscribe a", "acl:2: unknown keyword \"subscribe\""),
        ];
        for (text, want) in cases {
            let e = Acl::parse(text, "acl").expect_err(text).to_string();
            assert!(e.starts_with(want), "{text:?}: {e}");
        }
        let missing = Acl::load("no/such/acl/file").expect_err("missing file");
        assert!(matches!(missing, AclError::Io { .. }));
    }

    #[test]
    fn subscriptions_need_a_covering_read_rule_and_no_deny() {
        let alice = acl().for_client(Some("alice"), "c1");
        assert!(
            !alice.may_subscribe("rooms/#"),
            "could receive rooms/secret, which is denied"
        );
        assert!(alice.may_subscribe("rooms/+/x"));
        assert!(alice.may_subscribe("rooms/lobby"));
        assert!(alice.may_subscribe("rooms"), "rooms/# also matches rooms");
        assert!(!alice.may_subscribe("#"), "wider than rooms/#");
        assert!(!alice.may_subscribe("+/lobby"));
        assert!(!alice.may_subscribe("rooms/secret"), "denied");
        assert!(
            !alice.may_subscribe("rooms/+"),
            "could receive rooms/secret, which is denied"
        );
        assert!(!alice.may_subscribe("alerts/x/high"), "write only");
        assert!(!alice.may_subscribe("public/news"), "anonymous rule");
        let anon = acl().for_client(None, "c2");
        assert!(anon.may_subscribe("public/news"));
        assert!(anon.may_subscribe("public/#"));
        assert!(!anon.may_subscribe("rooms/lobby"));
        assert!(!anon.may_subscribe("users/+/in/#"), "%u needs a user");
        let bob = acl().for_client(Some("bob"), "c3");
        assert!(bob.may_subscribe("rooms/lobby"));
        assert!(!bob.may_subscribe("rooms/#"));
        let carol = Acl::parse("user carol\ntopic read rooms/#", "x")
            .expect("parses")
            .for_client(Some("carol"), "c4");
        assert!(carol.may_subscribe("rooms/#"), "same filter as the rule");
        assert!(!carol.may_subscribe("#"), "wider than rooms/#");
    }

    #[test]
    fn publishes_need_a_matching_write_rule_and_no_deny() {
        let alice = acl().for_client(Some("alice"), "c1");
        assert!(alice.may_publish("rooms/lobby"));
        assert!(!alice.may_publish("rooms/secret"));
        assert!(alice.may_publish("alerts/disk/high"));
        assert!(!alice.may_publish("alerts/disk/low"));
        assert!(!alice.may_publish("public/news"));
        let nobody = acl().for_client(Some("mallory"), "c9");
        assert!(!nobody.may_publish("rooms/lobby"), "no rule, no access");
        assert!(
            nobody.may_publish("users/mallory/out"),
            "patterns apply to all"
        );
    }

    #[test]
    fn patterns_substitute_user_and_client_id() {
        let bob = acl().for_client(Some("bob"), "phone-1");
        assert!(bob.may_publish("users/bob/out"));
        assert!(!bob.may_publish("users/alice/out"));
        assert!(bob.may_subscribe("users/bob/in/x"));
        assert!(bob.may_subscribe("users/bob/in/x/#"));
        assert!(!bob.may_subscribe("users/alice/in/#"));
        assert!(!bob.may_subscribe("users/+/in/#"));
        assert!(
            !bob.may_subscribe("users/bob/in/+"),
            "pattern deny users/%u/in/forbidden"
        );
        assert!(bob.may_publish("clients/phone-1/state"));
        assert!(bob.may_subscribe("clients/phone-1/#"));
        assert!(!bob.may_publish("clients/phone-2/state"));
        // a client id for anonymous clients works as well
        let anon = acl().for_client(None, "kiosk");
        assert!(anon.may_publish("clients/kiosk/x"));
        assert!(!anon.may_publish("users/x/out"));
        // %u must be a whole level to be substituted
        let literal = Acl::parse("pattern read a%u/x", "x")
            .expect("parses")
            .for_client(Some("bob"), "c");
        assert!(literal.may_subscribe("a%u/x"));
        assert!(!literal.may_subscribe("abob/x"));
    }

    #[test]
    fn wildcards_or_slashes_in_names_grant_nothing() {
        let a = acl();
        for (user, client) in [(Some("a+"), "c"), (Some("#"), "c"), (Some("bob"), "c#")] {
            let c = a.for_client(user, client);
            assert!(!c.may_publish("users/bob/out"));
            assert!(!c.may_subscribe("clients/c/#"));
            assert!(!c.may_publish("$SYS/x"));
        }
        let slashed = a.for_client(Some("alice/in"), "c");
        assert!(!slashed.may_subscribe("users/alice/in/#"));
        assert!(!slashed.may_publish("users/alice/in/out"));
        // the deny pattern is widened rather than dropped
        assert!(!slashed.may_subscribe("users/+/in/forbidden"));
    }

    #[test]
    fn a_tokens_topics_grant_exactly_those_filters() {
        let t = ClientAcl::only(&["rooms/lobby/#", "users/ann/+", "bad/#/x"]);
        assert!(t.may_subscribe("rooms/lobby/#"));
        assert!(t.may_subscribe("rooms/lobby/x/y"));
        assert!(
            t.may_subscribe("rooms/lobby"),
            "rooms/lobby/# also matches rooms/lobby"
        );
        assert!(!t.may_subscribe("rooms/other/#"));
        assert!(!t.may_subscribe("rooms/#"), "wider than rooms/lobby/#");
        assert!(!t.may_subscribe("#"));
        assert!(t.may_publish("rooms/lobby/x"));
        assert!(!t.may_publish("rooms/other/x"));
        assert!(t.may_publish("users/ann/inbox"));
        assert!(!t.may_publish("users/ann/inbox/x"));
        assert!(t.may_subscribe("users/ann/+"));
        assert!(!t.may_subscribe("users/+/inbox"));
        // an invalid entry grants nothing, not even what it looks like
        assert!(!t.may_publish("bad/x/x"));
        assert!(!t.may_subscribe("bad/#"));
        // an empty list grants nothing
        let none = ClientAcl::only::<&str>(&[]);
        assert!(!none.may_publish("a"));
        assert!(!none.may_subscribe("a/#"));
    }

    #[test]
    fn covers_and_overlaps() {
        assert!(covers("#", "a/b"));
        assert!(covers("a/#", "a"));
        assert!(covers("a/#", "a/+/c"));
        assert!(covers("a/+", "a/b"));
        assert!(!covers("a/+", "a/#"));
        assert!(!covers("a/+", "a"));
        assert!(!covers("a", "a/#"));
        assert!(!covers("#", "$SYS/x"));
        assert!(covers("$SYS/#", "$SYS/x"));
        assert!(overlaps("a/+", "+/b"));
        assert!(overlaps("a/#", "a"));
        assert!(overlaps("a", "a/#"));
        assert!(!overlaps("a/b", "a/c"));
        assert!(!overlaps("a/b", "a"));
        assert!(!overlaps("a/+", "a"));
    }
}
