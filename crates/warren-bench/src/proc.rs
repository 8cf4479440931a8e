//! What Linux tells about processes through /proc: a server's resident memory (for bytes per
//! idle connection) and this process's open-file limit (so a large `connections` run warns
//! before it fails).

/// Resident set size of process `pid` in KiB (`VmRSS`), if it can be read.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_kib(&text, "VmRSS:")
}

/// Peak resident set size of process `pid` in KiB (`VmHWM`), if it can be read.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_kib(&text, "VmHWM:")
}

/// The soft limit on open files of this process, if it can be read.
pub fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    limits_soft(&text, "Max open files")
}

/// Parses a `Key:   1234 kB` line of /proc/PID/status.
fn status_kib(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// Parses the soft limit of a /proc/PID/limits row (`unlimited` reads as `u64::MAX`).
fn limits_soft(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    match line[name.len()..].split_whitespace().next()? {
        "unlimited" => Some(u64::MAX),
        n => n.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_limits() {
        let status = "Name:\twarren\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(10240));
        assert_eq!(status_kib(status, "VmHWM:"), Some(20480));
        assert_eq!(status_kib(status, "VmSwap:"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            20000                20000                files\n\
                      Max locked memory         unlimited            unlimited            bytes\n";
        assert_eq!(limits_soft(limits, "Max open files"), Some(20000));
        assert_eq!(limits_soft(limits, "Max locked memory"), Some(u64::MAX));
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(rss_kib(me).is_some_and(|k| k > 0));
        assert!(peak_rss_kib(me).is_some_and(|k| k > 0));
        assert!(open_files_limit().is_some_and(|n| n > 0));
        assert_eq!(rss_kib(u32::MAX), None);
    }
}
