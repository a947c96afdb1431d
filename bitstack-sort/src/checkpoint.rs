//! Resumable sorts: a small text checkpoint written atomically after each finished level.
//!
//! Format (UTF-8 lines; scores as the hex of their `f64` bits so resume is bit-exact):
//! ```text
//! bitstack-sort checkpoint v1
//! fingerprint 1f2e3d4c5b6a7988
//! weights 3
//! level 1 3ff0000000000000 4000000000000000 -
//! checksum 0123456789abcdef
//! ```
//! `-` marks a weight without that level. The checksum (FNV-1a over every byte before the
//! `checksum` line) catches truncation and edits; the fingerprint ties the file to one problem.

use crate::error::{Result, SortError};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

const HEADER: &str = "bitstack-sort checkpoint v1";

/// FNV-1a, 64 bit: tiny, dependency-free and stable across Rust versions (unlike `Hasher`).
pub(crate) fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Fingerprint of a sort problem: method, per-weight level counts and the caller's key.
pub(crate) fn fingerprint(method: &str, levels: &[u16], problem_key: &str) -> u64 {
    let mut h = fnv1a(method.as_bytes(), FNV_OFFSET);
    h = fnv1a(&[0xff], h);
    for l in levels {
        h = fnv1a(&l.to_le_bytes(), h);
    }
    h = fnv1a(&[0xff], h);
    fnv1a(problem_key.as_bytes(), h)
}

/// Scores of one finished level: per weight, `None` when the weight has no such level.
pub(crate) type LevelScores = Vec<Option<f64>>;

/// Loads the finished levels (levels `1..=n`, in order) of `path`, or `None` if it does not
/// exist.
pub(crate) fn load(
    path: &Path,
    expected: u64,
    num_weights: usize,
) -> Result<Option<Vec<LevelScores>>> {
    let text = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SortError::CheckpointIo {
                path: path.to_owned(),
                source,
            })
        }
    };
    let corrupt = |reason: String| SortError::CheckpointCorrupt {
        path: path.to_owned(),
        reason,
    };
    let text = String::from_utf8(text).map_err(|_| corrupt("not UTF-8".into()))?;
    let body_end = text
        .rfind("checksum ")
        .ok_or_else(|| corrupt("no checksum line (truncated?)".into()))?;
    let (body, tail) = text.split_at(body_end);
    let stored = tail
        .trim_end()
        .strip_prefix("checksum ")
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .ok_or_else(|| corrupt("malformed checksum line".into()))?;
    if fnv1a(body.as_bytes(), FNV_OFFSET) != stored {
        return Err(corrupt("checksum mismatch (truncated or edited)".into()));
    }
    let mut lines = body.lines();
    if lines.next() != Some(HEADER) {
        return Err(corrupt("not a bitstack-sort v1 checkpoint".into()));
    }
    let found = lines
        .next()
        .and_then(|l| l.strip_prefix("fingerprint "))
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .ok_or_else(|| corrupt("malformed fingerprint line".into()))?;
    if found != expected {
        return Err(SortError::CheckpointStale {
            path: path.to_owned(),
            expected,
            found,
        });
    }
    let weights = lines
        .next()
        .and_then(|l| l.strip_prefix("weights "))
        .and_then(|n| n.parse::<usize>().ok())
        .ok_or_else(|| corrupt("malformed weights line".into()))?;
    if weights != num_weights {
        return Err(corrupt(format!(
            "{weights} weights, the problem has {num_weights}"
        )));
    }
    let mut levels = Vec::new();
    for line in lines {
        let mut fields = line.split(' ');
        let (Some("level"), Some(level)) = (fields.next(), fields.next()) else {
            return Err(corrupt(format!("unexpected line {line:?}")));
        };
        if level.parse::<usize>().ok() != Some(levels.len() + 1) {
            return Err(corrupt(format!(
                "level {level} where {} was expected",
                levels.len() + 1
            )));
        }
        let scores = fields
            .map(|f| match f {
                "-" => Ok(None),
                h => u64::from_str_radix(h, 16)
                    .map(|b| Some(f64::from_bits(b)))
                    .map_err(|_| corrupt(format!("bad score {h:?}"))),
            })
            .collect::<Result<Vec<_>>>()?;
        if scores.len() != num_weights {
            return Err(corrupt(format!(
                "level {level} has {} scores for {num_weights} weights",
                scores.len()
            )));
        }
        levels.push(scores);
    }
    Ok(Some(levels))
}

/// Writes the finished levels atomically: a temporary file in the same directory, `fsync`,
/// `rename` over `path`, then `fsync` of the directory so the rename itself is durable. A
/// crash at any point leaves either the old or the new checkpoint, never a torn one.
pub(crate) fn save(path: &Path, fingerprint: u64, levels: &[LevelScores]) -> Result<()> {
    let num_weights = levels.first().map_or(0, Vec::len);
    let mut body = format!("{HEADER}\nfingerprint {fingerprint:016x}\nweights {num_weights}\n");
    for (i, scores) in levels.iter().enumerate() {
        body.push_str(&format!("level {}", i + 1));
        for s in scores {
            match s {
                Some(v) => body.push_str(&format!(" {:016x}", v.to_bits())),
                None => body.push_str(" -"),
            }
        }
        body.push('\n');
    }
    let checksum = fnv1a(body.as_bytes(), FNV_OFFSET);
    body.push_str(&format!("checksum {checksum:016x}\n"));

    let io = |source| SortError::CheckpointIo {
        path: path.to_owned(),
        source,
    };
    let tmp = temp_path(path);
    let mut file = fs::File::create(&tmp).map_err(io)?;
    file.write_all(body.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    fs::rename(&tmp, path).map_err(io)?;
    sync_parent(path);
    Ok(())
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Best effort: directories cannot be opened for syncing on every platform, and the data
/// itself is already durable; only the rename's durability depends on this.
fn sync_parent(path: &Path) {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Ok(dir) = fs::File::open(parent) {
        let _ = dir.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("bitstack-sort-ckpt-{name}-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn round_trip_is_bit_exact() {
        let p = tmpdir("rt").join("c.txt");
        let levels = vec![
            vec![Some(1.5), Some(f64::NAN), None],
            vec![Some(-0.0), Some(f64::INFINITY), None],
        ];
        save(&p, 42, &levels).unwrap();
        let back = load(&p, 42, 3).unwrap().unwrap();
        for (a, b) in levels.iter().flatten().zip(back.iter().flatten()) {
            assert_eq!(a.map(f64::to_bits), b.map(f64::to_bits));
        }
        assert!(!temp_path(&p).exists());
        assert!(load(&p.with_file_name("absent"), 42, 3).unwrap().is_none());
    }

    #[test]
    fn stale_and_corrupt_are_distinguished() {
        let p = tmpdir("bad").join("c.txt");
        save(&p, 7, &[vec![Some(1.0), Some(2.0)]]).unwrap();
        assert!(matches!(
            load(&p, 8, 2),
            Err(SortError::CheckpointStale {
                expected: 8,
                found: 7,
                ..
            })
        ));
        assert!(matches!(
            load(&p, 7, 3),
            Err(SortError::CheckpointCorrupt { .. })
        ));
        let text = fs::read_to_string(&p).unwrap();
        fs::write(&p, text.replace("level 1 3ff", "level 1 3fe")).unwrap();
        assert!(matches!(
            load(&p, 7, 2),
            Err(SortError::CheckpointCorrupt { .. })
        ));
        fs::write(&p, &text[..text.len() / 2]).unwrap();
        assert!(matches!(
            load(&p, 7, 2),
            Err(SortError::CheckpointCorrupt { .. })
        ));
    }

    #[test]
    fn fingerprint_depends_on_everything() {
        let f = fingerprint("average", &[2, 3], "m");
        assert_ne!(f, fingerprint("greedy", &[2, 3], "m"));
        assert_ne!(f, fingerprint("average", &[3, 2], "m"));
        assert_ne!(f, fingerprint("average", &[2, 3], "n"));
        assert_eq!(f, fingerprint("average", &[2, 3], "m"));
    }
}
