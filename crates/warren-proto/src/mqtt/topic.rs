//! Topic names, topic filters and how they match (MQTT 3.1.1 §4.7).
//!
//! The decoder uses these rules to reject bad PUBLISH topics and subscription filters; the
//! gate's plain MQTT mode uses [`matches()`] to pick the subscribers of a message.

/// Longest topic or filter a two-byte length prefix can carry.
const MAX_LEN: usize = super::MAX_FIELD_LEN;

/// Whether `t` may be the topic of a PUBLISH: non-empty, at most 65 535 bytes, without `+`,
/// `#` or U+0000.
pub fn valid_topic_name(t: &str) -> bool {
    !t.is_empty() && t.len() <= MAX_LEN && !t.contains(['+', '#', '\0'])
}

/// Whether `f` may be a subscription filter: non-empty, at most 65 535 bytes, no U+0000,
/// `+` only as a whole level and `#` only as the whole last level.
pub fn valid_filter(f: &str) -> bool {
    if f.is_empty() || f.len() > MAX_LEN || f.contains('\0') {
        return false;
    }
    let mut levels = levels(f).peekable();
    while let Some(level) = levels.next() {
        let is_last = levels.peek().is_none();
        match level {
            "+" => {}
            "#" if is_last => {}
            _ if level.contains(['+', '#']) => return false,
            _ => {}
        }
    }
    true
}

/// Whether a message published on `topic` reaches a subscription to `filter`.
///
/// `+` matches exactly one level (possibly empty), `#` matches the rest including nothing, so
/// `sport/#` also matches `sport`. Topics starting with `$` are not matched by a filter that
/// starts with a wildcard. Both arguments are assumed valid; a `#` that is not the last level
/// of `filter` matches nothing.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut filter_levels = levels(filter).peekable();
    let mut topic_levels = levels(topic);
    while let Some(f) = filter_levels.next() {
        if f == "#" {
            return filter_levels.peek().is_none();
        }
        match topic_levels.next() {
            Some(t) if f == "+" || f == t => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

/// The `/`-separated levels of a topic or filter (`"a//b"` has three, the middle one empty).
pub fn levels(s: &str) -> std::str::Split<'_, char> {
    s.split('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        for ok in [
            "a",
            "/",
            "a/b",
            "a//b",
            "$SYS/x",
            "sport/tennis/player1",
            " ",
        ] {
            assert!(valid_topic_name(ok), "{ok:?}");
        }
        for bad in ["", "a/+", "#", "a/b#", "a\0b"] {
            assert!(!valid_topic_name(bad), "{bad:?}");
        }
        assert!(valid_topic_name(&"a".repeat(MAX_LEN)));
        assert!(!valid_topic_name(&"a".repeat(MAX_LEN + 1)));
    }

    #[test]
    fn filters() {
        for ok in [
            "#",
            "+",
            "+/+",
            "/+",
            "a/#",
            "a/+/c",
            "+/tennis/#",
            "a//b",
            "$SYS/#",
            "sport/",
        ] {
            assert!(valid_filter(ok), "{ok:?}");
        }
        for bad in ["", "a#", "a/#/b", "#/", "a+", "+a/b", "a/b+", "##", "a\0"] {
            assert!(!valid_filter(bad), "{bad:?}");
        }
    }

    #[test]
    fn matching_table() {
        let table: &[(&str, &str, bool)] = &[
            // Exact.
            ("a/b", "a/b", true),
            ("a/b", "a/c", false),
            ("a/b", "a/b/c", false),
            ("a/b/c", "a/b", false),
            // Multi-level wildcard.
            ("#", "a", true),
            ("#", "a/b/c", true),
            ("#", "/", true),
            ("sport/#", "sport", true),
            ("sport/#", "sport/", true),
            ("sport/#", "sport/tennis/player1", true),
            ("sport/tennis/#", "sport/tennis", true),
            ("sport/#", "sports", false),
            // Single-level wildcard.
            ("+", "a", true),
            ("+", "a/b", false),
            ("+", "/a", false),
            ("+/+", "/a", true),
            ("/+", "/a", true),
            ("a/+/c", "a/b/c", true),
            ("a/+/c", "a//c", true),
            ("a/+/c", "a/b/d", false),
            ("a/+/c", "a/b/c/d", false),
            ("sport/+", "sport", false),
            ("sport/+", "sport/", true),
            ("+/tennis/#", "sport/tennis/player1/ranking", true),
            ("+/+/#", "a/b", true),
            // Empty levels are levels.
            ("a//b", "a//b", true),
            ("a//b", "a/b", false),
            ("a/+/b", "a//b", true),
            ("a/#", "a//b", true),
            // `$` topics.
            ("#", "$SYS/uptime", false),
            ("+/uptime", "$SYS/uptime", false),
            ("$SYS/#", "$SYS/uptime", true),
            ("$SYS/+", "$SYS/uptime", true),
            ("$SYS/uptime", "$SYS/uptime", true),
            ("a/#", "a/$x", true),
            // Misplaced `#` never matches.
            ("a/#/b", "a/x/b", false),
        ];
        for &(filter, topic, expected) in table {
            assert_eq!(matches(filter, topic), expected, "{filter:?} vs {topic:?}");
        }
    }

    #[test]
    fn levels_split_on_slash() {
        assert_eq!(levels("a//b").collect::<Vec<_>>(), ["a", "", "b"]);
        assert_eq!(levels("/").collect::<Vec<_>>(), ["", ""]);
    }
}
