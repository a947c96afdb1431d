//! The `bitstack` CLI under bad input (issue 13): runs the built binary on every case of the
//! issue (outputs that name an input, links and devices as outputs, closed and full stdout,
//! unbounded counts, flags that do not apply, late validation, unclear errors) and on
//! generated corrupt stack files and GGUF models made from a tiny synthetic model (no
//! `../shared` needed).
//!
//! Every run is checked for: no panic (exit status 101 or "panicked" on stderr), no exit 0
//! without output, no changed input file (checksums before and after), the expected exit
//! status where the case has one, and the file's name in the error text of file errors. The
//! counts are printed at the end (`cargo test -p examples --test cli_robustness -- --nocapture`).

use bitstack_examples::gguf::{GgufValue, SyntheticGguf, SyntheticVocab};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The binary under test: this package's, or `BITSTACK_CLI_UNDER_TEST` (e.g. an older build,
/// to see the suite catch its faults).
fn bin() -> PathBuf {
    std::env::var_os("BITSTACK_CLI_UNDER_TEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_bitstack")))
}

/// A temporary folder removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("bitstack-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // BITSTACK_CLI_KEEP=1 keeps the files for a look by hand.
        if std::env::var_os("BITSTACK_CLI_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A deterministic xorshift generator (reproducible corruptions).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A one-layer Llama GGUF (hidden 16, 2 heads of 8, 1 KV head, FFN 32, context 64, F32
/// tensors) with a GPT-2 style byte-level vocabulary of single letters; `heads` other than 2
/// gives metadata inconsistent with the tensors.
fn tiny_gguf(heads: u32) -> Vec<u8> {
    let tiny = SyntheticGguf {
        n_layers: 1,
        hidden: 16,
        ffn: 32,
        n_heads: 2,
        n_kv_heads: 1,
        context: 64,
        vocab: SyntheticVocab::Letters,
        seed: 0x9E37_79B9_7F4A_7C15,
        embedding_scale: 0.25,
        norm_jitter: 0.0625,
        ..Default::default()
    };
    tiny.builder()
        .set_metadata("llama.attention.head_count", GgufValue::U32(heads))
        .build()
}

/// A text of the tiny vocabulary's letters.
fn tiny_text(words: usize, seed: u64) -> String {
    let mut rng = Rng(seed);
    let mut s = String::new();
    for i in 0..words {
        let len = 1 + rng.below(6);
        for _ in 0..len {
            s.push((b'a' + rng.below(26) as u8) as char);
        }
        s.push(if i % 13 == 12 { '.' } else { ' ' });
        if i % 40 == 39 {
            s.push('\n');
        }
    }
    s
}

fn checksum(path: &Path) -> Option<u64> {
    // FNV-1a over the bytes (with the file kind for links and devices).
    let meta = std::fs::symlink_metadata(path).ok()?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    };
    if meta.file_type().is_symlink() {
        eat(b"link:");
        eat(std::fs::read_link(path)
            .ok()?
            .as_os_str()
            .as_encoded_bytes());
    } else if meta.is_file() {
        eat(&std::fs::read(path).ok()?);
    } else {
        eat(format!("{:?}", meta.file_type()).as_bytes());
    }
    Some(h)
}

/// Where the command's stdout goes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Out {
    Capture,
    /// A pipe whose reading end is already closed (`| head` after it has read enough).
    ClosedPipe,
    /// `/dev/full`: every write fails with ENOSPC.
    Full,
}

/// What a case must do beyond the global rules.
#[derive(Clone, Debug)]
enum Expect {
    /// This exit status.
    Status(i32),
    /// Exit 1 or 2 (a file error) with the file's name on stderr.
    FileError(String),
    /// Anything but a panic or a silent success; a failure names the file (corrupt inputs).
    Robust(String),
}

struct Case {
    name: String,
    /// Send stderr to `/dev/full` (then only the exit status is checked for a panic).
    stderr_full: bool,
    args: Vec<OsString>,
    inputs: Vec<PathBuf>,
    out: Out,
    expect: Expect,
    /// Substrings stderr must contain.
    stderr_has: Vec<String>,
    /// Substrings neither stream may contain.
    never: Vec<String>,
}

impl Case {
    fn new(name: &str, args: &[&dyn AsRef<std::ffi::OsStr>], expect: Expect) -> Self {
        Self {
            name: name.to_owned(),
            stderr_full: false,
            args: args.iter().map(|a| a.as_ref().to_owned()).collect(),
            inputs: Vec::new(),
            out: Out::Capture,
            expect,
            stderr_has: Vec::new(),
            never: vec![
                "Fixed(".into(),
                "MemoryBudget(".into(),
                "FirstOrder {".into(),
                "RUST_BACKTRACE".into(),
            ],
        }
    }
    fn inputs(mut self, inputs: &[&Path]) -> Self {
        self.inputs = inputs.iter().map(|p| p.to_path_buf()).collect();
        self
    }
    fn stdout(mut self, out: Out) -> Self {
        self.out = out;
        self
    }
    fn stderr_has(mut self, s: &str) -> Self {
        self.stderr_has.push(s.to_owned());
        self
    }
    fn never(mut self, s: &str) -> Self {
        self.never.push(s.to_owned());
        self
    }
}

#[derive(Default)]
struct Tally {
    cases: usize,
    panics: usize,
    silent_successes: usize,
    inputs_changed: usize,
    hung: usize,
    failures: Vec<String>,
    /// Corrupt inputs that were rejected (exit 1 or 2) / accepted (exit 0 with output).
    rejected: usize,
    accepted: usize,
}

/// Seconds one run may take (the slowest real case, the base compress, takes well under one).
const CASE_TIMEOUT_S: u64 = 30;

struct RunResult {
    status: i32,
    stdout: String,
    stderr: String,
}

fn run(case: &Case, tally: &mut Tally) -> RunResult {
    let before: Vec<Option<u64>> = case.inputs.iter().map(|p| checksum(p)).collect();
    let mut cmd = Command::new(bin());
    cmd.args(&case.args).stdin(Stdio::null());
    if case.stderr_full {
        cmd.stderr(
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .unwrap(),
        );
    } else {
        cmd.stderr(Stdio::piped());
    }
    match case.out {
        Out::Capture => {
            cmd.stdout(Stdio::piped());
        }
        Out::ClosedPipe => {
            let (reader, writer) = std::io::pipe().unwrap();
            drop(reader);
            cmd.stdout(writer);
        }
        Out::Full => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .unwrap();
            cmd.stdout(f);
        }
    }
    let mut child = cmd.spawn().expect("running the bitstack binary");
    drop(cmd);
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out_t = drain(child.stdout.take().map(|r| Box::new(r) as _));
    let err_t = drain(child.stderr.take().map(|r| Box::new(r) as _));
    // A case that runs past the limit is killed and counted as hung.
    let deadline = Instant::now() + std::time::Duration::from_secs(CASE_TIMEOUT_S);
    let mut hung = false;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            hung = true;
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let r = RunResult {
        status: status.code().unwrap_or(-1),
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    };
    tally.cases += 1;
    let mut fail = |why: String| {
        tally.failures.push(format!(
            "{}: {why}\n  args: {:?}\n  status {}\n  stdout: {}\n  stderr: {}",
            case.name,
            case.args,
            r.status,
            r.stdout.chars().take(400).collect::<String>(),
            r.stderr.chars().take(800).collect::<String>()
        ))
    };
    if hung {
        tally.hung += 1;
        fail(format!("still running after {CASE_TIMEOUT_S} s (killed)"));
    }
    if r.status == 101 || r.stderr.contains("panicked") {
        tally.panics += 1;
        fail("panicked".into());
    }
    if r.status == 0 && case.out == Out::Capture && r.stdout.trim().is_empty() {
        tally.silent_successes += 1;
        fail("exit 0 without output".into());
    }
    let after: Vec<Option<u64>> = case.inputs.iter().map(|p| checksum(p)).collect();
    for ((p, b), a) in case.inputs.iter().zip(&before).zip(&after) {
        if b != a {
            tally.inputs_changed += 1;
            fail(format!("input {} changed", p.display()));
        }
    }
    match &case.expect {
        Expect::Status(s) if r.status != *s => fail(format!("expected exit status {s}")),
        Expect::FileError(name) => {
            if !matches!(r.status, 1 | 2) {
                fail("expected exit status 1 or 2".into());
            }
            if !r.stderr.contains(name.as_str()) {
                fail(format!("error text does not name {name}"));
            }
        }
        Expect::Robust(name) => {
            if r.status == 0 {
                tally.accepted += 1;
            } else if matches!(r.status, 1 | 2) {
                tally.rejected += 1;
                if !r.stderr.contains(name.as_str()) {
                    fail(format!("error text does not name {name}"));
                }
            } else {
                fail("unexpected exit status".into());
            }
        }
        _ => {}
    }
    if r.status != 0 && r.status != 141 && !case.stderr_full && !r.stderr.contains("error") {
        fail("failed without an error message".into());
    }
    for s in &case.stderr_has {
        if !r.stderr.contains(s.as_str()) {
            fail(format!("stderr lacks {s:?}"));
        }
    }
    for s in &case.never {
        if r.stdout.contains(s.as_str()) || r.stderr.contains(s.as_str()) {
            fail(format!("output shows {s:?}"));
        }
    }
    r
}

#[test]
fn cli_survives_bad_input_and_corrupt_files() {
    let t0 = Instant::now();
    let dir = TempDir::new("suite");
    let gguf = dir.join("tiny.gguf");
    std::fs::write(&gguf, tiny_gguf(2)).unwrap();
    // Inconsistent metadata: 16 wide in 3 heads.
    let bad_heads = dir.join("three-heads.gguf");
    std::fs::write(&bad_heads, tiny_gguf(3)).unwrap();
    let calib = dir.join("calib.txt");
    std::fs::write(&calib, tiny_text(600, 1)).unwrap();
    let text = dir.join("test.txt");
    std::fs::write(&text, tiny_text(300, 2)).unwrap();
    let stack = dir.join("tiny.bitstack");
    let mut tally = Tally::default();
    let s = |p: &Path| p.display().to_string();
    let compress_base: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
        &"compress",
        &gguf,
        &"--calib",
        &calib,
        &"--levels",
        &"3",
        &"--rank",
        &"2",
        &"--calib-windows",
        &"2",
        &"--calib-seq-len",
        &"16",
        &"--order",
        &"roundrobin",
    ];

    // The base stack file, through the CLI.
    let mut args = compress_base.clone();
    args.extend_from_slice(&[&"-o", &stack]);
    let r = run(
        &Case::new("compress the tiny model", &args, Expect::Status(0)).inputs(&[&gguf, &calib]),
        &mut tally,
    );
    assert_eq!(r.status, 0, "the base compress failed: {}", r.stderr);
    let stack_bytes = std::fs::read(&stack).unwrap();

    let mut cases: Vec<Case> = Vec::new();
    let usage = Expect::Status(2);

    // --- Data loss and crashes: outputs naming inputs, links, devices.
    let hard = dir.join("hard.gguf");
    std::fs::hard_link(&gguf, &hard).unwrap();
    let dotted = dir.0.join(".").join("tiny.gguf");
    for (name, out) in [
        ("compress -o the input model", gguf.clone()),
        ("compress -o the input by another spelling", dotted.clone()),
        ("compress -o a hard link of the input", hard.clone()),
        ("compress -o the calibration text", calib.clone()),
    ] {
        let mut a = compress_base.clone();
        a.extend_from_slice(&[&"-o", &out]);
        cases.push(
            Case::new(name, &a, usage.clone())
                .inputs(&[&gguf, &calib, &hard])
                .stderr_has("same file as the input")
                .never("compressing"),
        );
    }
    // Device nodes as outputs are refused by the same check as this socket (see the unit
    // tests of `output`); the suite never names /dev/full as an output, so that a regression
    // cannot replace the machine's device node by a regular file.
    let sock = dir.join("not-a-file.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let link = dir.join("link.json");
    let link_target = dir.join("target.json");
    std::fs::write(&link_target, b"{}").unwrap();
    std::os::unix::fs::symlink(&link_target, &link).unwrap();
    let eval_base: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
        &"eval",
        &stack,
        &"--text",
        &text,
        &"--seq-len",
        &"16",
        &"--max-windows",
        &"2",
        &"--points",
        &"2",
    ];
    let mut a = eval_base.clone();
    a.extend_from_slice(&[&"--json", &text]);
    cases.push(
        Case::new("eval --json the input text", &a, usage.clone())
            .inputs(&[&stack, &text])
            .stderr_has("same file as the input"),
    );
    let mut a = eval_base.clone();
    a.extend_from_slice(&[&"--json", &sock]);
    cases.push(
        Case::new(
            "eval --json a socket (not a regular file)",
            &a,
            usage.clone(),
        )
        .inputs(&[&stack, &sock])
        .stderr_has("is a socket"),
    );
    let mut a = eval_base.clone();
    a.extend_from_slice(&[&"--plot", &link]);
    cases.push(
        Case::new("eval --plot a symlink", &a, usage.clone())
            .inputs(&[&stack, &link, &link_target])
            .stderr_has("is a symbolic link"),
    );
    let sorted = dir.join("sorted.bitstack");
    cases.push(
        Case::new(
            "sort -o the input stack",
            &[&"sort", &stack, &"--method", &"roundrobin", &"-o", &stack],
            usage.clone(),
        )
        .inputs(&[&stack])
        .stderr_has("same file as the input"),
    );
    cases.push(
        Case::new(
            "sort -o a symlink",
            &[&"sort", &stack, &"--method", &"random", &"-o", &link],
            usage.clone(),
        )
        .inputs(&[&stack, &link, &link_target])
        .stderr_has("is a symbolic link"),
    );
    cases.push(
        Case::new(
            "sort -o a socket",
            &[&"sort", &stack, &"--method", &"random", &"-o", &sock],
            usage.clone(),
        )
        .inputs(&[&stack, &sock]),
    );
    cases.push(
        Case::new(
            "plot -o a symlink",
            &[&"plot", &format!("a={}", s(&link_target)), &"-o", &link],
            usage.clone(),
        )
        .inputs(&[&link, &link_target])
        .stderr_has("is a symbolic link"),
    );
    let cmp_dir = dir.join("cmp");
    std::fs::create_dir_all(&cmp_dir).unwrap();
    std::os::unix::fs::symlink(&link_target, cmp_dir.join("compare.md")).unwrap();
    cases.push(
        Case::new(
            "compare with compare.md a symlink",
            &[
                &"compare",
                &gguf,
                &"--calib",
                &calib,
                &"--text",
                &text,
                &"--stack",
                &stack,
                &"--out-dir",
                &cmp_dir,
            ],
            usage.clone(),
        )
        .inputs(&[&gguf, &stack, &link_target, &cmp_dir.join("compare.md")])
        .stderr_has("compare.md"),
    );
    // Closed and full stdout.
    cases.push(
        Case::new(
            "inspect | closed pipe",
            &[&"inspect", &stack],
            Expect::Status(141),
        )
        .inputs(&[&stack])
        .stdout(Out::ClosedPipe),
    );
    cases.push(
        Case::new(
            "inspect > /dev/full",
            &[&"inspect", &stack],
            Expect::Status(1),
        )
        .inputs(&[&stack])
        .stdout(Out::Full)
        .stderr_has("writing to stdout"),
    );
    cases.push(
        Case::new("eval | closed pipe", &eval_base, Expect::Status(141))
            .inputs(&[&stack, &text])
            .stdout(Out::ClosedPipe),
    );
    // Progress and notes cannot be written: the work goes on, results on stdout.
    let mut c =
        Case::new("eval 2> /dev/full", &eval_base, Expect::Status(0)).inputs(&[&stack, &text]);
    c.stderr_full = true;
    cases.push(c);
    let quiet = dir.join("quiet.bitstack");
    let mut a = compress_base.clone();
    a.extend_from_slice(&[&"-o", &quiet]);
    let mut c = Case::new("compress 2> /dev/full", &a, Expect::Status(0)).inputs(&[&gguf, &calib]);
    c.stderr_full = true;
    cases.push(c);
    cases.push(
        Case::new("--help > /dev/full", &[&"--help"], Expect::Status(1))
            .stdout(Out::Full)
            .never("panicked"),
    );
    // Unbounded counts.
    let gen_base: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
        &"generate",
        &stack,
        &"--budget",
        &"1GB",
        &"--prompt",
        &"the cat",
    ];
    for (name, extra) in [
        (
            "generate --max-tokens u64::MAX",
            vec!["--max-tokens", "18446744073709551615"],
        ),
        (
            "generate --max-tokens 100000000",
            vec!["--max-tokens", "100000000"],
        ),
        ("generate --max-tokens 0", vec!["--max-tokens", "0"]),
        ("generate --temperature NaN", vec!["--temperature", "NaN"]),
        ("generate --temperature -1", vec!["--temperature=-1"]),
        (
            "generate --top-p 0",
            vec!["--temperature", "0.7", "--top-p", "0"],
        ),
    ] {
        let mut a = gen_base.clone();
        let extra: Vec<OsString> = extra.into_iter().map(OsString::from).collect();
        for e in &extra {
            a.push(e);
        }
        let c = Case::new(name, &a, usage.clone()).inputs(&[&stack]);
        cases.push(c);
    }
    for (name, extra) in [
        ("eval --sweep 0:1GB:1", vec!["--sweep", "0:1GB:1"]),
        ("eval --points 1000000", vec!["--points", "1000000"]),
        ("eval --points 1", vec!["--points", "1"]),
        (
            "eval --budgets 10 (below the minimum)",
            vec!["--budgets", "10"],
        ),
        ("eval --max-windows 0", vec!["--max-windows", "0"]),
        ("eval --seq-len 1", vec!["--seq-len", "1"]),
        (
            "eval --seq-len longer than the text",
            vec!["--seq-len", "100000"],
        ),
        (
            "eval --json /nonexistent/x.json",
            vec!["--json", "/nonexistent/x.json"],
        ),
        (
            "eval --plot in a file as folder",
            vec!["--plot", "/proc/version/x.svg"],
        ),
    ] {
        let mut a = eval_base.clone();
        let extra: Vec<OsString> = extra.into_iter().map(OsString::from).collect();
        for e in &extra {
            a.push(e);
        }
        cases.push(
            Case::new(name, &a, usage.clone())
                .inputs(&[&stack, &text])
                .never("text: "),
        );
    }
    // Late validation: compress fails before it reads the model.
    let unused = s(&dir.join("unused.out"));
    let (sock_s, dir_s, link_s) = (s(&sock), s(&dir.0), s(&link));
    for (name, extra) in [
        (
            "compress --levels 0",
            vec!["--levels", "0", "-o", unused.as_str()],
        ),
        (
            "compress -o in a missing folder",
            vec!["-o", "/nonexistent/dir/out.bitstack"],
        ),
        ("compress -o a socket", vec!["-o", sock_s.as_str()]),
        ("compress -o a folder", vec!["-o", dir_s.as_str()]),
        ("compress -o a symlink", vec!["-o", link_s.as_str()]),
        (
            "compress --rank 100000",
            vec!["--rank", "100000", "-o", unused.as_str()],
        ),
        (
            "compress --calib-windows 0",
            vec!["--calib-windows", "0", "-o", unused.as_str()],
        ),
    ] {
        let mut a = compress_base.clone();
        let extra: Vec<OsString> = extra.into_iter().map(OsString::from).collect();
        for e in &extra {
            a.push(e);
        }
        cases.push(
            Case::new(name, &a, usage.clone())
                .inputs(&[&gguf, &calib])
                .never("wrote "),
        );
    }
    // Flags that do not apply to an original model.
    for (flag, val) in [
        ("--json", unused.as_str()),
        ("--plot", unused.as_str()),
        ("--budgets", "10MB"),
        ("--sweep", "1MB:2MB:1MB"),
        ("--points", "5"),
        ("--original-ppl", "10"),
    ] {
        cases.push(
            Case::new(
                &format!("eval MODEL.gguf {flag}"),
                &[&"eval", &gguf, &"--text", &text, &flag, &val],
                usage.clone(),
            )
            .inputs(&[&gguf, &text])
            .stderr_has(flag)
            .stderr_has("applies to stack files only"),
        );
    }
    // Unclear errors: the file is named and what it is, is said.
    let folder = dir.join("a-folder");
    std::fs::create_dir_all(&folder).unwrap();
    let missing = dir.join("missing.bitstack");
    let textfile = dir.join("notes.txt");
    std::fs::write(&textfile, "hello, not a stack file\n").unwrap();
    let os = |v: &[&dyn AsRef<std::ffi::OsStr>]| -> Vec<OsString> {
        v.iter().map(|a| a.as_ref().to_owned()).collect()
    };
    let x_out = dir.join("x.bitstack");
    let y_out = dir.join("y.bitstack");
    let p_out = dir.join("p.svg");
    let missing_series = format!("a={}", s(&missing));
    let text_series = format!("a={}", s(&textfile));
    let mut file_errors: Vec<(&str, Vec<OsString>, &Path, &str)> = vec![
        (
            "inspect a folder",
            os(&[&"inspect", &folder]),
            &folder,
            "is a directory",
        ),
        (
            "inspect a GGUF",
            os(&[&"inspect", &gguf]),
            &gguf,
            "is a GGUF model, not a stack file",
        ),
        (
            "inspect a text file",
            os(&[&"inspect", &textfile]),
            &textfile,
            "not a stack file",
        ),
        (
            "inspect a missing file",
            os(&[&"inspect", &missing]),
            &missing,
            "No such file",
        ),
        (
            "generate a folder",
            os(&[&"generate", &folder, &"--budget", &"1GB", &"--prompt", &"x"]),
            &folder,
            "is a directory",
        ),
        (
            "eval --text missing",
            os(&[&"eval", &stack, &"--text", &missing]),
            &missing,
            "--text",
        ),
        (
            "eval --text a folder",
            os(&[&"eval", &stack, &"--text", &folder]),
            &folder,
            "is a directory",
        ),
        (
            "eval a missing model",
            os(&[&"eval", &missing, &"--text", &text]),
            &missing,
            "No such file",
        ),
        (
            "compress --calib missing",
            os(&[&"compress", &gguf, &"--calib", &missing, &"-o", &x_out]),
            &missing,
            "--calib",
        ),
        (
            "compress a stack file as model",
            os(&[&"compress", &stack, &"--calib", &calib, &"-o", &y_out]),
            &stack,
            "is a stack file, not an original model",
        ),
        (
            "compress a text file as model",
            os(&[&"compress", &textfile, &"--calib", &calib, &"-o", &y_out]),
            &textfile,
            "",
        ),
        (
            "plot a missing series",
            os(&[&"plot", &missing_series, &"-o", &p_out]),
            &missing,
            "series",
        ),
        (
            "plot a non-JSON series",
            os(&[&"plot", &text_series, &"-o", &p_out]),
            &textfile,
            "not JSON",
        ),
        (
            "sort --method import with a missing --order-json",
            os(&[
                &"sort",
                &stack,
                &"--method",
                &"import",
                &"--order-json",
                &missing,
                &"-o",
                &y_out,
            ]),
            &missing,
            "--order-json",
        ),
    ];
    file_errors.push((
        "eval a GGUF with inconsistent metadata",
        os(&[&"eval", &bad_heads, &"--text", &text]),
        &bad_heads,
        "GGUF metadata",
    ));
    for (name, args, named, needle) in &file_errors {
        let a: Vec<&dyn AsRef<std::ffi::OsStr>> = args.iter().map(|a| a as _).collect();
        cases.push(
            Case::new(name, &a, Expect::FileError(s(named)))
                .inputs(&[&gguf, &stack, &textfile, &calib, &text])
                .stderr_has(needle)
                .never("wrote ")
                .never("config.json"),
        );
    }
    // Huge and inconsistent n_layers in a stack file's config.
    for (name, n_layers) in [
        ("n_layers 2^62", "4611686018427387904"),
        ("n_layers 3", "3"),
        ("n_layers 0", "0"),
    ] {
        let f = bitstack_format::StackFile::open(&stack).unwrap();
        let mut contents = f.to_contents().unwrap();
        let key = bitstack_examples::stackmodel::META_CONFIG;
        let mut v: serde_json::Value = serde_json::from_slice(&contents.metadata[key]).unwrap();
        v["n_layers"] = serde_json::from_str(n_layers).unwrap();
        contents
            .metadata
            .insert(key.into(), v.to_string().into_bytes());
        let p = dir.join(&format!("layers-{n_layers}.bitstack"));
        bitstack_format::write_stack_file(&p, &contents).unwrap();
        cases.push(
            Case::new(
                &format!("inspect {name}"),
                &[&"inspect", &p],
                Expect::Status(1),
            )
            .inputs(&[&p])
            .stderr_has(&s(&p)),
        );
    }
    // --help documents the exit codes.
    let help = run(
        &Case::new("--help", &[&"--help"], Expect::Status(0)),
        &mut tally,
    );
    for code in ["0 ", "1 ", "2 ", "141"] {
        if !(help.stdout.contains("Exit status") && help.stdout.contains(&format!("  {code}"))) {
            tally
                .failures
                .push(format!("--help does not document exit status {code}"));
        }
    }
    // Things that work, and whose outputs appear.
    let json = dir.join("eval.json");
    let svg = dir.join("eval.svg");
    let mut a = eval_base.clone();
    a.extend_from_slice(&[&"--json", &json, &"--plot", &svg]);
    cases.push(
        Case::new("eval stack --json --plot", &a, Expect::Status(0)).inputs(&[&stack, &text]),
    );
    // Every resident precision the help lists loads; an unknown one is a usage error naming
    // the choices.
    for p in ["f16", "q8", "q4", "f32"] {
        let mut a = eval_base.clone();
        a.extend_from_slice(&[&"--resident", &p]);
        cases.push(
            Case::new(&format!("eval --resident {p}"), &a, Expect::Status(0))
                .inputs(&[&stack, &text]),
        );
    }
    let mut a = eval_base.clone();
    a.extend_from_slice(&[&"--resident", &"q2"]);
    cases.push(
        Case::new("eval --resident q2", &a, usage.clone())
            .inputs(&[&stack, &text])
            .stderr_has("q4"),
    );
    cases.push(
        Case::new(
            "eval original",
            &[
                &"eval",
                &gguf,
                &"--text",
                &text,
                &"--seq-len",
                &"16",
                &"--max-windows",
                &"2",
            ],
            Expect::Status(0),
        )
        .inputs(&[&gguf, &text]),
    );
    cases.push(
        Case::new(
            "inspect --verify",
            &[&"inspect", &stack, &"--verify"],
            Expect::Status(0),
        )
        .inputs(&[&stack]),
    );
    cases.push(
        Case::new(
            "generate",
            &[
                &"generate",
                &stack,
                &"--budget",
                &"1GB",
                &"--prompt",
                &"the cat",
                &"--max-tokens",
                &"8",
            ],
            Expect::Status(0),
        )
        .inputs(&[&stack]),
    );
    cases.push(
        Case::new(
            "sort roundrobin",
            &[&"sort", &stack, &"--method", &"roundrobin", &"-o", &sorted],
            Expect::Status(0),
        )
        .inputs(&[&stack]),
    );
    for c in &cases {
        run(c, &mut tally);
    }
    if !(json.is_file() && svg.is_file() && sorted.is_file()) {
        tally
            .failures
            .push("eval --json/--plot or sort wrote nothing".into());
    }
    let plot_out = dir.join("plot.svg");
    run(
        &Case::new(
            "plot",
            &[&"plot", &format!("a={}", s(&json)), &"-o", &plot_out],
            Expect::Status(0),
        )
        .inputs(&[&json]),
        &mut tally,
    );
    // Both SVGs are whole documents with the series in the legend and the axis titles.
    for (what, path, series) in [("eval --plot", &svg, "BitStack"), ("plot", &plot_out, "a")] {
        match std::fs::read_to_string(path) {
            Ok(t) => {
                let line = |want: &str| t.lines().any(|l| l.trim() == want);
                if !(t.starts_with("<svg")
                    && t.trim_end().ends_with("</svg>")
                    && line(series)
                    && line("perplexity (log scale)")
                    && t.contains("(MB"))
                {
                    tally.failures.push(format!(
                        "{what}: {} is not a complete plot with legend {series:?}",
                        path.display()
                    ));
                }
            }
            Err(e) => tally
                .failures
                .push(format!("{what} wrote nothing ({}: {e})", path.display())),
        }
    }

    // --- `--windows`: a bad value names the flag and the choices; `first` and `spread`
    // reach the evaluation (recorded in the JSON, and two windows of a long text differ).
    for (name, args) in [
        (
            "eval --windows last",
            os(&[
                &"eval",
                &stack,
                &"--text",
                &text,
                &"--max-windows",
                &"2",
                &"--windows",
                &"last",
            ]),
        ),
        (
            "compare --windows (empty)",
            os(&[
                &"compare",
                &gguf,
                &"--calib",
                &calib,
                &"--text",
                &text,
                &"--windows",
                &"",
            ]),
        ),
    ] {
        let a: Vec<&dyn AsRef<std::ffi::OsStr>> = args.iter().map(|x| x as _).collect();
        run(
            &Case::new(name, &a, usage.clone())
                .inputs(&[&stack, &text, &gguf, &calib])
                .stderr_has("--windows")
                .stderr_has("spread")
                .stderr_has("first")
                .never("text: "),
            &mut tally,
        );
    }
    let mut picked: Vec<(String, Option<serde_json::Value>)> = Vec::new();
    for selection in ["first", "spread"] {
        let out = dir.join(&format!("windows-{selection}.json"));
        let mut a = eval_base.clone();
        a.extend_from_slice(&[&"--windows", &selection, &"--json", &out]);
        let r = run(
            &Case::new(
                &format!("eval --windows {selection}"),
                &a,
                Expect::Status(0),
            )
            .inputs(&[&stack, &text]),
            &mut tally,
        );
        if !r.stdout.contains(&format!("(--windows {selection})")) {
            tally.failures.push(format!(
                "eval --windows {selection}: the table does not say which windows"
            ));
        }
        let doc = std::fs::read_to_string(&out)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
        let recorded = doc.as_ref().map(|d| d["window_selection"].clone());
        if recorded != Some(serde_json::Value::String(selection.into())) {
            tally.failures.push(format!(
                "eval --windows {selection}: --json window_selection is {recorded:?}"
            ));
        }
        picked.push((selection.to_owned(), doc));
    }
    // Both runs score 2 windows of 16 tokens at the same budgets; `first` takes windows 0
    // and 1, `spread` windows 0 and total/2, so their perplexities differ.
    let rows = |d: &Option<serde_json::Value>| -> Vec<(u64, f64)> {
        d.as_ref()
            .and_then(|d| d["rows"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|r| {
                (
                    r["windows"].as_u64().unwrap_or(0),
                    r["ppl"].as_f64().unwrap_or(f64::NAN),
                )
            })
            .collect()
    };
    // Equal up to the rounding of a parallel sum.
    let same = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs();
    let (first, spread) = (rows(&picked[0].1), rows(&picked[1].1));
    if first.len() != 2
        || spread.len() != 2
        || first.iter().chain(&spread).any(|r| r.0 != 2)
        || first.iter().zip(&spread).any(|(f, s)| same(f.1, s.1))
    {
        tally.failures.push(format!(
            "eval --windows first / spread: rows (windows, ppl) {first:?} / {spread:?}, expected 2 rows of 2 windows each, with different perplexities"
        ));
    }
    let default_doc = std::fs::read_to_string(&json)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    let default_rows = rows(&default_doc);
    if default_doc.as_ref().map(|d| d["window_selection"].clone())
        != Some(serde_json::Value::String("spread".into()))
        || default_rows.len() != spread.len()
        || default_rows
            .iter()
            .zip(&spread)
            .any(|(d, s)| d.0 != s.0 || !same(d.1, s.1))
    {
        tally.failures.push(format!(
            "eval without --windows: rows {default_rows:?}, expected spread's {spread:?}"
        ));
    }
    if !std::fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()) {
        tally
            .failures
            .push(format!("{} is no longer a link", link.display()));
    }
    if !quiet.is_file() {
        tally
            .failures
            .push("compress 2> /dev/full wrote no stack file".into());
    }
    if dir.join("unused.out").exists() {
        tally
            .failures
            .push("a refused command wrote its output".into());
    }
    let named_cases = tally.cases;

    // --- Silent failure: a corrupt block (the last in the order) makes eval exit 1.
    let f = bitstack_format::StackFile::open(&stack).unwrap();
    let order = f.order().as_slice().to_vec();
    let extents: Vec<(u64, u64)> = order
        .iter()
        .map(|id| f.block_extent(*id).unwrap())
        .collect();
    let header_end = 64 + u64::from_le_bytes(stack_bytes[24..32].try_into().unwrap());
    drop(f);
    let corrupt_last = dir.join("corrupt-last.bitstack");
    let mut bytes = stack_bytes.clone();
    let (off, len) = extents[extents.len() - 1];
    bytes[(off + len / 2) as usize] ^= 0x10;
    std::fs::write(&corrupt_last, &bytes).unwrap();
    let corrupt_first = dir.join("corrupt-first.bitstack");
    let mut bytes = stack_bytes.clone();
    let (off, len) = extents[0];
    bytes[(off + len / 2) as usize] ^= 0x01;
    std::fs::write(&corrupt_first, &bytes).unwrap();
    for (name, p) in [("last", &corrupt_last), ("first", &corrupt_first)] {
        let json = dir.join(&format!("corrupt-{name}.json"));
        let ev: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
            &"eval",
            p,
            &"--text",
            &text,
            &"--seq-len",
            &"16",
            &"--max-windows",
            &"1",
            &"--points",
            &"2",
            &"--json",
            &json,
        ];
        run(
            &Case::new(
                &format!("eval with a corrupt {name} block"),
                &ev,
                Expect::Status(1),
            )
            .inputs(&[p, &text])
            .stderr_has(&s(p)),
            &mut tally,
        );
        // A corrupt last block fails the full budget only: the minimum's row is written. A
        // corrupt first block fails every budget: nothing is written.
        let rows = std::fs::read_to_string(&json)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["rows"].as_array().map(Vec::len));
        let expected = if name == "last" { Some(1) } else { None };
        if rows != expected {
            tally.failures.push(format!(
                "eval with a corrupt {name} block: --json rows {rows:?}, expected {expected:?}"
            ));
        }
        run(
            &Case::new(
                &format!("inspect --verify with a corrupt {name} block"),
                &[&"inspect", p, &"--verify"],
                Expect::Status(1),
            )
            .inputs(&[p])
            .stderr_has("block ")
            .stderr_has(&s(p)),
            &mut tally,
        );
    }

    // --- Generated corrupt stack files: truncations, header and payload bit flips.
    let mut rng = Rng(0xC0FF_EE00_D15E_A5E5);
    let corrupt = dir.join("corrupt.bitstack");
    let mut stack_cases = 0usize;
    let mut truncations_accepted = 0usize;
    let n = stack_bytes.len() as u64;
    for i in 0..220 {
        let mut bytes = stack_bytes.clone();
        let kind = i % 3;
        match kind {
            0 => bytes.truncate(rng.below(n) as usize),
            1 => {
                let at = rng.below(header_end) as usize;
                bytes[at] ^= 1 << rng.below(8);
            }
            _ => {
                let (off, len) = extents[rng.below(extents.len() as u64) as usize];
                let at = (off + rng.below(len)) as usize;
                bytes[at] ^= 1 << rng.below(8);
                if i % 2 == 0 {
                    let at = header_end + rng.below(n - header_end);
                    bytes[at as usize] ^= 1 << rng.below(8);
                }
            }
        }
        std::fs::write(&corrupt, &bytes).unwrap();
        let before = tally.accepted;
        run(
            &Case::new(
                &format!("corrupt stack #{i}"),
                &[&"inspect", &corrupt, &"--verify"],
                Expect::Robust(s(&corrupt)),
            )
            .inputs(&[&corrupt]),
            &mut tally,
        );
        if kind == 0 && tally.accepted > before {
            truncations_accepted += 1;
        }
        // Every sixth also through the runtime (load all blocks, evaluate, generate).
        if i % 6 == 5 {
            run(
                &Case::new(
                    &format!("corrupt stack #{i} eval"),
                    &[
                        &"eval",
                        &corrupt,
                        &"--text",
                        &text,
                        &"--seq-len",
                        &"16",
                        &"--max-windows",
                        &"1",
                        &"--points",
                        &"2",
                    ],
                    Expect::Robust(s(&corrupt)),
                )
                .inputs(&[&corrupt, &text]),
                &mut tally,
            );
            run(
                &Case::new(
                    &format!("corrupt stack #{i} generate"),
                    &[
                        &"generate",
                        &corrupt,
                        &"--budget",
                        &"1GB",
                        &"--prompt",
                        &"ab",
                        &"--max-tokens",
                        &"4",
                    ],
                    Expect::Robust(s(&corrupt)),
                )
                .inputs(&[&corrupt]),
                &mut tally,
            );
        }
        stack_cases += 1;
    }
    let (stack_rejected, stack_accepted) = (tally.rejected, tally.accepted);

    // --- Generated corrupt GGUFs: truncations and bit flips anywhere.
    let gguf_bytes = std::fs::read(&gguf).unwrap();
    let bad_gguf = dir.join("corrupt.gguf");
    let n = gguf_bytes.len() as u64;
    let mut gguf_cases = 0usize;
    // The metadata and tensor table end where the (32-aligned) data starts: well before the
    // first tensor's bytes, which are the last ~ (16*32 + ...) * 4 bytes of the file.
    for i in 0..60 {
        let mut bytes = gguf_bytes.clone();
        match i % 3 {
            0 => bytes.truncate(rng.below(n) as usize),
            1 => {
                let at = rng.below(1200.min(n)) as usize;
                bytes[at] ^= 1 << rng.below(8);
            }
            _ => {
                for _ in 0..3 {
                    let at = rng.below(n) as usize;
                    bytes[at] = rng.below(256) as u8;
                }
            }
        }
        std::fs::write(&bad_gguf, &bytes).unwrap();
        run(
            &Case::new(
                &format!("corrupt GGUF #{i} eval"),
                &[
                    &"eval",
                    &bad_gguf,
                    &"--text",
                    &text,
                    &"--seq-len",
                    &"16",
                    &"--max-windows",
                    &"1",
                ],
                Expect::Robust(s(&bad_gguf)),
            )
            .inputs(&[&bad_gguf, &text]),
            &mut tally,
        );
        gguf_cases += 1;
    }

    let secs = t0.elapsed().as_secs_f64();
    println!(
        "cli robustness: {} cases run ({named_cases} named cases incl. the base compress, {stack_cases} corrupt stack files, {gguf_cases} corrupt GGUFs); panics {}, silent successes {}, inputs changed {}, hung {}, other failures {}; corrupt stack-file runs rejected {stack_rejected} / accepted with output {stack_accepted} (truncations accepted {truncations_accepted}); corrupt GGUF runs rejected {} / accepted with output {}; {secs:.1} s",
        tally.cases,
        tally.panics,
        tally.silent_successes,
        tally.inputs_changed,
        tally.hung,
        tally.failures.len().saturating_sub(
            tally.panics + tally.silent_successes + tally.inputs_changed + tally.hung
        ),
        tally.rejected - stack_rejected,
        tally.accepted - stack_accepted,
    );
    assert!(
        tally.failures.is_empty(),
        "{} failing checks:\n{}",
        tally.failures.len(),
        tally.failures.join("\n")
    );
    assert_eq!(
        truncations_accepted, 0,
        "a truncated stack file was accepted"
    );
    assert!(stack_cases >= 200 && gguf_cases >= 50);
}
