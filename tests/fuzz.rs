//! Property tests (SPEC §2, §6): bad input never makes unionmount panic.
//!
//! * The option parser, in process: thousands of random and mutated argument vectors and `-o`
//!   strings go to `config::parse`, `split_options`, `split_layers` and `check_paths`; none may
//!   panic, and every refusal is one line. A few hundred of them go through the real binary:
//!   non-zero exit, one stderr line, no panic text, nothing mounted.
//! * The request handlers: several threads send a seeded random sequence of system calls
//!   (odd flags, huge offsets, invalid arguments) to a live mount; afterwards the daemon is
//!   still alive, the mount still answers, and the daemon wrote no panic.
//!
//! Every run prints its seeds; `UNIONMOUNT_FUZZ_SEED=N` repeats one. The long form:
//!
//! ```text
//! UNIONMOUNT_FUZZ_CASES=200000 UNIONMOUNT_FUZZ_OPS=200000 cargo test --release --test fuzz -- --nocapture
//! ```

mod common;

use common::*;

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use unionmount::config::{self, Parsed};

// ---------------------------------------------------------------------------------------------
// Random offsets and sizes
// ---------------------------------------------------------------------------------------------

impl Rng {
    /// An offset or size: small, near a power of two, or huge (also past i64::MAX).
    fn offset(&mut self) -> u64 {
        match self.index(6) {
            0 => self.index(16) as u64,
            1 => self.index(70_000) as u64,
            2 => {
                let b = 1u64 << self.index(63);
                b.wrapping_add(self.index(3) as u64).wrapping_sub(1)
            }
            3 => i64::MAX as u64 - self.index(4) as u64,
            4 => u64::MAX - self.index(4) as u64,
            _ => self.next(),
        }
    }
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The base seed: `UNIONMOUNT_FUZZ_SEED`, or one from the clock, printed either way.
fn base_seed(what: &str) -> u64 {
    let seed = std::env::var("UNIONMOUNT_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("{what}: seed {seed} (repeat with UNIONMOUNT_FUZZ_SEED={seed})");
    seed
}

/// The text of a panic payload.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-text panic)".into())
}

// ---------------------------------------------------------------------------------------------
// Random command lines
// ---------------------------------------------------------------------------------------------

const KNOWN: &[&str] = &[
    "lowerdir",
    "upperdir",
    "workdir",
    "uidmapping",
    "gidmapping",
    "squash_to_root",
    "squash_to_uid",
    "squash_to_gid",
    "xattr_permissions",
    "static_nlink",
    "timeout",
    "threaded",
    "fsync",
    "volatile",
    "noacl",
    "ro",
    "rw",
    "remount",
    "allow_other",
    "allow_root",
    "default_permissions",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "relatime",
    "strictatime",
    "diratime",
    "nodiratime",
    "fsname",
    "context",
    "fscontext",
    "subtype",
    "redirect_dir",
    "metacopy",
    "index",
    "userxattr",
    "frobnicate",
    "",
];

const FLAGS: &[&str] = &[
    "--lower",
    "--upper",
    "--work",
    "-f",
    "--foreground",
    "--threads",
    "--passthrough",
    "--log-level",
    "-o",
    "--",
    "-",
    "--bogus",
    "-x",
    "--lower=",
    "--threads=0",
    "-fo",
    "-o=",
];

/// A random value for an option: numbers, ranges, paths, empty, quotes, escapes, huge.
fn rand_value(r: &mut Rng, paths: &[String]) -> String {
    match r.index(16) {
        0 => String::new(),
        1 => r.index(4).to_string(),
        2 => format!("{}", r.next() as i64),
        3 => format!(
            "{}:{}:{}",
            r.index(70_000),
            r.index(70_000),
            r.index(70_000)
        ),
        4 => format!(
            "{}:{}:{}:{}",
            r.next() as u32,
            r.next() as u32,
            r.next() as u32,
            r.index(9)
        ),
        5 => r.pick(paths).clone(),
        6 => (0..1 + r.index(5))
            .map(|_| r.pick(paths).replace(':', "\\:"))
            .collect::<Vec<_>>()
            .join(":"),
        7 => "\"a,b:c\"".into(),
        8 => "\"unterminated,x".into(),
        9 => "x".repeat(1 + r.index(200_000)),
        10 => [
            "nan", "inf", "-inf", "1e400", "-0", "0.5", "1e9", "abc", "0x10",
        ][r.index(9)]
        .into(),
        11 => "\\".into(),
        12 => "a\\,b\\:c\\".into(),
        13 => "\n\t\r\u{0}é€".into(),
        14 => ":".repeat(r.index(600)),
        _ => {
            let n = 1 + r.index(40);
            rand_text(r, n)
        }
    }
}

/// Random text over a small alphabet rich in separators and escapes.
fn rand_text(r: &mut Rng, len: usize) -> String {
    const A: &[char] = &[
        'a', 'b', '0', '1', ',', ':', '=', '\\', '"', ' ', '/', '.', '-', '\n', 'é', '\u{0}',
    ];
    (0..len).map(|_| *r.pick(A)).collect()
}

/// A random `-o` string: a list of `key[=value]` items, sometimes mangled.
fn rand_o(r: &mut Rng, paths: &[String]) -> String {
    let n = r.index(8);
    let mut items = Vec::new();
    for _ in 0..n {
        let k = r.pick(KNOWN).to_string();
        let item = match r.index(4) {
            0 => k,
            1 => format!("{k}="),
            _ => format!("{k}={}", rand_value(r, paths)),
        };
        items.push(item);
    }
    let sep = if r.one_in(5) { ",," } else { "," };
    let mut s = items.join(sep);
    if r.one_in(6) {
        // Mutate a few bytes.
        let mut b: Vec<char> = s.chars().collect();
        for _ in 0..1 + r.index(4) {
            if b.is_empty() {
                break;
            }
            let i = r.index(b.len());
            b[i] = *r.pick(&[',', ':', '=', '\\', '"', 'x']);
        }
        s = b.into_iter().collect();
    }
    s
}

/// A random argument that is not valid UTF-8.
fn non_utf8(r: &mut Rng) -> OsString {
    let mut v = b"lowerdir=/".to_vec();
    v.truncate(r.index(v.len() + 1));
    v.push(0xff);
    v.push(0xfe);
    let n = r.index(8);
    v.extend_from_slice(rand_text(r, n).as_bytes());
    OsString::from_vec(v)
}

/// A random argument vector (program name first).
fn rand_args(r: &mut Rng, paths: &[String]) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec!["unionmount".into()];
    let n = r.index(9);
    for _ in 0..n {
        match r.index(10) {
            0..=2 => {
                a.push("-o".into());
                a.push(rand_o(r, paths).into());
            }
            3 => a.push(format!("-o{}", rand_o(r, paths)).into()),
            4 | 5 => a.push(r.pick(FLAGS).into()),
            6 => a.push(rand_value(r, paths).into()),
            7 => a.push(non_utf8(r)),
            _ => a.push(r.pick(paths).into()),
        }
    }
    a
}

/// A valid command line (either form) over the pool's paths, then a few random mutations:
/// a value replaced, an option added or duplicated, an argument dropped.
fn mutated_args(r: &mut Rng, paths: &[String]) -> Vec<OsString> {
    let root = Path::new(&paths[0]).parent().unwrap().to_path_buf();
    let d = |n: &str| root.join(n).to_string_lossy().into_owned();
    let mut a: Vec<String> = vec!["unionmount".into()];
    if r.one_in(2) {
        a.extend(["--lower".into(), format!("{}:{}", d("l0"), d("l1"))]);
        if r.one_in(2) {
            a.extend(["--upper".into(), d("u"), "--work".into(), d("w")]);
        }
        a.push(d("m"));
    } else {
        if r.one_in(2) {
            a.push("src".into());
        }
        a.push(d("m"));
        a.push("-o".into());
        a.push(format!(
            "lowerdir={}:{},upperdir={},workdir={}",
            d("l0"),
            d("l1"),
            d("u"),
            d("w")
        ));
    }
    for _ in 0..1 + r.index(3) {
        let i = 1 + r.index(a.len() - 1);
        match r.index(6) {
            0 => a[i] = rand_value(r, paths),
            1 => a[i] = r.pick(paths).clone(),
            2 => {
                let o = rand_o(r, paths);
                a.push("-o".into());
                a.push(o);
            }
            3 => {
                let dup = a[i].clone();
                a.insert(i, dup);
            }
            4 => {
                a.remove(i);
                if a.len() < 2 {
                    a.push(d("m"));
                }
            }
            _ => {
                let k = r.pick(KNOWN).to_string();
                let v = rand_value(r, paths);
                let last = a.len() - 1;
                if a.iter().any(|x| x == "-o") {
                    a[last] = format!("{},{k}={v}", a[last]);
                } else {
                    a.push("-o".into());
                    a.push(format!("{k}={v}"));
                }
            }
        }
    }
    a.into_iter().map(OsString::from).collect()
}

/// Paths for the random command lines: real directories, a file, missing paths, odd names.
fn path_pool(root: &Path) -> Vec<String> {
    let d = |n: &str| root.join(n).to_string_lossy().into_owned();
    vec![
        d("l0"),
        d("l1"),
        d("u"),
        d("w"),
        d("m"),
        d("file"),
        d("missing"),
        d("l0/inner"),
        d("u/inner"),
        d("dangling/x"),
        d("col:on"),
        d("com,ma"),
        d("new\nline"),
        d("l0/../l0"),
        "/".into(),
        ".".into(),
        "relative/path".into(),
        String::new(),
    ]
}

fn make_pool_dirs(root: &Path) {
    for n in [
        "l0", "l1", "u", "w", "m", "l0/inner", "u/inner", "col:on", "com,ma",
    ] {
        fs::create_dir_all(root.join(n)).unwrap();
    }
    fs::write(root.join("file"), "x").unwrap();
    std::os::unix::fs::symlink(root.join("nowhere"), root.join("dangling")).unwrap();
}

/// A listing of a tree (names, kinds, sizes, mtimes): nothing may change in it.
fn listing(root: &Path) -> BTreeMap<PathBuf, (u32, u64, i64, i64)> {
    fn go(p: &Path, out: &mut BTreeMap<PathBuf, (u32, u64, i64, i64)>) {
        let Ok(m) = fs::symlink_metadata(p) else {
            return;
        };
        out.insert(
            p.to_path_buf(),
            (m.mode(), m.size(), m.mtime(), m.mtime_nsec()),
        );
        if m.is_dir() {
            for e in fs::read_dir(p).unwrap().flatten() {
                go(&e.path(), out);
            }
        }
    }
    let mut out = BTreeMap::new();
    go(root, &mut out);
    out
}

/// An argument vector for a message, long arguments shortened.
fn show(args: &[OsString]) -> String {
    let v: Vec<String> = args
        .iter()
        .map(|a| {
            let t = a.to_string_lossy();
            if t.len() > 60 {
                format!(
                    "{}...({} bytes)",
                    t.chars().take(40).collect::<String>(),
                    t.len()
                )
            } else {
                t.into_owned()
            }
        })
        .collect();
    format!("{v:?}")
}

fn shorten(msg: &str) -> String {
    if msg.len() > 300 {
        format!("{}...", msg.chars().take(300).collect::<String>())
    } else {
        msg.to_string()
    }
}

/// A refusal must be one non-empty line; problems are collected, a few examples of each kind.
fn check_message(
    what: &str,
    msg: &str,
    args: &[OsString],
    problems: &mut BTreeMap<String, (u64, Vec<String>)>,
) {
    let kind = if msg.is_empty() {
        format!("{what}: empty error message")
    } else if msg.contains('\n') {
        format!("{what}: error message of more than one line")
    } else {
        return;
    };
    let e = problems.entry(kind).or_default();
    e.0 += 1;
    if e.1.len() < 3 {
        e.1.push(format!("{} -> {:?}", show(args), shorten(msg)));
    }
}

/// `config::parse` (and `check_paths` on what it accepts), `split_options` and
/// `split_layers` on thousands of random inputs: no panic, one-line refusals, nothing on disk
/// changed.
#[test]
fn option_parser_never_panics() {
    let cases = env_num("UNIONMOUNT_FUZZ_CASES", 5000);
    let seed = base_seed("option parser");
    let mut r = Rng(seed);
    let l = Layers::new(0);
    make_pool_dirs(l.root());
    let paths = path_pool(l.root());
    let before = listing(l.root());
    let (mut ok, mut refused, mut printed, mut checked) = (0u64, 0u64, 0u64, 0u64);
    let mut problems = BTreeMap::new();
    for case in 0..cases {
        let args = if r.one_in(2) {
            rand_args(&mut r, &paths)
        } else {
            mutated_args(&mut r, &paths)
        };
        let res = catch_unwind(AssertUnwindSafe(|| config::parse(args.clone())));
        let parsed = match res {
            Ok(p) => p,
            Err(p) => panic!(
                "case {case} (seed {seed}): config::parse panicked on {}: {}",
                show(&args),
                panic_text(&*p)
            ),
        };
        match parsed {
            Err(e) => {
                refused += 1;
                check_message("parse", &e, &args, &mut problems);
            }
            Ok(Parsed::Print(_)) => printed += 1,
            Ok(Parsed::Remount(_)) => ok += 1,
            Ok(Parsed::Mount(c)) => {
                ok += 1;
                for w in &c.warnings {
                    assert!(!w.contains('\n'), "a warning is not one line: {w:?}");
                }
                let res = catch_unwind(AssertUnwindSafe(|| config::check_paths(&c)));
                match res {
                    Err(p) => panic!(
                        "case {case} (seed {seed}): check_paths panicked on {}: {}",
                        show(&args),
                        panic_text(&*p)
                    ),
                    Ok(Err(e)) => {
                        checked += 1;
                        check_message("check_paths", &e, &args, &mut problems);
                    }
                    Ok(Ok(_)) => checked += 1,
                }
            }
        }
        let s = rand_o(&mut r, &paths);
        let res = catch_unwind(|| {
            let opts = config::split_options(&s);
            let layers = config::split_layers(s.as_ref());
            (opts, layers)
        });
        let (opts, layers) = res.unwrap_or_else(|p| {
            panic!(
                "case {case} (seed {seed}): splitting {s:?} panicked: {}",
                panic_text(&*p)
            )
        });
        assert!(opts.iter().all(|o| !o.is_empty()), "{s:?} -> {opts:?}");
        assert!(!layers.is_empty(), "{s:?}: no layers at all");
        // Escaping a list and splitting it gives the list back.
        let want: Vec<String> = (0..1 + r.index(4)).map(|_| rand_text(&mut r, 6)).collect();
        let joined = want
            .iter()
            .map(|p| p.replace('\\', "\\\\").replace(':', "\\:"))
            .collect::<Vec<_>>()
            .join(":");
        let got: Vec<PathBuf> = config::split_layers(joined.as_ref());
        let want: Vec<PathBuf> = want.iter().map(PathBuf::from).collect();
        assert_eq!(got, want, "split_layers({joined:?})");
    }
    eprintln!(
        "option parser: {cases} cases: {ok} accepted, {refused} refused, {printed} help/version, {checked} path checks"
    );
    let after = listing(l.root());
    assert_eq!(before, after, "parsing or checking paths changed the disk");
    assert!(
        problems.is_empty(),
        "seed {seed}: {}",
        problems
            .iter()
            .map(|(k, (n, ex))| format!("{k} ({n} times), e.g.\n  {}", ex.join("\n  ")))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Whether unionmount run in `cwd` with `args` would mount or remount anything (its layer
/// checks pass, or it is a remount): such a command line is never run, so that a random one
/// can never mount over, or remount, a real directory.
fn could_act(args: &[OsString], cwd: &Path) -> bool {
    let mut full = vec![OsString::from("unionmount")];
    full.extend(args.iter().cloned());
    match config::parse(full) {
        Err(_) | Ok(Parsed::Print(_)) => false,
        Ok(Parsed::Remount(_)) => true,
        Ok(Parsed::Mount(c)) => {
            let mut c = *c;
            let abs = |p: &Path| {
                if p.is_absolute() {
                    p.to_path_buf()
                } else {
                    cwd.join(p)
                }
            };
            c.lowers = c.lowers.iter().map(|p| abs(p)).collect();
            c.upper = c.upper.as_deref().map(abs);
            c.work = c.work.as_deref().map(abs);
            c.mountpoint = abs(&c.mountpoint);
            config::check_paths(&c).is_ok()
        }
    }
}

/// A few hundred random command lines through the real binary, each ending in a mountpoint
/// that does not exist or carrying a bad option: exit non-zero, one stderr line, no panic,
/// nothing mounted, nothing on disk changed. A command line the in-process checks accept
/// (say, the mountpoint was swallowed as an option value and another path took its place) is
/// skipped, never run.
#[test]
fn binary_refuses_bad_command_lines_without_panicking() {
    let cases = env_num("UNIONMOUNT_FUZZ_BIN_CASES", 300);
    let seed = base_seed("binary");
    let mut r = Rng(seed);
    let l = Layers::new(0);
    make_pool_dirs(l.root());
    let mut paths = path_pool(l.root());
    // Never a real mountpoint: the last argument is always a missing directory.
    paths.retain(|p| !p.ends_with("/m"));
    let missing_mp = l.root().join("no-such-mountpoint");
    // The binary runs in an empty directory of its own, so relative paths lead nowhere real.
    let cwd = l.mkdir("cwd");
    let mounts_before = mounts_under(l.root());
    let mut skipped = 0u64;
    let mut before = listing(l.root());
    let mut fails = Vec::new();
    for case in 0..cases {
        let mut args = if r.one_in(2) {
            rand_args(&mut r, &paths)
        } else {
            mutated_args(&mut r, &paths)
        };
        args.remove(0);
        // A command line cannot hold a NUL byte; the real mountpoint is never the target.
        let m = l.root().join("m").into_os_string();
        args = args
            .into_iter()
            .filter(|a| *a != m)
            .map(|a| {
                // Nor can one argument be longer than 128 KiB.
                let mut v: Vec<u8> = a.into_vec().into_iter().filter(|&b| b != 0).collect();
                v.truncate(100_000);
                OsString::from_vec(v)
            })
            .collect();
        if r.one_in(2) {
            // A plausible command line with one bad option value.
            let bad = *r.pick(&[
                "uidmapping=garbage",
                "gidmapping=1:2",
                "timeout=abc",
                "xattr_permissions=7",
                "squash_to_uid=x",
                "fsync=maybe",
                "threaded=2",
                "upperdir=",
                "timeout=-1",
            ]);
            args = vec![
                "-o".into(),
                format!("lowerdir={},{bad}", l.root().join("l0").display()).into(),
            ];
        }
        args.push(missing_mp.clone().into());
        if could_act(&args, &cwd) {
            skipped += 1;
            continue;
        }
        let out = Command::new(BIN)
            .args(&args)
            .current_dir(&cwd)
            .stdin(Stdio::null())
            .output()
            .expect("run unionmount");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        for m in mounts_under(l.root()) {
            if !mounts_before.contains(&m) {
                drop(Mount::adopt(PathBuf::from(&m), None, None, Kind::Union));
                fails.push(format!("case {case}: {} mounted {m}", show(&args)));
            }
        }
        let now = listing(l.root());
        if now != before {
            let changed: Vec<String> = now
                .iter()
                .filter(|(k, v)| before.get(*k) != Some(v))
                .map(|(k, _)| format!("created or changed {}", k.display()))
                .chain(
                    before
                        .keys()
                        .filter(|k| !now.contains_key(*k))
                        .map(|k| format!("removed {}", k.display())),
                )
                .collect();
            fails.push(format!(
                "case {case}: {} changed the disk: {changed:?} (stderr {:?})",
                show(&args),
                shorten(&err)
            ));
            before = now;
        }
        if err.contains("panicked") || err.contains("RUST_BACKTRACE") {
            fails.push(format!(
                "case {case}: {} panicked: {}",
                show(&args),
                shorten(&err)
            ));
            continue;
        }
        if out.status.success() && !String::from_utf8_lossy(&out.stdout).is_empty() {
            // --help or --version: printed and exit 0 is right.
            continue;
        }
        if out.status.code().is_none_or(|c| c == 0) {
            fails.push(format!(
                "case {case}: {}: status {} (stderr {:?})",
                show(&args),
                out.status,
                shorten(&err)
            ));
        }
        // Unknown options add one warning line each before the refusal.
        let lines: Vec<&str> = err.lines().filter(|l| !l.contains("warning:")).collect();
        if lines.len() != 1 || !lines[0].starts_with("unionmount: ") {
            fails.push(format!(
                "case {case}: {}: not one 'unionmount:' error line: {:?}",
                show(&args),
                shorten(&err)
            ));
        }
    }
    eprintln!("binary: {cases} cases, {skipped} skipped as valid command lines");
    assert!(
        fails.is_empty(),
        "seed {seed}: {} problem(s):\n{}",
        fails.len(),
        fails.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Random requests against a live mount
// ---------------------------------------------------------------------------------------------

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// A daemon started with `-f`, its stderr in a file.
struct Daemon {
    child: Child,
    merged: PathBuf,
    log: PathBuf,
}

impl Daemon {
    fn start(l: &Layers, name: &str, extra: &[&str]) -> Daemon {
        let base = l.mkdir(name);
        let (upper, work, merged) = (base.join("upper"), base.join("work"), base.join("merged"));
        for d in [&upper, &work, &merged] {
            fs::create_dir_all(d).unwrap();
        }
        let log = base.join("daemon.log");
        let child = Command::new(BIN)
            .arg("--lower")
            .arg(l.lowerdir_opt())
            .arg("--upper")
            .arg(&upper)
            .arg("--work")
            .arg(&work)
            .args(extra)
            .arg("-f")
            .arg(&merged)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn unionmount -f");
        let mut d = Daemon { child, merged, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_mounted(&d.merged) {
            if let Ok(Some(st)) = d.child.try_wait() {
                panic!("unionmount -f exited with {st}: {}", d.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "unionmount -f did not mount: {}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Aborts the FUSE connection (unsticks callers of a hung daemon).
    fn abort_connection(&self) {
        if let Ok(m) = fs::metadata(&self.merged) {
            let minor = libc::minor(m.dev());
            let _ = fs::write(format!("/sys/fs/fuse/connections/{minor}/abort"), "1");
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if is_mounted(&self.merged) {
            drop(Mount::adopt(self.merged.clone(), None, None, Kind::Union));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Names the threads share, so that their operations meet.
const NAMES: &[&str] = &[
    "a",
    "b",
    "c",
    "d",
    "e",
    "f0",
    "f1",
    "dir",
    "dir/x",
    "dir/y",
    "dir/sub",
    "dir/sub/z",
    "lf",
    "ld",
    "ld/inner",
    "ld/deep/n",
    "ls",
    "sub",
    "sub/q",
    "wh",
];

fn rand_path(r: &mut Rng, merged: &Path) -> PathBuf {
    match r.index(20) {
        0 => merged.join("n".repeat(255)),
        1 => merged.join("n".repeat(256)),
        2 => merged.to_path_buf(),
        3 => merged.join(".wh.a"),
        4 => merged.join(".wh..wh..opq"),
        5 => merged.join("dir").join("é\u{1}\t"),
        _ => merged.join(r.pick(NAMES)),
    }
}

fn rand_open_flags(r: &mut Rng) -> libc::c_int {
    let mut f = *r.pick(&[libc::O_RDONLY, libc::O_WRONLY, libc::O_RDWR, 3]);
    for (bit, one_in) in [
        (libc::O_CREAT, 2),
        (libc::O_EXCL, 5),
        (libc::O_TRUNC, 5),
        (libc::O_APPEND, 5),
        (libc::O_DIRECT, 6),
        (libc::O_PATH, 8),
        (libc::O_DIRECTORY, 8),
        (libc::O_NOFOLLOW, 6),
        (libc::O_NOATIME, 6),
        (libc::O_SYNC, 8),
        (libc::O_TMPFILE, 10),
    ] {
        if r.one_in(one_in) {
            f |= bit;
        }
    }
    // Never block on a FIFO another thread made.
    f | libc::O_NONBLOCK | libc::O_CLOEXEC
}

const XATTR_PREFIXES: &[&str] = &[
    "user.",
    "trusted.",
    "trusted.overlay.",
    "security.",
    "system.posix_acl_access",
    "bogus.",
    "",
];

fn rand_xattr_name(r: &mut Rng) -> CString {
    let mut n = r.pick(XATTR_PREFIXES).to_string();
    let len = match r.index(4) {
        0 => 250 + r.index(10),
        1 => r.index(3),
        _ => 1 + r.index(12),
    };
    n.push_str(&"k".repeat(len));
    if r.one_in(8) {
        n = "trusted.overlay.opaque".into();
    }
    CString::new(n).unwrap()
}

/// One random system call; errors are expected and ignored, only the daemon's survival counts.
fn one_op(r: &mut Rng, merged: &Path, fds: &mut Vec<libc::c_int>, buf: &mut [u8]) -> bool {
    let p = rand_path(r, merged);
    let c = cstr(&p);
    let fd = if fds.is_empty() {
        -1
    } else {
        fds[r.index(fds.len())]
    };
    // SAFETY (for every call below): plain system calls on NUL-terminated paths, on fds this
    // thread opened, and into buffers at least as long as the length passed.
    let mut res: i64 = -1;
    unsafe {
        match r.index(34) {
            0..=3 => {
                let flags = rand_open_flags(r);
                let mode = (r.next() & 0o7777) as libc::c_uint;
                let target = if flags & libc::O_TMPFILE == libc::O_TMPFILE {
                    cstr(&merged.join(*r.pick(&["", "dir", "ld"])))
                } else {
                    c.clone()
                };
                let f = libc::open(target.as_ptr(), flags, mode);
                res = f as i64;
                if f >= 0 {
                    fds.push(f);
                }
            }
            4 => {
                if !fds.is_empty() {
                    let i = r.index(fds.len());
                    res = libc::close(fds.swap_remove(i)) as i64;
                }
            }
            5 => {
                let n = r.index(buf.len());
                res = libc::read(fd, buf.as_mut_ptr().cast(), n) as i64;
            }
            6 => {
                let n = r.index(buf.len());
                res = libc::pread(fd, buf.as_mut_ptr().cast(), n, r.offset() as i64) as i64;
            }
            7 => {
                let n = r.index(4096);
                res = libc::write(fd, buf.as_ptr().cast(), n) as i64;
            }
            8 => {
                let n = r.index(8192);
                res = libc::pwrite(fd, buf.as_ptr().cast(), n, r.offset() as i64) as i64;
            }
            9 => {
                res = libc::truncate(c.as_ptr(), r.offset() as i64) as i64;
            }
            10 => {
                res = libc::ftruncate(fd, r.offset() as i64) as i64;
            }
            11 => {
                let q = cstr(&rand_path(r, merged));
                let flags = *r.pick(&[
                    0,
                    libc::RENAME_NOREPLACE,
                    libc::RENAME_EXCHANGE,
                    libc::RENAME_WHITEOUT,
                    libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE,
                    0x80,
                    u32::MAX,
                ]);
                res = libc::renameat2(
                    libc::AT_FDCWD,
                    c.as_ptr(),
                    libc::AT_FDCWD,
                    q.as_ptr(),
                    flags,
                ) as i64;
            }
            12 => {
                let n = rand_xattr_name(r);
                let len = *r.pick(&[0usize, 1, 100, 4096, 65536, 65537]);
                let v = vec![b'v'; len];
                let flags = *r.pick(&[0, libc::XATTR_CREATE, libc::XATTR_REPLACE, 7]);
                res = libc::lsetxattr(c.as_ptr(), n.as_ptr(), v.as_ptr().cast(), len, flags) as i64;
            }
            13 => {
                let n = rand_xattr_name(r);
                let len = *r.pick(&[0usize, 1, 2, 16, 65536]);
                res = libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), len) as i64;
            }
            14 => {
                let len = *r.pick(&[0usize, 1, 2, 5, 65536]);
                res = libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), len) as i64;
            }
            15 => {
                let n = rand_xattr_name(r);
                res = libc::lremovexattr(c.as_ptr(), n.as_ptr()) as i64;
            }
            16 => {
                // Odd modes; device numbers stay 0 so no real device is ever reachable.
                let kind = *r.pick(&[
                    libc::S_IFREG,
                    libc::S_IFIFO,
                    libc::S_IFSOCK,
                    libc::S_IFCHR,
                    libc::S_IFBLK,
                    libc::S_IFDIR,
                    libc::S_IFLNK,
                    0o030000,
                    0,
                ]);
                let mode = kind | (r.next() as u32 & 0o7777);
                res = libc::mknod(c.as_ptr(), mode, 0) as i64;
            }
            17 => {
                let len = *r.pick(&[0usize, 1, 255, 1024, 4095, 4096, 5000]);
                let t = CString::new("t".repeat(len)).unwrap();
                res = libc::symlink(t.as_ptr(), c.as_ptr()) as i64;
            }
            18 => {
                res = libc::mkdir(c.as_ptr(), (r.next() & 0o7777) as libc::mode_t) as i64;
            }
            19 => {
                res = libc::rmdir(c.as_ptr()) as i64;
            }
            20 => {
                res = libc::unlink(c.as_ptr()) as i64;
            }
            21 => {
                let q = cstr(&rand_path(r, merged));
                res = libc::link(c.as_ptr(), q.as_ptr()) as i64;
            }
            22 => {
                // readdir from a random offset.
                // Close-on-exec, as every fd this test opens: a program another test starts
                // meanwhile (the other fuzz test's daemon) would keep it, and this mount busy.
                let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
                let d = libc::open(c.as_ptr(), flags);
                if d >= 0 {
                    for _ in 0..1 + r.index(3) {
                        libc::lseek(d, r.offset() as i64, libc::SEEK_SET);
                        let n = 64 + r.index(buf.len() - 64);
                        res = libc::syscall(libc::SYS_getdents64, d, buf.as_mut_ptr(), n) as i64;
                    }
                    libc::close(d);
                }
            }
            23 => {
                let mode = *r.pick(&[
                    0,
                    libc::FALLOC_FL_KEEP_SIZE,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    libc::FALLOC_FL_ZERO_RANGE,
                    libc::FALLOC_FL_COLLAPSE_RANGE,
                    libc::FALLOC_FL_INSERT_RANGE,
                    libc::FALLOC_FL_PUNCH_HOLE,
                    0x7f,
                ]);
                // At most 1 MiB is ever allocated.
                let len = if r.one_in(4) {
                    r.offset() as i64
                } else {
                    r.index(1 << 20) as i64
                };
                let len = if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
                    len
                } else {
                    len.clamp(-1, 1 << 20)
                };
                res = libc::fallocate(fd, mode, (r.offset() % (1 << 41)) as i64, len) as i64;
            }
            24 => {
                let other = if fds.is_empty() {
                    -1
                } else {
                    fds[r.index(fds.len())]
                };
                let mut off_in = r.offset() as i64;
                let mut off_out = r.offset() as i64;
                let use_off = r.one_in(2);
                let len = r.index(1 << 20);
                res = libc::copy_file_range(
                    fd,
                    if use_off {
                        &mut off_in
                    } else {
                        std::ptr::null_mut()
                    },
                    other,
                    if use_off {
                        &mut off_out
                    } else {
                        std::ptr::null_mut()
                    },
                    len,
                    if r.one_in(10) { 1 } else { 0 },
                ) as i64;
            }
            25 => {
                let whence = *r.pick(&[
                    libc::SEEK_SET,
                    libc::SEEK_CUR,
                    libc::SEEK_END,
                    libc::SEEK_DATA,
                    libc::SEEK_HOLE,
                    9,
                ]);
                res = libc::lseek(fd, r.offset() as i64, whence) as i64;
            }
            26 => {
                const NSEC: &[libc::c_long] = &[
                    libc::UTIME_NOW,
                    libc::UTIME_OMIT,
                    0,
                    999_999_999,
                    1_000_000_000,
                    -1,
                ];
                let ts = [
                    libc::timespec {
                        tv_sec: r.next() as i64 >> r.index(64),
                        tv_nsec: *r.pick(NSEC),
                    },
                    libc::timespec {
                        tv_sec: r.next() as i64 >> r.index(64),
                        tv_nsec: *r.pick(NSEC),
                    },
                ];
                let flags = *r.pick(&[0, libc::AT_SYMLINK_NOFOLLOW, 0x4000]);
                res = libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), flags) as i64;
            }
            27 => {
                let cmd = *r.pick(&[
                    libc::F_SETLK,
                    libc::F_GETLK,
                    libc::F_OFD_SETLK,
                    libc::F_OFD_GETLK,
                ]);
                let mut fl: libc::flock = std::mem::zeroed();
                fl.l_type = *r.pick(&[libc::F_RDLCK, libc::F_WRLCK, libc::F_UNLCK, 7]) as i16;
                fl.l_whence = *r.pick(&[libc::SEEK_SET, libc::SEEK_CUR, libc::SEEK_END]) as i16;
                fl.l_start = r.offset() as i64;
                fl.l_len = r.offset() as i64;
                res = libc::fcntl(fd, cmd, &mut fl) as i64;
            }
            28 => {
                res = libc::flock(
                    fd,
                    *r.pick(&[libc::LOCK_SH, libc::LOCK_EX, libc::LOCK_UN]) | libc::LOCK_NB,
                ) as i64;
            }
            29 => {
                res = libc::chmod(c.as_ptr(), (r.next() & 0o7777) as libc::mode_t) as i64;
            }
            30 => {
                let (ru, rg) = (r.next() as u32, r.next() as u32);
                let uid = *r.pick(&[0u32, 1, 65534, u32::MAX, ru]);
                let gid = *r.pick(&[0u32, 1, 65534, u32::MAX, rg]);
                res = libc::lchown(c.as_ptr(), uid, gid) as i64;
            }
            31 => {
                let mut st: libc::stat = std::mem::zeroed();
                res = libc::lstat(c.as_ptr(), &mut st) as i64;
                let mut sfs: libc::statfs = std::mem::zeroed();
                libc::statfs(c.as_ptr(), &mut sfs);
                libc::readlink(c.as_ptr(), buf.as_mut_ptr().cast(), r.index(8));
            }
            32 => {
                if r.one_in(2) {
                    res = libc::fsync(fd) as i64;
                } else {
                    res = libc::fdatasync(fd) as i64;
                }
            }
            _ => {
                res = libc::access(c.as_ptr(), r.index(16) as libc::c_int) as i64;
            }
        }
    }
    // Keep the number of open files small.
    while fds.len() > 16 {
        let i = r.index(fds.len());
        // SAFETY: an fd this thread opened and still owns.
        unsafe { libc::close(fds.swap_remove(i)) };
    }
    res >= 0
}

fn fuzz_layers() -> Layers {
    let l = Layers::new(2);
    l.lower(0)
        .file("a", "lower a")
        .file("lf", &"0123456789".repeat(1000))
        .file("ld/inner", "inner")
        .file("ld/deep/n", "n")
        .symlink("ls", "lf")
        .whiteout("wh")
        .dir("sub")
        .xattr("lf", "user.k", b"v");
    l.lower(1)
        .file("b", "lower1 b")
        .file("wh", "hidden")
        .file("ld/below", "below")
        .file("sub/q", "q")
        .opaque_xattr("dir", "trusted.overlay.opaque")
        .file("dir/x", "x");
    l
}

fn fuzz_one_mount(extra: &[&str], what: &str, ops_per_thread: u64, threads: u64) {
    let seed = base_seed(what);
    let l = fuzz_layers();
    let mut d = Daemon::start(&l, "m", extra);
    let merged = d.merged.clone();
    let (tx, rx) = mpsc::channel();
    let mut handles = Vec::new();
    for t in 0..threads {
        let merged = merged.clone();
        let tx = tx.clone();
        let tseed = seed.wrapping_add(t.wrapping_mul(0x1000_0000_0001));
        handles.push(std::thread::spawn(move || {
            let mut r = Rng(tseed);
            let mut fds = Vec::new();
            let mut buf = vec![0u8; 1 << 16];
            let mut ok = 0u64;
            for _ in 0..ops_per_thread {
                ok += one_op(&mut r, &merged, &mut fds, &mut buf) as u64;
            }
            for f in fds {
                // SAFETY: fds this thread opened.
                unsafe { libc::close(f) };
            }
            let _ = tx.send(ok);
        }));
    }
    drop(tx);
    // A deadline only against a hung daemon: abort the connection so the threads return.
    let deadline = Instant::now() + Duration::from_secs(env_num("UNIONMOUNT_FUZZ_DEADLINE", 900));
    let mut done = 0;
    let mut succeeded = 0;
    let mut hung = false;
    while done < threads {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(n) => {
                done += 1;
                succeeded += n;
            }
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() > deadline => {
                hung = true;
                d.abort_connection();
                break;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    for h in handles {
        let _ = h.join();
    }
    assert!(!hung, "{what} (seed {seed}): the daemon stopped answering");
    let alive = d.alive();
    let log = d.log_text();
    assert!(
        alive,
        "{what} (seed {seed}): the daemon died: {:?}\n{log}",
        d.child.try_wait()
    );
    assert!(
        !log.contains("panicked"),
        "{what} (seed {seed}): the daemon panicked:\n{log}"
    );
    let st = fs::metadata(&merged);
    assert!(
        st.as_ref().is_ok_and(|m| m.is_dir()),
        "{what} (seed {seed}): the mount no longer answers stat: {st:?}"
    );
    assert!(
        fs::read_dir(&merged).is_ok(),
        "{what} (seed {seed}): readdir of the root fails"
    );
    // A clean unmount ends the daemon with status 0.
    run_ok(
        Command::new("fusermount3").arg("-u").arg(&merged),
        "fusermount3 -u",
    );
    let st = d.child.wait().unwrap();
    let log = d.log_text();
    assert!(
        !log.contains("panicked"),
        "{what} (seed {seed}): the daemon panicked:\n{log}"
    );
    assert!(st.success(), "{what}: daemon exit status {st}: {log}");
    let lines: Vec<&str> = log.lines().collect();
    eprintln!(
        "{what}: the daemon logged {} line(s){}{}",
        lines.len(),
        if lines.is_empty() { "" } else { ", first: " },
        lines
            .iter()
            .take(3)
            .copied()
            .collect::<Vec<_>>()
            .join(" | ")
    );
    eprintln!(
        "{what}: {threads} threads x {ops_per_thread} operations ({succeeded} succeeded), daemon alive and answering"
    );
}

#[test]
fn request_handlers_survive_random_syscalls() {
    let ops = env_num("UNIONMOUNT_FUZZ_OPS", 10_000);
    fuzz_one_mount(&[], "handlers (default)", ops, 4);
}

#[test]
fn request_handlers_survive_random_syscalls_without_passthrough() {
    let ops = env_num("UNIONMOUNT_FUZZ_OPS", 10_000);
    fuzz_one_mount(
        &["--passthrough", "off", "-o", "xattr_permissions=2"],
        "handlers (page cache, xattr_permissions=2)",
        ops,
        4,
    );
}

/// A non-UTF-8 mountpoint name is only a path: refused as missing, not a panic.
#[test]
fn non_utf8_paths_are_refused_cleanly() {
    let l = Layers::new(1);
    let mp = l.root().join(OsStr::from_bytes(b"m\xff\xfe"));
    let out = run_unionmount(&[
        OsString::from("--lower"),
        l.lowers[0].clone().into(),
        mp.clone().into(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert!(err.contains("mountpoint"), "{err:?}");
    assert!(!is_mounted(&mp));
}
