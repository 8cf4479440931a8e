//! What Linux tells about processes through /proc: a server's resident memory (for bytes per
//! idle connection), the CPU time the server and the generator use while measuring (which of
//! them is saturated, and the server's CPU per message), and this process's open-file limit (so
//! a large `connections` run warns before it fails).

use std::time::Duration;

/// Clock ticks per second of /proc/PID/stat times (`USER_HZ`, 100 on every Linux ABI in use).
const USER_HZ: u64 = 100;

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

/// CPU time (user + system, all threads) used so far by process `pid`, or by this process when
/// `pid` is `None`.
pub fn cpu_time(pid: Option<u32>) -> Option<Duration> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let ticks = stat_cpu_ticks(&std::fs::read_to_string(path).ok()?)?;
    Some(Duration::from_millis(ticks * 1000 / USER_HZ))
}

/// utime + stime from the text of /proc/PID/stat (fields 14 and 15; the command name in
/// parentheses may itself hold spaces and parentheses, so fields are counted after the last `)`).
fn stat_cpu_ticks(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// CPU time of the server (`--pid`) and of the generator over the measured span.
#[derive(Debug, Clone, Copy)]
pub struct CpuMeter {
    pid: Option<u32>,
    server: Option<Duration>,
    generator: Option<Duration>,
}

impl CpuMeter {
    /// Takes the starting readings.
    pub fn start(pid: Option<u32>) -> Self {
        Self {
            pid,
            server: pid.and_then(|p| cpu_time(Some(p))),
            generator: cpu_time(None),
        }
    }

    /// CPU used since [`CpuMeter::start`] by (server, generator).
    pub fn used(&self) -> (Option<Duration>, Option<Duration>) {
        let since =
            |start: Option<Duration>, now: Option<Duration>| Some(now?.saturating_sub(start?));
        (
            since(self.server, self.pid.and_then(|p| cpu_time(Some(p)))),
            since(self.generator, cpu_time(None)),
        )
    }
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
    fn parses_stat_cpu_times() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194304 100 0 1 0 250 50 0 0 20 0 1 0 1 1 1";
        assert_eq!(stat_cpu_ticks(stat), Some(300));
        assert_eq!(stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn measures_this_process() {
        let m = CpuMeter::start(Some(std::process::id()));
        let (server, generator) = m.used();
        assert!(server.is_some() && generator.is_some());
        assert!(cpu_time(Some(u32::MAX)).is_none());
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
