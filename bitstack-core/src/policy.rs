//! Following the memory a device has: where "available memory" readings come from, and how a
//! budget is chosen from them without thrashing.
//!
//! A [`MemorySource`] reports the bytes this process could use *in total* for the model right
//! now. [`MemoryPolicy`] turns successive readings into budgets: it keeps `headroom` free,
//! clamps to the stack's `[minimum, full]` range, and only moves when the target moved by more
//! than `hysteresis` (shrinks are applied at once when the current budget no longer fits, since
//! running out of memory is worse than a resize).

use crate::budget::MemoryBudget;
use std::fmt;
use std::path::PathBuf;

/// A reading of memory available to the model (bytes), or why there is none.
pub type Reading = std::result::Result<u64, String>;

/// Where memory readings come from.
pub trait MemorySource: Send + Sync + fmt::Debug {
    /// Bytes the model may hold now, counting what it already holds (`held`).
    fn available(&self, held: u64) -> Reading;
}

/// A fixed budget.
#[derive(Clone, Copy, Debug)]
pub struct FixedSource(pub MemoryBudget);

impl MemorySource for FixedSource {
    fn available(&self, _held: u64) -> Reading {
        Ok(self.0.bytes())
    }
}

/// Linux `/proc/meminfo` `MemAvailable`: what the kernel says could be allocated without
/// swapping; the model may use that plus what it already holds.
#[derive(Clone, Debug)]
pub struct MemInfoSource {
    /// Path of the meminfo file (default `/proc/meminfo`).
    pub path: PathBuf,
}

impl Default for MemInfoSource {
    fn default() -> Self {
        Self {
            path: "/proc/meminfo".into(),
        }
    }
}

/// Parses `MemAvailable:  123456 kB` out of a meminfo text.
pub fn parse_meminfo_available(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut it = line.split_whitespace().skip(1);
    let n: u64 = it.next()?.parse().ok()?;
    match it.next() {
        Some("kB") | None => n.checked_mul(1024),
        _ => None,
    }
}

impl MemorySource for MemInfoSource {
    fn available(&self, held: u64) -> Reading {
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        let avail = parse_meminfo_available(&text)
            .ok_or_else(|| format!("{}: no MemAvailable line", self.path.display()))?;
        Ok(avail.saturating_add(held))
    }
}

/// cgroup v2 limit of this process: `memory.max − memory.current` of its cgroup, plus what the
/// model already holds. Unset limits (`max`) are reported as an error so a chain can fall back.
#[derive(Clone, Debug)]
pub struct CgroupSource {
    /// The cgroup directory, e.g. `/sys/fs/cgroup/user.slice/...`.
    pub dir: PathBuf,
}

impl CgroupSource {
    /// The cgroup of this process from `/proc/self/cgroup` (v2 unified hierarchy only).
    pub fn current() -> std::result::Result<Self, String> {
        let text = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        let rel = text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or("no cgroup v2 entry in /proc/self/cgroup")?;
        Ok(Self {
            dir: PathBuf::from("/sys/fs/cgroup").join(rel.trim_start_matches('/')),
        })
    }
}

impl MemorySource for CgroupSource {
    fn available(&self, held: u64) -> Reading {
        let read = |f: &str| {
            std::fs::read_to_string(self.dir.join(f))
                .map(|s| s.trim().to_string())
                .map_err(|e| format!("{}: {e}", self.dir.join(f).display()))
        };
        let max = read("memory.max")?;
        if max == "max" {
            return Err("cgroup memory.max is unlimited".into());
        }
        let max: u64 = max.parse().map_err(|_| format!("bad memory.max {max:?}"))?;
        let cur: u64 = read("memory.current")?
            .parse()
            .map_err(|_| "bad memory.current".to_string())?;
        Ok(max.saturating_sub(cur).saturating_add(held))
    }
}

/// A file a host application (or a test) writes a budget into, e.g. `300MB`; re-read on every
/// poll. The written value is the total the model may hold.
#[derive(Clone, Debug)]
pub struct FileSource {
    /// The file to read.
    pub path: PathBuf,
}

impl MemorySource for FileSource {
    fn available(&self, _held: u64) -> Reading {
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        text.trim()
            .parse::<MemoryBudget>()
            .map(|b| b.bytes())
            .map_err(|e| e.to_string())
    }
}

/// Tries each source in turn; the first reading wins. Failures are collected so the caller can
/// log why it fell back.
#[derive(Debug)]
pub struct FallbackChain(pub Vec<Box<dyn MemorySource>>);

/// One poll of a [`FallbackChain`], with which member answered: what a server logs when its
/// source changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainProbe {
    /// The index and reading of the first member that answered (`None`: none did).
    pub answer: Option<(usize, u64)>,
    /// Why each member tried before it (all of them, when none answered) failed, as
    /// `(index, reason)`.
    pub failures: Vec<(usize, String)>,
}

impl FallbackChain {
    /// Polls the members in order until one answers.
    pub fn probe(&self, held: u64) -> ChainProbe {
        let mut failures = Vec::new();
        for (i, s) in self.0.iter().enumerate() {
            match s.available(held) {
                Ok(v) => {
                    return ChainProbe {
                        answer: Some((i, v)),
                        failures,
                    }
                }
                Err(e) => failures.push((i, e)),
            }
        }
        ChainProbe {
            answer: None,
            failures,
        }
    }
}

impl MemorySource for FallbackChain {
    fn available(&self, held: u64) -> Reading {
        let p = self.probe(held);
        match p.answer {
            Some((_, v)) => Ok(v),
            None => {
                let why: Vec<String> = p.failures.into_iter().map(|(_, e)| e).collect();
                Err(format!("no memory source answered: {}", why.join("; ")))
            }
        }
    }
}

/// Parameters of [`MemoryPolicy`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PolicyParams {
    /// Fraction of the reading left free (e.g. 0.1 keeps 10 % for everything else).
    pub headroom_fraction: f64,
    /// Bytes always left free on top of the fraction.
    pub headroom_bytes: u64,
    /// A new target must differ from the current budget by more than this to cause a grow.
    pub hysteresis_bytes: u64,
}

impl Default for PolicyParams {
    fn default() -> Self {
        Self {
            headroom_fraction: 0.05,
            headroom_bytes: 0,
            hysteresis_bytes: 4_000_000,
        }
    }
}

/// Turns readings into budgets; see the module docs.
#[derive(Clone, Debug)]
pub struct MemoryPolicy {
    params: PolicyParams,
    minimum: u64,
    full: u64,
    current: Option<u64>,
}

/// What the policy decided for one reading.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Resize to this budget.
    Resize(MemoryBudget),
    /// Stay as is.
    Keep,
    /// The reading failed; stay as is (the reason should be logged).
    NoReading(String),
}

impl MemoryPolicy {
    /// A policy for a model whose sizes range over `[minimum, full]` bytes.
    pub fn new(params: PolicyParams, minimum: u64, full: u64) -> Self {
        Self {
            params,
            minimum,
            full: full.max(minimum),
            current: None,
        }
    }
    /// The budget last decided.
    pub fn current(&self) -> Option<u64> {
        self.current
    }
    /// Target budget for an availability reading, before hysteresis.
    pub fn target(&self, available: u64) -> u64 {
        let keep =
            (available as f64 * self.params.headroom_fraction) as u64 + self.params.headroom_bytes;
        available
            .saturating_sub(keep)
            .clamp(self.minimum, self.full)
    }
    /// Feeds one reading; returns what to do.
    pub fn decide(&mut self, reading: Reading) -> Decision {
        let available = match reading {
            Ok(v) => v,
            Err(e) => return Decision::NoReading(e),
        };
        let target = self.target(available);
        let change = match self.current {
            None => true,
            // Shrink whenever the current budget exceeds the target: pressure wins.
            Some(cur) if target < cur => true,
            Some(cur) => target - cur > self.params.hysteresis_bytes,
        };
        if change && Some(target) != self.current {
            self.current = Some(target);
            Decision::Resize(MemoryBudget::from_bytes(target))
        } else {
            Decision::Keep
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_parse() {
        let t = "MemTotal: 100 kB\nMemFree: 5 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(parse_meminfo_available(t), Some(2048 * 1024));
        assert_eq!(parse_meminfo_available("MemTotal: 1 kB"), None);
        assert_eq!(parse_meminfo_available("MemAvailable: x kB"), None);
    }

    #[test]
    fn hysteresis_and_clamping() {
        let p = PolicyParams {
            headroom_fraction: 0.0,
            headroom_bytes: 0,
            hysteresis_bytes: 10,
        };
        let mut pol = MemoryPolicy::new(p, 100, 1000);
        assert_eq!(
            pol.decide(Ok(500)),
            Decision::Resize(MemoryBudget::from_bytes(500))
        );
        assert_eq!(pol.decide(Ok(505)), Decision::Keep); // jitter up: ignored
        assert_eq!(
            pol.decide(Ok(499)),
            Decision::Resize(MemoryBudget::from_bytes(499))
        ); // any shrink applies
        assert_eq!(
            pol.decide(Ok(5000)),
            Decision::Resize(MemoryBudget::from_bytes(1000))
        );
        assert_eq!(
            pol.decide(Ok(1)),
            Decision::Resize(MemoryBudget::from_bytes(100))
        );
        assert!(matches!(
            pol.decide(Err("x".into())),
            Decision::NoReading(_)
        ));
        assert_eq!(pol.current(), Some(100));
    }

    #[test]
    fn sources_fail_softly() {
        let dir = std::env::temp_dir().join(format!("bitstack-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("budget");
        let file = FileSource { path: f.clone() };
        assert!(file.available(0).is_err());
        std::fs::write(&f, "120MB\n").unwrap();
        assert_eq!(file.available(0), Ok(120_000_000));
        std::fs::write(&f, "lots").unwrap();
        assert!(file.available(0).is_err());
        let chain = FallbackChain(vec![
            Box::new(MemInfoSource {
                path: dir.join("nope"),
            }),
            Box::new(FixedSource(MemoryBudget::from_bytes(7))),
        ]);
        assert_eq!(chain.available(0), Ok(7));
        let p = chain.probe(0);
        assert_eq!(p.answer, Some((1, 7)));
        assert_eq!(p.failures.len(), 1);
        assert_eq!(p.failures[0].0, 0);
        assert!(p.failures[0].1.contains("nope"), "{:?}", p.failures);
        let none = FallbackChain(vec![Box::new(MemInfoSource {
            path: dir.join("nope"),
        })]);
        assert_eq!(none.probe(0).answer, None);
        assert!(none
            .available(0)
            .unwrap_err()
            .starts_with("no memory source answered"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
