//! The password file: `user:<argon2 PHC hash>` lines, as `mosquitto_passwd` keeps them (with
//! argon2id instead of SHA-512), managed with `warren passwd FILE USER`.
//!
//! argon2 is slow and memory-hungry on purpose (about 19 MiB and tens of milliseconds per
//! verification with the default parameters), so verifications run on the blocking thread pool
//! and at most [`max_concurrent`] at a time: a flood of wrong passwords queues for a permit
//! instead of taking every blocking thread and all the memory. A client that waits longer than
//! [`PERMIT_WAIT`] for a permit is refused as [`AuthRefusal::Unavailable`]. A user name that is
//! not in the file costs the same verification (against a dummy hash), so response times do not
//! tell which users exist.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use futures_util::future::BoxFuture;
use ring::rand::SecureRandom;
use tokio::sync::Semaphore;

use super::{AuthHook, AuthRefusal, Credentials, Identity, Verdict};

/// Largest password file read (a file larger than this is refused at start).
pub const MAX_FILE_BYTES: u64 = 16 << 20;

/// How long a client waits for a verification slot before it is refused as unavailable.
pub const PERMIT_WAIT: Duration = Duration::from_secs(5);

/// Longest password verified (longer ones are refused without hashing).
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// How long a verified password is accepted again without argon2.
pub const VERIFIED_TTL: Duration = Duration::from_secs(600);

/// Most verified passwords remembered at once (when full, expired ones are dropped, and if none
/// was, new ones are not remembered until some expire).
pub const MAX_VERIFIED: usize = 65_536;

/// Largest argon2 memory cost (KiB) a hash in the file may ask for: 256 MiB. A verification
/// holds that much while it runs, once per slot.
pub const MAX_M_COST_KIB: u32 = 256 * 1024;

/// How many argon2 verifications may run at once: the number of CPUs, at most 4.
pub fn max_concurrent() -> usize {
    std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, 4)
}

/// Hash a password for the file: argon2id with the crate's default parameters and a random
/// salt, as a PHC string (`$argon2id$v=19$m=19456,t=2,p=1$…`).
pub fn hash_password(password: &[u8]) -> Result<String, String> {
    let mut raw = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut raw)
        .map_err(|_| "no system randomness for the salt".to_owned())?;
    let salt = SaltString::encode_b64(&raw).map_err(|e| format!("salt: {e}"))?;
    Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("hashing failed: {e}"))
}

/// Whether `password` matches a PHC hash string.
pub fn verify_password(password: &[u8], phc: &str) -> bool {
    verify_with_memory(password, phc, &mut Vec::new())
}

/// [`verify_password`] with argon2's memory area supplied by the caller (grown to the hash's
/// memory cost when smaller), so that it can be reused.
pub fn verify_with_memory(password: &[u8], phc: &str, memory: &mut Vec<Block>) -> bool {
    let Ok(h) = PasswordHash::new(phc) else {
        return false;
    };
    let (Some(expected), Some(salt)) = (h.hash, h.salt) else {
        return false;
    };
    let Ok(params) = Params::try_from(&h) else {
        return false;
    };
    if params.m_cost() > MAX_M_COST_KIB {
        return false;
    }
    let Ok(algorithm) = Algorithm::try_from(h.algorithm) else {
        return false;
    };
    let version = match h.version.map(Version::try_from) {
        None => Version::default(),
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let blocks = params.block_count();
    if memory.len() < blocks {
        memory.resize(blocks, Block::default());
    }
    let mut out = vec![0u8; expected.len()];
    Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password, salt, &mut out, &mut memory[..blocks])
        .is_ok()
        && constant_time_eq(&out, expected.as_bytes())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Passwords that verified recently, as HMACs under a key made at start (see the module
/// comment).
struct Verified {
    key: ring::hmac::Key,
    seen: Mutex<HashMap<[u8; 32], Instant>>,
}

impl Verified {
    fn new() -> Result<Self, String> {
        let key =
            ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &ring::rand::SystemRandom::new())
                .map_err(|_| "no system randomness for the verification cache key".to_owned())?;
        Ok(Verified {
            key,
            seen: Mutex::new(HashMap::new()),
        })
    }

    fn tag(&self, user: &str, password: &[u8], phc: &str) -> [u8; 32] {
        let mut ctx = ring::hmac::Context::with_key(&self.key);
        for part in [user.as_bytes(), password, phc.as_bytes()] {
            ctx.update(&(part.len() as u64).to_le_bytes());
            ctx.update(part);
        }
        let mut tag = [0u8; 32];
        tag.copy_from_slice(ctx.sign().as_ref());
        tag
    }

    fn contains(&self, tag: &[u8; 32]) -> bool {
        let seen = self.seen.lock();
        seen.get(tag).is_some_and(|at| at.elapsed() < VERIFIED_TTL)
    }

    fn insert(&self, tag: [u8; 32]) {
        let mut seen = self.seen.lock();
        if seen.len() >= MAX_VERIFIED {
            seen.retain(|_, at| at.elapsed() < VERIFIED_TTL);
            if seen.len() >= MAX_VERIFIED {
                return;
            }
        }
        seen.insert(tag, Instant::now());
    }
}

/// Whether a name may be stored in the file (not empty, no `:`, no line breaks or NUL).
pub fn valid_user_name(user: &str) -> bool {
    !user.is_empty() && !user.contains([':', '\n', '\r', '\0'])
}

/// The loaded password file: user → PHC hash.
pub struct PasswordFile {
    users: Arc<HashMap<String, String>>,
    /// Verified against for unknown users, so their refusal takes as long as a known user's.
    dummy: Arc<str>,
    permits: Arc<Semaphore>,
    /// argon2 memory areas, one per verification slot, reused.
    memory: Arc<Mutex<Vec<Vec<Block>>>>,
    verified: Arc<Verified>,
}

impl std::fmt::Debug for PasswordFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordFile")
            .field("users", &self.users.len())
            .finish_non_exhaustive()
    }
}

/// Parse the text of a password file. Blank lines and `#` comments are skipped; every other line
/// must be `user:hash` with a PHC hash; a user may appear once.
pub fn parse(text: &str) -> Result<HashMap<String, String>, String> {
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let n = i + 1;
        let Some((user, hash)) = line.split_once(':') else {
            return Err(format!("line {n}: expected user:hash"));
        };
        if !valid_user_name(user) {
            return Err(format!("line {n}: empty user name"));
        }
        let Ok(parsed) = PasswordHash::new(hash) else {
            return Err(format!(
                "line {n}: the hash of {user:?} is not a PHC string ($argon2id$…)"
            ));
        };
        if Params::try_from(&parsed).is_ok_and(|p| p.m_cost() > MAX_M_COST_KIB) {
            return Err(format!(
                "line {n}: the hash of {user:?} asks for more than {MAX_M_COST_KIB} KiB of memory"
            ));
        }
        if users.insert(user.to_owned(), hash.to_owned()).is_some() {
            return Err(format!("line {n}: user {user:?} appears twice"));
        }
    }
    Ok(users)
}

impl PasswordFile {
    /// Read and parse a password file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
        if meta.len() > MAX_FILE_BYTES {
            return Err(format!(
                "{} bytes is more than the {MAX_FILE_BYTES} allowed",
                meta.len()
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        Self::from_users(parse(&text)?)
    }

    /// A password file from parsed entries.
    pub fn from_users(users: HashMap<String, String>) -> Result<Self, String> {
        let dummy = hash_password(b"warren: no such user")?;
        Ok(PasswordFile {
            users: Arc::new(users),
            dummy: dummy.into(),
            permits: Arc::new(Semaphore::new(max_concurrent())),
            memory: Arc::new(Mutex::new(Vec::new())),
            verified: Arc::new(Verified::new()?),
        })
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether the file has no users.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Verify one user's password off the async threads, under the concurrency bound. `None`:
    /// the user is not in the file.
    pub async fn verify(&self, user: &str, password: &[u8]) -> Result<Option<bool>, AuthRefusal> {
        let known = self.users.get(user).cloned();
        if password.len() > MAX_PASSWORD_BYTES {
            return Ok(known.map(|_| false));
        }
        let tag = known
            .as_deref()
            .map(|phc| self.verified.tag(user, password, phc));
        if tag.as_ref().is_some_and(|t| self.verified.contains(t)) {
            metrics::counter!("warren_auth_verified_cache_hits_total").increment(1);
            return Ok(Some(true));
        }
        let permit =
            match tokio::time::timeout(PERMIT_WAIT, self.permits.clone().acquire_owned()).await {
                Ok(Ok(p)) => p,
                _ => {
                    metrics::counter!("warren_auth_busy_total").increment(1);
                    return Err(AuthRefusal::Unavailable);
                }
            };
        let phc: Arc<str> = match &known {
            Some(h) => h.as_str().into(),
            None => self.dummy.clone(),
        };
        let password = password.to_vec();
        let pool = self.memory.clone();
        let ok = tokio::task::spawn_blocking(move || {
            // the permit bounds how many areas exist: one per slot at most
            let mut memory = pool.lock().pop().unwrap_or_default();
            let ok = verify_with_memory(&password, &phc, &mut memory);
            pool.lock().push(memory);
            drop(permit);
            ok
        })
        .await
        .map_err(|_| AuthRefusal::Unavailable)?;
        if ok && let Some(tag) = tag {
            self.verified.insert(tag);
        }
        Ok(known.map(|_| ok))
    }
}

impl AuthHook for PasswordFile {
    fn check<'a>(&'a self, creds: &'a Credentials) -> BoxFuture<'a, Verdict> {
        Box::pin(async move {
            let Some(user) = creds.username.as_deref().filter(|u| !u.is_empty()) else {
                return Ok(None);
            };
            let password = creds.password.as_deref().unwrap_or_default();
            match self.verify(user, password).await? {
                None => Ok(None),
                Some(true) => Ok(Some(Identity::new(user))),
                Some(false) => Err(AuthRefusal::BadCredentials),
            }
        })
    }
}

/// Add or replace a user (`Some(password)`) or delete one (`None`) in a password file, keeping
/// every other line. The file is created with mode 0600 when missing, and replaced atomically
/// (written beside it, then renamed). Returns whether the user was in the file before.
pub fn update_file(path: &Path, user: &str, password: Option<&[u8]>) -> Result<bool, String> {
    if !valid_user_name(user) {
        return Err(format!(
            "user name {user:?} must not be empty or contain ':' or a line break"
        ));
    }
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let mut out = String::with_capacity(text.len() + 128);
    let mut found = false;
    let new_line = match password {
        Some(p) => Some(format!("{user}:{}", hash_password(p)?)),
        None => None,
    };
    for line in text.lines() {
        let is_user = line
            .split_once(':')
            .is_some_and(|(u, _)| u == user && !line.trim_start().starts_with('#'));
        if is_user {
            found = true;
            if let Some(l) = &new_line {
                out.push_str(l);
                out.push('\n');
            }
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !found && let Some(l) = &new_line {
        out.push_str(l);
        out.push('\n');
    }
    write_private(path, out.as_bytes())?;
    Ok(found)
}

/// Write a file readable by its owner only, replacing it atomically.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "passwd".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let result = (|| {
        let mut f = opts.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("{}: {e}", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn parse_accepts_hashes_and_rejects_bad_lines() {
        let h = hash_password(b"pw").expect("hash");
        let text = format!("# users\n\nalice:{h}\nbob:{h}\r\n");
        let users = parse(&text).expect("parse");
        assert_eq!(users.len(), 2);
        assert!(verify_password(b"pw", &users["alice"]));
        assert!(!verify_password(b"wrong", &users["bob"]));
        assert!(parse("alice").unwrap_err().contains("line 1"));
        assert!(parse("alice:plaintext").unwrap_err().contains("PHC"));
        assert!(parse(&format!(":{h}")).unwrap_err().contains("empty"));
        assert!(
            parse(&format!("a:{h}\na:{h}"))
                .unwrap_err()
                .contains("twice")
        );
    }

    #[test]
    fn hashes_made_elsewhere_verify_and_costly_ones_are_refused() {
        // made with the argon2 reference parameters of another tool: argon2id, m=65536, t=3
        let h = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(65536, 3, 1, None).expect("params"),
        )
        .hash_password(
            b"pw",
            &SaltString::encode_b64(b"0123456789abcdef").expect("salt"),
        )
        .expect("hash")
        .to_string();
        let mut memory = Vec::new();
        assert!(verify_with_memory(b"pw", &h, &mut memory));
        assert_eq!(memory.len(), 65536, "the area grows to the hash's cost");
        assert!(!verify_with_memory(b"pX", &h, &mut memory));
        let huge = "$argon2id$v=19$m=1048576,t=1,p=1$MDEyMzQ1Njc4OWFiY2RlZg$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        assert!(parse(&format!("a:{huge}")).unwrap_err().contains("memory"));
        assert!(!verify_with_memory(b"pw", huge, &mut Vec::new()));
    }

    #[tokio::test]
    async fn a_verified_password_is_accepted_again_without_a_slot() {
        let mut users = HashMap::new();
        users.insert("alice".to_owned(), hash_password(b"secret").expect("hash"));
        let mut f = PasswordFile::from_users(users).expect("file");
        assert_eq!(f.verify("alice", b"secret").await, Ok(Some(true)));
        // no verification slot left: only the memory of the success can answer now
        f.permits = Arc::new(Semaphore::new(0));
        assert_eq!(f.verify("alice", b"secret").await, Ok(Some(true)));
        assert_eq!(f.memory.lock().len(), 1, "one area, reused");
    }

    #[tokio::test]
    async fn verify_known_unknown_and_wrong() {
        let mut users = HashMap::new();
        users.insert("alice".to_owned(), hash_password(b"secret").expect("hash"));
        let f = PasswordFile::from_users(users).expect("file");
        let c = |u: &str, p: &str| Credentials {
            peer: "127.0.0.1:1".parse().expect("addr"),
            protocol: crate::session::Protocol::Mqtt,
            client_id: String::new(),
            username: Some(u.into()),
            password: Some(Bytes::copy_from_slice(p.as_bytes())),
        };
        assert_eq!(
            f.check(&c("alice", "secret")).await,
            Ok(Some(Identity::new("alice")))
        );
        assert_eq!(
            f.check(&c("alice", "nope")).await,
            Err(AuthRefusal::BadCredentials)
        );
        assert_eq!(f.check(&c("mallory", "secret")).await, Ok(None));
        let long = "x".repeat(MAX_PASSWORD_BYTES + 1);
        assert_eq!(
            f.check(&c("alice", &long)).await,
            Err(AuthRefusal::BadCredentials)
        );
    }

    #[test]
    fn update_file_adds_replaces_deletes_with_mode_0600() {
        let dir = std::env::temp_dir().join(format!("warren-passwd-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("passwd");
        assert!(!update_file(&path, "alice", Some(b"one")).expect("add"));
        assert!(!update_file(&path, "bob", Some(b"two")).expect("add"));
        assert!(update_file(&path, "alice", Some(b"three")).expect("replace"));
        let users = parse(&std::fs::read_to_string(&path).expect("read")).expect("parse");
        assert!(verify_password(b"three", &users["alice"]));
        assert!(verify_password(b"two", &users["bob"]));
        assert!(update_file(&path, "alice", None).expect("delete"));
        let users = parse(&std::fs::read_to_string(&path).expect("read")).expect("parse");
        assert!(!users.contains_key("alice"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(update_file(&path, "a:b", Some(b"x")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
