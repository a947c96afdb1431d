//! Process memory readings for honest reports: resident set size now and at its peak, from
//! `/proc/self/status` (Linux). Elsewhere every reading is `None`.

/// Current and peak resident set size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RssReading {
    /// `VmRSS`: resident now, bytes.
    pub rss: Option<u64>,
    /// `VmHWM`: peak resident since start or since the last [`reset_peak`], bytes.
    pub peak: Option<u64>,
}

fn field_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Reads `VmRSS` and `VmHWM`.
pub fn read() -> RssReading {
    match std::fs::read_to_string("/proc/self/status") {
        Ok(s) => RssReading {
            rss: field_kib(&s, "VmRSS:"),
            peak: field_kib(&s, "VmHWM:"),
        },
        Err(_) => RssReading::default(),
    }
}

/// Resets `VmHWM` to the current RSS (writes `5` to `/proc/self/clear_refs`), so the peak of
/// one phase can be measured in a long-lived process. Returns whether the kernel accepted it.
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Formats bytes as `123.4 MB (117.7 MiB)`; `n/a` for `None`.
pub fn fmt_bytes(bytes: Option<u64>) -> String {
    match bytes {
        Some(b) => format!("{:.1} MB ({:.1} MiB)", b as f64 / 1e6, b as f64 / 1048576.0),
        None => "n/a".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_lines() {
        let s = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(field_kib(s, "VmRSS:"), Some(1024 * 1024));
        assert_eq!(field_kib(s, "VmHWM:"), Some(2048 * 1024));
        assert_eq!(field_kib(s, "VmSwap:"), None);
        if cfg!(target_os = "linux") {
            let r = read();
            assert!(r.rss.is_some() && r.peak >= r.rss);
        }
    }
}
