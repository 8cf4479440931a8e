//! The consistent-hash ring, compatible bit for bit with stathat/consistent v1.0.0 as the gobase
//! backend package uses it (docs/cluster.md, "Routing"), so Go peers and warren nodes pick the same
//! member for the same key.
//!
//! Each member owns 20 points: CRC32-IEEE of `decimal(i)` immediately followed by the member
//! (`"0game1"` … `"19game1"`). A key belongs to the first point strictly greater than its own CRC32,
//! wrapping around. When two points collide the later insertion wins, and removing either member
//! deletes that point — exactly as the Go map-based original behaves. Members are trimmed and
//! lowercased on entry and on lookup; the hashed key is used as given.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

/// Points per member (stathat's `NumberOfReplicas`).
pub const REPLICAS: usize = 20;

/// A consistent-hash ring over member names.
#[derive(Debug, Clone, Default)]
pub struct Ring {
    circle: BTreeMap<u32, Arc<str>>,
    members: Vec<Arc<str>>,
}

/// How a member name is compared: trimmed and lowercased.
pub fn normalize(member: &str) -> String {
    member.trim().to_lowercase()
}

fn point(member: &str, i: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(i.to_string().as_bytes());
    h.update(member.as_bytes());
    h.finalize()
}

impl Ring {
    /// An empty ring.
    pub fn new() -> Self {
        Ring::default()
    }

    /// A ring holding these members, added in order.
    pub fn with_members<'a>(members: impl IntoIterator<Item = &'a str>) -> Self {
        let mut r = Ring::new();
        for m in members {
            r.add(m);
        }
        r
    }

    /// Add a member (a no-op when it is there already).
    pub fn add(&mut self, member: &str) {
        let m: Arc<str> = normalize(member).into();
        if self.members.contains(&m) {
            return;
        }
        for i in 0..REPLICAS {
            self.circle.insert(point(&m, i), m.clone());
        }
        self.members.push(m);
    }

    /// Remove a member and its points.
    pub fn remove(&mut self, member: &str) {
        let m = normalize(member);
        let before = self.members.len();
        self.members.retain(|x| **x != *m);
        if self.members.len() == before {
            return;
        }
        for i in 0..REPLICAS {
            self.circle.remove(&point(&m, i));
        }
    }

    /// The member owning `key`, or `None` for an empty ring.
    pub fn get(&self, key: &str) -> Option<&str> {
        let h = crc32fast::hash(key.as_bytes());
        self.circle
            .range((Bound::Excluded(h), Bound::Unbounded))
            .next()
            .or_else(|| self.circle.iter().next())
            .map(|(_, m)| &**m)
    }

    /// The members, in insertion order (normalized).
    pub fn members(&self) -> impl Iterator<Item = &str> {
        self.members.iter().map(|m| &**m)
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the ring has no member.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_points_match_the_go_original() {
        assert_eq!(point("game1", 0), 0x146b_5a9e);
        assert_eq!(point("game1", 19), 0x11de_db6d);
        assert_eq!(crc32fast::hash(b"user1"), 0x8c51_8555);
    }

    #[test]
    fn stathat_vectors() {
        let mut r = Ring::with_members(["abcdefg", "hijklmn", "opqrstu"]);
        assert_eq!(r.get("ggg"), Some("abcdefg"));
        assert_eq!(r.get("hhh"), Some("opqrstu"));
        assert_eq!(r.get("iiiii"), Some("hijklmn"));
        r.remove("hijklmn");
        assert_eq!(r.get("iiiii"), Some("opqrstu"));

        let games = Ring::with_members(["game1", "game2", "game3"]);
        let want = [
            ("user1", "game2"),
            ("user2", "game3"),
            ("user3", "game2"),
            ("10001", "game1"),
            ("10002", "game2"),
            ("alice", "game2"),
            ("bob", "game1"),
        ];
        for (k, m) in want {
            assert_eq!(games.get(k), Some(m), "key {k}");
        }
        let mut two = games.clone();
        two.remove("game2");
        let want = [
            ("user1", "game1"),
            ("user2", "game3"),
            ("user3", "game1"),
            ("10001", "game1"),
            ("10002", "game3"),
            ("alice", "game1"),
            ("bob", "game1"),
        ];
        for (k, m) in want {
            assert_eq!(two.get(k), Some(m), "key {k} after game2 left");
        }
        let mixed = Ring::with_members([" Game1 ", "GAME2", "game3"]);
        for k in ["user1", "user2", "user3", "10001", "10002", "alice", "bob"] {
            assert_eq!(mixed.get(k), games.get(k), "key {k}");
        }
        assert_eq!(Ring::new().get("x"), None);
    }
}
