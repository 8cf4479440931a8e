//! The two Redis layouts of the gobase registry (docs/cluster.md, "The gobase layouts"), as one
//! small description ([`GobaseLayout`]) that the registry's scripts take as arguments: the same
//! scripts serve both, only the clock unit, the key names, the announcement words and the lock's
//! expiry differ.
//!
//! | | `gobase` (seed era, the default) | `gobase-seconds` (gobase today) |
//! |---|---|---|
//! | members | ZSET `<key>` | ZSET `<key>` |
//! | score | Redis `TIME` in ms | Redis `TIME` in seconds |
//! | live list | `_{<key>}_list_` | `<key>_list` |
//! | channel | `_{<key>}_channel_`: `reg <m…>`, `dereg <m…>`, `check` | `<key>`: `reg:<m>`, `quit:<m>`, `check:<uuid>` |
//! | checker lock | `_{<key>}_locker_`, `SET … PX 8000 NX` | `<key>_check`, `SET … EX 8` |
//! | checker period while holding | 1 s | 4 s |
//! | warren's node records | `_{<key>}_warren_nodes_` | `<key>_warren_nodes` |

use std::time::Duration;

/// Which gobase layout a registry key uses: `layout` in `[registry]`, or `?layout=` on the
/// registry URL. Both keep members `name&id&addr&port&scheme` in a ZSET named after the key and
/// count a member live for 8 s after its last refresh; they differ in the clock unit and the
/// names around it, so peers of one layout do not see peers of the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum GobaseLayout {
    /// `gobase`: the layout warren has always written (PROTOCOLS §10 of the wire contract):
    /// scores in milliseconds, `_{key}_list_`, `_{key}_channel_`, `_{key}_locker_`.
    #[default]
    Gobase,
    /// `gobase-seconds`: the layout gobase's `goredis` package writes today: scores in
    /// seconds, `<key>_list`, the channel `<key>`, the lock `<key>_check`.
    GobaseSeconds,
}

/// A member stays live this many seconds after its last refresh (gobase `RegExprieTime`).
pub(crate) const LIVE_S: u64 = 8;

/// The checker purges only scores within this factor of now (in the layout's unit): a score a
/// thousand times too small (seconds where milliseconds are expected) or too large is another
/// layout's, and is left alone.
pub(crate) const PLAUSIBLE_FACTOR: f64 = 30.0;

impl GobaseLayout {
    /// The names `layout` takes, the default first.
    pub const NAMES: [&'static str; 2] = ["gobase", "gobase-seconds"];

    /// The layout called `name` (see [`GobaseLayout::NAMES`]).
    pub fn from_name(name: &str) -> Option<GobaseLayout> {
        match name {
            "gobase" => Some(GobaseLayout::Gobase),
            "gobase-seconds" => Some(GobaseLayout::GobaseSeconds),
            _ => None,
        }
    }

    /// Its name in config.
    pub fn name(self) -> &'static str {
        match self {
            GobaseLayout::Gobase => "gobase",
            GobaseLayout::GobaseSeconds => "gobase-seconds",
        }
    }

    /// Score units per second (1000 or 1).
    pub fn per_second(self) -> u64 {
        match self {
            GobaseLayout::Gobase => 1000,
            GobaseLayout::GobaseSeconds => 1,
        }
    }

    /// The liveness window in score units.
    pub(crate) fn window(self) -> u64 {
        LIVE_S * self.per_second()
    }

    /// `SET` option and value that make the checker lock expire after the liveness window.
    pub(crate) fn lock_expiry(self) -> (&'static str, u64) {
        match self {
            GobaseLayout::Gobase => ("PX", LIVE_S * 1000),
            GobaseLayout::GobaseSeconds => ("EX", LIVE_S),
        }
    }

    /// How announcements are written: `words` (`reg <m1> <m2>`) or `colon` (`reg:<m1>..(1)`).
    pub(crate) fn style(self) -> &'static str {
        match self {
            GobaseLayout::Gobase => "words",
            GobaseLayout::GobaseSeconds => "colon",
        }
    }

    /// The word announcing a deregistration.
    pub(crate) fn dereg_word(self) -> &'static str {
        match self {
            GobaseLayout::Gobase => "dereg",
            GobaseLayout::GobaseSeconds => "quit",
        }
    }

    /// What the checker publishes when the live list changed.
    pub(crate) fn check_message(self, uuid: &str) -> String {
        match self {
            GobaseLayout::Gobase => "check".into(),
            GobaseLayout::GobaseSeconds => format!("check:{uuid}"),
        }
    }

    /// The checker's period while this process holds the lock (gobase: 1 s in the seed era, half
    /// the liveness window today).
    pub(crate) fn check_holding(self) -> Duration {
        match self {
            GobaseLayout::Gobase => Duration::from_secs(1),
            GobaseLayout::GobaseSeconds => Duration::from_secs(LIVE_S / 2),
        }
    }

    /// Whether `score` reads as a timestamp in this layout's unit, `now` being the server time
    /// in that unit: within [`PLAUSIBLE_FACTOR`] of now either way. `None` when it does;
    /// otherwise what it looks like, for the log.
    pub fn foreign_score(self, score: f64, now: f64) -> Option<&'static str> {
        if !score.is_finite() || score <= 0.0 {
            return Some("not a timestamp");
        }
        if score * PLAUSIBLE_FACTOR >= now && score <= now * PLAUSIBLE_FACTOR {
            return None;
        }
        let other = match self {
            GobaseLayout::Gobase => 0.001,
            GobaseLayout::GobaseSeconds => 1000.0,
        };
        let as_other = score / other;
        if as_other * PLAUSIBLE_FACTOR >= now && as_other <= now * PLAUSIBLE_FACTOR {
            Some(match self {
                GobaseLayout::Gobase => "a timestamp in seconds (layout gobase-seconds)",
                GobaseLayout::GobaseSeconds => "a timestamp in milliseconds (layout gobase)",
            })
        } else {
            Some("not a timestamp near now")
        }
    }
}

impl std::fmt::Display for GobaseLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for GobaseLayout {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        GobaseLayout::from_name(s).ok_or_else(|| {
            format!(
                "unknown gobase layout {s:?} (expected {})",
                GobaseLayout::NAMES.join(" or ")
            )
        })
    }
}

/// The Redis keys of one gobase registry `key` in one layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GobaseKeys {
    /// The ZSET of members (the key itself, in both layouts).
    pub zset: String,
    /// The live members, sorted and comma-joined (a change detector).
    pub list: String,
    /// Where changes are announced.
    pub channel: String,
    /// The checker election lock.
    pub locker: String,
    /// warren's node records by node id (not part of gobase).
    pub nodes: String,
}

impl GobaseKeys {
    /// The keys of the `gobase` layout (all share the `{key}` hash tag, so one slot).
    pub fn new(key: &str) -> GobaseKeys {
        GobaseKeys::for_layout(key, GobaseLayout::Gobase)
    }

    /// The keys `layout` derives from `key`.
    pub fn for_layout(key: &str, layout: GobaseLayout) -> GobaseKeys {
        match layout {
            GobaseLayout::Gobase => GobaseKeys {
                zset: key.to_owned(),
                list: format!("_{{{key}}}_list_"),
                channel: format!("_{{{key}}}_channel_"),
                locker: format!("_{{{key}}}_locker_"),
                nodes: format!("_{{{key}}}_warren_nodes_"),
            },
            GobaseLayout::GobaseSeconds => GobaseKeys {
                zset: key.to_owned(),
                list: format!("{key}_list"),
                channel: key.to_owned(),
                locker: format!("{key}_check"),
                nodes: format!("{key}_warren_nodes"),
            },
        }
    }
}

/// Take `layout=` out of a registry URL's query: the URL for the Redis client and the layout it
/// named, if any (an unknown name is an error).
pub fn split_layout(url: &str) -> Result<(String, Option<GobaseLayout>), String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), None));
    };
    let mut layout = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("layout", v)) => layout = Some(v.parse::<GobaseLayout>()?),
            _ => rest.push(pair),
        }
    }
    let url = if rest.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    Ok((url, layout))
}

/// Shared head of the scripts: the server time in the layout's unit.
/// ARGV[1]: units per second, ARGV[2]: the live window in units.
const PRELUDE: &str = r"
local per = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * per + tonumber(t[2]) * per / 1000000
end
local function live_list(zset, now)
  local live = redis.call('ZREVRANGEBYSCORE', zset, now, now - window)
  table.sort(live)
  return table.concat(live, ',')
end
local function announce(channel, style, word, members)
  local msg
  if style == 'words' then
    msg = word .. ' ' .. table.concat(members, ' ')
  else
    msg = word .. ':' .. members[1]
    if #members > 1 then msg = msg .. '..(' .. (#members - 1) .. ')' end
  end
  redis.call('PUBLISH', channel, msg)
end
";

/// Register one member: write the record (`HSET`, only when it changed), drop the member a
/// previous address produced, `ZADD` with server time; then, unless the member was live already
/// and its record unchanged, recompute the live list, store it and announce the member.
/// KEYS: zset, list, hash. ARGV: per, window, channel, style, member, node id, record JSON, old
/// member.
const REGISTER: &str = r"
redis.replicate_commands()
local now = server_now()
local changed = false
if redis.call('HGET', KEYS[3], ARGV[6]) ~= ARGV[7] then
  redis.call('HSET', KEYS[3], ARGV[6], ARGV[7])
  changed = true
end
if ARGV[8] ~= '' and ARGV[8] ~= ARGV[5] then
  if redis.call('ZREM', KEYS[1], ARGV[8]) == 1 then changed = true end
end
local score = redis.call('ZSCORE', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[1], now, ARGV[5])
if not changed and score and tonumber(score) >= now - window then
  return 0
end
redis.call('SET', KEYS[2], live_list(KEYS[1], now))
announce(ARGV[3], ARGV[4], 'reg', {ARGV[5]})
return 1
";

/// Deregister a node: remove every member of the node id (all `warren&<id>&…` members) and its
/// record; if one of them was live, recompute the list, store it and announce them.
/// KEYS: zset, list, hash. ARGV: per, window, channel, style, word, member prefix, node id.
const DEREGISTER: &str = r"
redis.replicate_commands()
local now = server_now()
redis.call('HDEL', KEYS[3], ARGV[7])
local gone = {}
local all = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #all, 2 do
  local m = all[i]
  if string.sub(m, 1, #ARGV[6]) == ARGV[6] then
    redis.call('ZREM', KEYS[1], m)
    if tonumber(all[i + 1]) >= now - window then
      table.insert(gone, m)
    end
  end
end
if #gone == 0 then
  return 0
end
redis.call('SET', KEYS[2], live_list(KEYS[1], now))
announce(ARGV[3], ARGV[4], ARGV[5], gone)
return 1
";

/// The checker: take the lock if free (`SET NX` with the layout's expiry), go on only while
/// holding it (and refresh it); recompute the live list; if it changed, store it and announce the
/// check; then purge the stale members it can read, and the records of warren nodes with no
/// member left. gobase purges only when the list changed; warren purges on every check it
/// holds the lock for, so a member that was not yet past the purge bound when it left the list
/// is not left behind until the next change. A stale member is purged only when its score is a timestamp in the layout's unit
/// (within a factor ARGV[8] of now either way) and the member has the
/// `name&id&addr&port&scheme` shape; the others are left alone and returned (at most ARGV[9]
/// of them, with the ones scored far in the future) so the caller can log them.
/// Returns `{status, now, member, score, …}`: status 0 (not holding), 1 (list unchanged) or 2
/// (list changed).
/// KEYS: zset, list, lock, hash. ARGV: per, window, channel, uuid, lock option, lock expiry,
/// check message, factor, report limit.
const CHECK: &str = r"
redis.replicate_commands()
redis.call('SET', KEYS[3], ARGV[4], ARGV[5], ARGV[6], 'NX')
if redis.call('GET', KEYS[3]) ~= ARGV[4] then
  return {'0'}
end
if ARGV[5] == 'EX' then
  redis.call('EXPIRE', KEYS[3], ARGV[6])
else
  redis.call('PEXPIRE', KEYS[3], ARGV[6])
end
local now = server_now()
local list = live_list(KEYS[1], now)
local changed = (redis.call('GET', KEYS[2]) or '') ~= list
if changed then
  redis.call('SET', KEYS[2], list)
  redis.call('PUBLISH', ARGV[3], ARGV[7])
end
local factor = tonumber(ARGV[8])
local limit = tonumber(ARGV[9])
local left = {changed and '2' or '1', tostring(now)}
local purged = 0
local function leave(m, s)
  if #left < 2 + 2 * limit then
    table.insert(left, m)
    table.insert(left, s)
  end
end
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], 0, now - window - 1, 'WITHSCORES')
for i = 1, #stale, 2 do
  local m, s = stale[i], stale[i + 1]
  local port = string.match(m, '^[^&]*&[^&]*&[^&]*&([0-9]+)&')
  if tonumber(s) * factor >= now and port and tonumber(port) <= 65535 then
    redis.call('ZREM', KEYS[1], m)
    purged = purged + 1
  else
    leave(m, s)
  end
end
local future = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. (now * factor), '+inf', 'WITHSCORES', 'LIMIT', 0, limit)
for i = 1, #future, 2 do
  leave(future[i], future[i + 1])
end
if not changed and purged == 0 then
  return left
end
local ids = {}
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local id = string.match(m, '^warren&([^&]*)&')
  if id then ids[id] = true end
end
for _, f in ipairs(redis.call('HKEYS', KEYS[4])) do
  if not ids[f] then redis.call('HDEL', KEYS[4], f) end
end
return left
";

/// The live members at server time, or at ARGV[3] (in the layout's unit) when given (to check
/// the bound). KEYS: zset. ARGV: per, window, optional now.
const READ: &str = r"
local now
if ARGV[3] and ARGV[3] ~= '' then
  now = tonumber(ARGV[3])
else
  now = server_now()
end
return redis.call('ZREVRANGEBYSCORE', KEYS[1], now, now - window)
";

/// The registry's four scripts, each the prelude followed by its body.
pub(crate) struct Scripts {
    pub(crate) register: redis::Script,
    pub(crate) deregister: redis::Script,
    pub(crate) check: redis::Script,
    pub(crate) read: redis::Script,
}

impl Scripts {
    pub(crate) fn new() -> Scripts {
        let s = |body: &str| redis::Script::new(&format!("{PRELUDE}{body}"));
        Scripts {
            register: s(REGISTER),
            deregister: s(DEREGISTER),
            check: s(CHECK),
            read: s(READ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_each_layout() {
        let k = GobaseKeys::new("test-service");
        assert_eq!(
            [&k.zset, &k.list, &k.channel, &k.locker, &k.nodes],
            [
                "test-service",
                "_{test-service}_list_",
                "_{test-service}_channel_",
                "_{test-service}_locker_",
                "_{test-service}_warren_nodes_"
            ]
        );
        let k = GobaseKeys::for_layout("test-service", GobaseLayout::GobaseSeconds);
        assert_eq!(
            [&k.zset, &k.list, &k.channel, &k.locker, &k.nodes],
            [
                "test-service",
                "test-service_list",
                "test-service",
                "test-service_check",
                "test-service_warren_nodes"
            ]
        );
    }

    #[test]
    fn names_parse_and_the_default_is_the_seed_layout() {
        assert_eq!(GobaseLayout::default(), GobaseLayout::Gobase);
        for name in GobaseLayout::NAMES {
            let l: GobaseLayout = name.parse().expect("known");
            assert_eq!(l.name(), name);
        }
        let e = "gobase2".parse::<GobaseLayout>().expect_err("unknown");
        assert!(e.contains("gobase-seconds"), "{e}");
    }

    #[test]
    fn the_url_query_names_the_layout() {
        assert_eq!(
            split_layout("redis://h:1/0").expect("plain"),
            ("redis://h:1/0".into(), None)
        );
        assert_eq!(
            split_layout("redis://h:1/0?layout=gobase-seconds").expect("layout"),
            ("redis://h:1/0".into(), Some(GobaseLayout::GobaseSeconds))
        );
        assert_eq!(
            split_layout("redis://h:1/0?protocol=resp3&layout=gobase").expect("both"),
            (
                "redis://h:1/0?protocol=resp3".into(),
                Some(GobaseLayout::Gobase)
            )
        );
        assert!(split_layout("redis://h:1/0?layout=nope").is_err());
    }

    #[test]
    fn a_score_in_the_other_unit_is_foreign() {
        let now_ms = 1_700_000_008_000.0;
        let now_s = now_ms / 1000.0;
        let ms = GobaseLayout::Gobase;
        let s = GobaseLayout::GobaseSeconds;
        // stale in its own unit, even long stale: still readable
        assert_eq!(ms.foreign_score(now_ms - 3_600_000.0, now_ms), None);
        assert_eq!(s.foreign_score(now_s - 3600.0, now_s), None);
        // a live seconds score next to the ms layout, and the reverse
        assert!(ms.foreign_score(now_s, now_ms).unwrap().contains("seconds"));
        assert!(
            s.foreign_score(now_ms, now_s)
                .unwrap()
                .contains("milliseconds")
        );
        // garbage
        assert_eq!(ms.foreign_score(0.0, now_ms), Some("not a timestamp"));
        assert_eq!(
            ms.foreign_score(5.0, now_ms),
            Some("not a timestamp near now")
        );
    }
}
