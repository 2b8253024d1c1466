//! Crash safety and durability (SPEC §3 "Copy-up", §6 "kill -9 of the daemon at any moment").
//!
//! `crash_rounds` mounts unionmount in the foreground as a child process, runs a script of
//! copy-ups of large files (in-place writes and a chmod), renames (lower and upper files, an
//! upper directory, replacing a lower file, with parent copy-up), unlink+rmdir of merged and
//! lower-only directories (whiteouts, an opaque re-created directory) and unlinks of lower
//! files (whiteouts), in an order shuffled per round, and `kill -9`s the daemon after a random
//! delay from a seeded PRNG. After every kill the dead mount is detached, the same layers are
//! mounted again, and:
//! - the merged view equals the model of the script after the last completed operation or
//!   after the one in flight (so every file is its old or its new complete content, compared by
//!   hash; every renamed entry exists exactly once; no work-dir entry shows);
//! - the work directory has been emptied by the new mount;
//! - kernel overlayfs mounted over the same lowers, upper and work directory shows the same
//!   tree (names, types, modes, owners, content);
//! - the rest of the script then runs to completion on a new unionmount and gives the final
//!   model.
//!
//! One round in three aims the kill at a copy-up of a large file (64 MiB, 16 MiB and
//! 32 MiB lower files by default); the others at any operation. A failure names the seed and
//! the round.
//!
//! Short form (the default, 10 kills): `cargo test --test crash`. Long form, e.g. 500 kills,
//! with a chosen seed and size of the largest file (also `scripts/crash.sh ROUNDS SEED MIB`):
//!
//! ```text
//! UNIONMOUNT_CRASH_ROUNDS=500 UNIONMOUNT_CRASH_SEED=7 UNIONMOUNT_CRASH_MIB=200 \
//!     cargo test --release --test crash -- --nocapture --exact crash_rounds
//! ```
//!
//! The durability tests kill the daemon right after `fsync` returned and read the upper file
//! from disk; with `strace` installed they also check that the daemon calls fsync on the upper
//! file (and on a copy-up before it is renamed into place), and that `fsync=0` turns that off.
//! `kill9_of_background_daemon` does the kill to the forked daemon of the default mode.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::hash::{DefaultHasher, Hasher};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// A daemon in the foreground, as a child process of the test (so its pid is exact).
// ---------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// PRNG, content, views
// ---------------------------------------------------------------------------------------

fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng(seed);
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        v.extend_from_slice(&r.next().to_le_bytes());
    }
    v.truncate(n);
    v
}

/// Content above this size is hashed by `md5sum` (fast; test code is built unoptimised).
const BIG_HASH: usize = 256 << 10;

fn md5(out: std::process::Output) -> u64 {
    assert!(out.status.success(), "md5sum failed");
    let hex = String::from_utf8(out.stdout).unwrap();
    u64::from_str_radix(&hex[..16], 16).unwrap()
}

fn hash_bytes(b: &[u8]) -> u64 {
    if b.len() > BIG_HASH {
        let mut c = Command::new("md5sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("md5sum");
        c.stdin.take().unwrap().write_all(b).unwrap();
        return md5(c.wait_with_output().unwrap());
    }
    let mut h = DefaultHasher::new();
    h.write(b);
    h.write_u64(b.len() as u64);
    h.finish()
}

fn hash_file(p: &Path) -> u64 {
    let len = fs::symlink_metadata(p).unwrap().len() as usize;
    if len > BIG_HASH {
        return md5(Command::new("md5sum").arg(p).output().expect("md5sum"));
    }
    let mut b = Vec::new();
    File::open(p)
        .and_then(|mut f| f.read_to_end(&mut b))
        .unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    hash_bytes(&b)
}

/// One object of a merged view: type, mode (non-directories), owner and a content hash
/// (file data, symlink target, device number).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Ent {
    kind: char,
    mode: u32,
    owner: (u32, u32),
    hash: u64,
}

type View = BTreeMap<String, Ent>;

fn view(root: &Path) -> View {
    let mut out = View::new();
    fn go(root: &Path, p: &Path, out: &mut View) {
        for e in fs::read_dir(p).unwrap_or_else(|e| panic!("readdir {}: {e}", p.display())) {
            let path = e.unwrap().path();
            let m = fs::symlink_metadata(&path)
                .unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
            let ft = m.file_type();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let (kind, hash) = if ft.is_dir() {
                ('d', 0)
            } else if ft.is_file() {
                ('f', hash_file(&path))
            } else if ft.is_symlink() {
                (
                    'l',
                    hash_bytes(fs::read_link(&path).unwrap().as_os_str().as_bytes()),
                )
            } else if ft.is_char_device() {
                ('c', m.rdev())
            } else {
                ('o', m.rdev())
            };
            let mode = if kind == 'd' { 0 } else { m.mode() & 0o7777 };
            out.insert(
                rel,
                Ent {
                    kind,
                    mode,
                    owner: (m.uid(), m.gid()),
                    hash,
                },
            );
            if kind == 'd' {
                go(root, &path, out);
            }
        }
    }
    go(root, root, &mut out);
    out
}

fn diff(a: &View, b: &View) -> String {
    let mut s = String::new();
    for (k, v) in a {
        match b.get(k) {
            None => s += &format!("  only in first: {k} {v:?}\n"),
            Some(w) if w != v => s += &format!("  differs: {k} {v:?} vs {w:?}\n"),
            _ => {}
        }
    }
    for (k, v) in b {
        if !a.contains_key(k) {
            s += &format!("  only in second: {k} {v:?}\n");
        }
    }
    s
}

// ---------------------------------------------------------------------------------------
// The script and its model
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    /// Overwrite 4 KiB in the middle of a large lower file (copy-up of all its data).
    Modify(&'static str),
    Chmod(&'static str, u32),
    Rename(&'static str, &'static str),
    Unlink(&'static str),
    Rmdir(&'static str),
    Mkdir(&'static str),
}

const BIGS: [&str; 3] = ["big0", "big1", "big2"];
const MARK_LEN: usize = 4096;

fn groups() -> Vec<Vec<Op>> {
    use Op::*;
    vec![
        // (a) copy-ups of large files
        vec![Modify("big0"), Modify("big1"), Chmod("big2", 0o600)],
        // (b) renames
        vec![
            Rename("r0", "r0.new"),
            Rename("u0", "u0.new"),
            Rename("udir", "udir.new"),
            Rename("r1", "tgt0"),
            Rename("u1", "r2"),
            Rename("deep/a/b/r3", "deep/r3.moved"),
        ],
        // (c) rmdir of merged and lower-only directories, and an opaque re-creation
        vec![
            Unlink("m0/a"),
            Unlink("m0/b"),
            Unlink("m0/c"),
            Unlink("m0/u"),
            Rmdir("m0"),
            Mkdir("m0"),
            Unlink("m1/a"),
            Unlink("m1/b"),
            Unlink("m1/c"),
            Rmdir("m1"),
            Unlink("ld/x"),
            Unlink("ld/y"),
            Rmdir("ld"),
        ],
        // (d) whiteouts
        vec![
            Unlink("w0"),
            Unlink("w1"),
            Unlink("w2"),
            Unlink("w3"),
            Unlink("w4"),
            Unlink("wdeep/a/b/w5"),
        ],
    ]
}

/// The groups interleaved in a random order (each group keeps its own order).
fn script(rng: &mut Rng) -> Vec<Op> {
    let mut gs: Vec<std::collections::VecDeque<Op>> =
        groups().into_iter().map(|g| g.into()).collect();
    let mut out = Vec::new();
    while gs.iter().any(|g| !g.is_empty()) {
        let live: Vec<usize> = (0..gs.len()).filter(|&i| !gs[i].is_empty()).collect();
        let i = live[rng.below(live.len() as u64) as usize];
        out.push(gs[i].pop_front().unwrap());
    }
    out
}

struct Fixture {
    layers: Layers,
    /// Hash of each large file after its `Modify`.
    new_hash: BTreeMap<&'static str, u64>,
}

fn mark_offset(len: usize) -> u64 {
    ((len / 2) & !(MARK_LEN - 1)) as u64
}

fn fixture(mib: usize) -> Fixture {
    let layers = Layers::new(2);
    let top = layers.lower(0);
    let bottom = layers.lower(1);
    let len = mib << 20;
    let mut new_hash = BTreeMap::new();
    // One file of the full size, two smaller ones (a quarter and a half).
    for (i, b) in BIGS.iter().enumerate() {
        let len = [len, len / 4, len / 2][i];
        let mut data = bytes(len, 1000 + i as u64);
        top.file_bytes(b, &data);
        let off = mark_offset(len) as usize;
        data[off..off + MARK_LEN].copy_from_slice(&bytes(MARK_LEN, 2000 + i as u64));
        new_hash.insert(*b, hash_bytes(&data));
    }
    for n in ["r0", "r1", "r2", "tgt0", "w0", "w1", "w2", "w3", "w4"] {
        top.file(n, &format!("lower {n}\n"));
    }
    top.file("deep/a/b/r3", "lower r3\n")
        .file("wdeep/a/b/w5", "lower w5\n")
        .file("wdeep/a/b/keep", "keep\n")
        .file("ld/x", "x\n")
        .file("ld/y", "y\n")
        .file("m0/c", "top c\n")
        .file("m1/c", "top c\n");
    bottom
        .file("m0/a", "bottom a\n")
        .file("m0/b", "bottom b\n")
        .file("m1/a", "bottom a\n")
        .file("m1/b", "bottom b\n")
        .file("r2", "bottom r2\n")
        .file("w4", "bottom w4\n");
    Fixture { layers, new_hash }
}

/// Upper-only objects, written straight into a fresh upper before the mount.
fn seed_upper(upper: &Path) {
    let up = LayerBuilder {
        root: upper.to_path_buf(),
    };
    up.file("u0", "upper u0\n")
        .file("u1", "upper u1\n")
        .file("udir/k1", "k1\n")
        .file("udir/sub/k2", "k2\n")
        .file("m0/u", "upper u\n");
}

fn apply_model(v: &mut View, op: &Op, fx: &Fixture) {
    match op {
        Op::Modify(n) => {
            v.get_mut(*n).expect("in the model").hash = fx.new_hash[n];
        }
        Op::Chmod(n, mode) => v.get_mut(*n).expect("in the model").mode = *mode,
        Op::Rename(from, to) => {
            let moved: Vec<(String, Ent)> = v
                .iter()
                .filter(|(k, _)| *k == from || k.starts_with(&format!("{from}/")))
                .map(|(k, e)| (k.clone(), e.clone()))
                .collect();
            assert!(!moved.is_empty(), "model: {from} missing");
            v.remove(*to);
            for (k, e) in moved {
                v.remove(&k);
                v.insert(format!("{to}{}", &k[from.len()..]), e);
            }
        }
        Op::Unlink(n) | Op::Rmdir(n) => {
            assert!(v.remove(*n).is_some(), "model: {n} missing");
        }
        Op::Mkdir(n) => {
            v.insert(
                n.to_string(),
                Ent {
                    kind: 'd',
                    mode: 0,
                    owner: (0, 0),
                    hash: 0,
                },
            );
        }
    }
}

fn run_op(merged: &Path, op: &Op) -> std::io::Result<()> {
    let p = |n: &str| merged.join(n);
    match op {
        Op::Modify(n) => {
            let f = OpenOptions::new().write(true).open(p(n))?;
            let len = f.metadata()?.len() as usize;
            let i = BIGS.iter().position(|b| b == n).unwrap() as u64;
            f.write_all_at(&bytes(MARK_LEN, 2000 + i), mark_offset(len))?;
            drop(f);
            Ok(())
        }
        Op::Chmod(n, mode) => fs::set_permissions(p(n), fs::Permissions::from_mode(*mode)),
        Op::Rename(a, b) => fs::rename(p(a), p(b)),
        Op::Unlink(n) => fs::remove_file(p(n)),
        Op::Rmdir(n) => fs::remove_dir(p(n)),
        Op::Mkdir(n) => fs::create_dir(p(n)),
    }
}

/// Runs `ops[from..]` in a thread; `done` counts completed operations. Returns the first
/// error (with the index of its operation).
fn run_script(
    merged: PathBuf,
    ops: Vec<Op>,
    from: usize,
    done: Arc<AtomicUsize>,
) -> mpsc::Receiver<Option<(usize, std::io::Error)>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut res = None;
        for (i, op) in ops.iter().enumerate().skip(from) {
            if let Err(e) = run_op(&merged, op) {
                res = Some((i, e));
                break;
            }
            done.store(i + 1, Ordering::SeqCst);
        }
        let _ = tx.send(res);
    });
    rx
}

fn models(initial: &View, ops: &[Op], fx: &Fixture) -> Vec<View> {
    let mut out = vec![initial.clone()];
    for op in ops {
        let mut v = out.last().unwrap().clone();
        apply_model(&mut v, op, fx);
        out.push(v);
    }
    out
}

fn assert_work_empty(work: &Path, when: &str) {
    let w = work.join("work");
    let left = if w.exists() { names(&w) } else { Vec::new() };
    assert!(left.is_empty(), "{when}: work dir not empty: {left:?}");
}

fn mount_kernel_over(layers: &Layers, base: &Path) -> Mount {
    Mount::kernel(
        &layers.lowerdir_opt(),
        &base.join("upper"),
        &base.join("work"),
        &base.join("merged"),
        &[],
    )
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn ignore_owner(v: &View) -> View {
    v.iter()
        .map(|(k, e)| {
            let mut e = e.clone();
            if e.kind == 'd' {
                e.owner = (0, 0);
            }
            (k.clone(), e)
        })
        .collect()
}

#[test]
fn crash_rounds() {
    let rounds = env_num("UNIONMOUNT_CRASH_ROUNDS", 10) as usize;
    let seed = env_num("UNIONMOUNT_CRASH_SEED", 0x5eed_c4a5);
    let mib = env_num("UNIONMOUNT_CRASH_MIB", 64) as usize;
    eprintln!("crash_rounds: {rounds} rounds, seed {seed}, large files {mib} MiB");
    let t_start = Instant::now();
    let fx = fixture(mib);
    eprintln!("crash_rounds: layers built in {:?}", t_start.elapsed());
    let layers = &fx.layers;
    let lowers_before: Vec<View> = layers.lowers.iter().map(|l| view(l)).collect();
    let mut rng = Rng(seed);

    // Round 0: no kill. Gives the initial view, checks the model against a full run and
    // against kernel overlayfs, and times the script for choosing kill moments.
    let base = layers.mkdir("calibrate");
    seed_upper(&base.join("upper"));
    let ops = script(&mut rng);
    let mut d = ForegroundDaemon::start(layers, &base, &[]);
    let initial = ignore_owner(&view(&d.merged));
    let model = models(&initial, &ops, &fx);
    let t0 = Instant::now();
    let mut op_time: BTreeMap<String, Duration> = BTreeMap::new();
    for op in &ops {
        let t = Instant::now();
        run_op(&d.merged, op).unwrap_or_else(|e| panic!("calibration: {op:?} failed: {e}"));
        op_time.insert(format!("{op:?}"), t.elapsed());
    }
    let took = t0.elapsed();
    let end = ignore_owner(&view(&d.merged));
    assert!(
        end == model[ops.len()],
        "calibration: final view differs from the model:\n{}",
        diff(&end, &model[ops.len()])
    );
    d.unmount().unwrap_or_else(|e| panic!("calibration: {e}"));
    assert_work_empty(&base.join("work"), "after a clean unmount");
    {
        let _k = mount_kernel_over(layers, &base);
        let kv = ignore_owner(&view(&base.join("merged")));
        assert!(
            kv == end,
            "kernel overlayfs disagrees after a clean run:\n{}",
            diff(&end, &kv)
        );
    }
    fs::remove_dir_all(&base).unwrap();
    eprintln!(
        "crash_rounds: script of {} ops took {took:?} unkilled",
        ops.len()
    );

    let mut hist = vec![0usize; ops.len() + 1];
    // Kills that hit a copy-up of a large file, and kills whose in-flight operation had
    // already taken effect.
    // Kills that left entries in the work directory for the next mount to clean.
    let (mut in_copy_up, mut landed, mut leftovers) = (0, 0, 0);
    for round in 0..rounds {
        let ops = script(&mut rng);
        let model = models(&initial, &ops, &fx);
        // The kill lands while a chosen operation runs: wait for the ones before it, then
        // up to 1.5 times its unkilled duration.
        // One round in three aims at a copy-up of a large file (the longest window).
        let big: Vec<usize> = (0..ops.len())
            .filter(|&i| matches!(ops[i], Op::Modify(_) | Op::Chmod(..)))
            .collect();
        let target = if rng.below(3) == 0 {
            big[rng.below(big.len() as u64) as usize]
        } else {
            rng.below(ops.len() as u64 + 1) as usize
        };
        let span = ops
            .get(target)
            .map_or(Duration::from_millis(1), |op| op_time[&format!("{op:?}")]);
        let delay = Duration::from_nanos(rng.below(span.mul_f64(1.5).as_nanos() as u64 + 1));
        let ctx =
            format!("seed {seed} round {round} (kill {delay:?} after the start of op {target})");
        let base = layers.mkdir(&format!("round{round}"));
        seed_upper(&base.join("upper"));

        let mut d = ForegroundDaemon::start(layers, &base, &[]);
        let done = Arc::new(AtomicUsize::new(0));
        let rx = run_script(d.merged.clone(), ops.clone(), 0, done.clone());
        // (A script that fails early never gets there: the kill then comes after the bound
        // and the failure is reported below.)
        let bound = Instant::now() + Duration::from_secs(30);
        while done.load(Ordering::SeqCst) < target && Instant::now() < bound {
            std::thread::sleep(Duration::from_micros(50));
        }
        std::thread::sleep(delay);
        let before_kill = done.load(Ordering::SeqCst);
        d.kill9();
        let res = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("{ctx}: the script hung after the daemon was killed"));
        let k = done.load(Ordering::SeqCst);
        if let Some((i, e)) = &res {
            // Only the kill may fail an operation.
            let code = e.raw_os_error().unwrap_or(0);
            assert!(
                *i >= before_kill
                    && matches!(code, libc::ENOTCONN | libc::ECONNABORTED | libc::EIO),
                "{ctx}: {:?} failed before the kill: {e}",
                ops[*i]
            );
        }
        hist[k] += 1;
        let w = base.join("work/work");
        if w.exists() && !names(&w).is_empty() {
            leftovers += 1;
        }

        // Remount: consistent view, work dir cleaned.
        let mut d = ForegroundDaemon::start(layers, &base, &[]);
        assert_work_empty(&base.join("work"), &format!("{ctx}: after the remount"));
        let v = ignore_owner(&view(&d.merged));
        let j = if v == model[k] {
            k
        } else if k < ops.len() && v == model[k + 1] {
            k + 1
        } else {
            let next = if k < ops.len() {
                format!("{:?}", ops[k])
            } else {
                "none".into()
            };
            let after = model.get(k + 1).map_or(String::new(), |m| diff(&v, m));
            panic!(
                "{ctx}: after {k} completed ops (in flight: {next}) the remounted view is \
                 neither the state before nor after the op in flight.\nview vs before:\n{}\
                 view vs after:\n{after}\nops: {ops:?}",
                diff(&v, &model[k])
            );
        };
        if ops
            .get(k)
            .is_some_and(|op| matches!(op, Op::Modify(_) | Op::Chmod(..)))
        {
            in_copy_up += 1;
        }
        if j > k {
            landed += 1;
        }
        d.unmount()
            .unwrap_or_else(|e| panic!("{ctx}: unmount after the check: {e}"));

        // Kernel overlayfs over the same layers shows the same tree.
        {
            let _k = mount_kernel_over(layers, &base);
            let kv = ignore_owner(&view(&base.join("merged")));
            assert!(
                kv == v,
                "{ctx}: kernel overlayfs disagrees with unionmount:\n{}",
                diff(&v, &kv)
            );
        }

        // The rest of the script runs on the leftovers and ends in the final state.
        let mut d = ForegroundDaemon::start(layers, &base, &[]);
        let rest = run_script(
            d.merged.clone(),
            ops.clone(),
            j,
            Arc::new(AtomicUsize::new(0)),
        )
        .recv()
        .unwrap();
        if let Some((i, e)) = rest {
            panic!(
                "{ctx}: after the crash, {:?} failed: {e}\n{}",
                ops[i],
                d.log()
            );
        }
        let end = ignore_owner(&view(&d.merged));
        assert!(
            end == model[ops.len()],
            "{ctx}: the finished script differs from the model:\n{}",
            diff(&end, &model[ops.len()])
        );
        d.unmount()
            .unwrap_or_else(|e| panic!("{ctx}: unmount after the rest: {e}"));
        assert!(!is_mounted(&base.join("merged")));
        fs::remove_dir_all(&base).unwrap();
    }
    let after: Vec<View> = layers.lowers.iter().map(|l| view(l)).collect();
    assert!(after == lowers_before, "a lower layer changed");
    eprintln!(
        "crash_rounds: {rounds} kills in {:?} ({in_copy_up} during a large copy-up, {landed} \
         after the operation in flight had taken effect, {leftovers} leaving work-dir entries); \
         kills by completed-op count: {hist:?}",
        t_start.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// Durability
// ---------------------------------------------------------------------------------------

fn read_upper(base: &Path, rel: &str) -> Vec<u8> {
    fs::read(base.join("upper").join(rel))
        .unwrap_or_else(|e| panic!("upper/{rel} after the kill: {e}"))
}

#[test]
fn fsync_then_kill_keeps_data() {
    let l = Layers::new(1);
    let low = bytes(1 << 20, 7);
    l.lower(0).file_bytes("low", &low).file_bytes("low2", &low);
    let base = l.mkdir("m");
    let mut d = ForegroundDaemon::start(&l, &base, &[]);

    // A new file, fsync'd, never closed.
    let data = bytes(3 << 20, 8);
    let mut f = File::create(d.merged.join("new")).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    // A copied-up file, modified and fdatasync'd.
    let g = OpenOptions::new()
        .write(true)
        .open(d.merged.join("low"))
        .unwrap();
    let patch = bytes(10_000, 9);
    g.write_all_at(&patch, 123_456).unwrap();
    g.sync_data().unwrap();
    // A rename after a copy-up by chmod, then fsync of the directory.
    fs::set_permissions(d.merged.join("low2"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::rename(d.merged.join("low2"), d.merged.join("low2.moved")).unwrap();
    File::open(&d.merged).unwrap().sync_all().unwrap();

    d.kill9();
    drop((f, g));
    assert_eq!(read_upper(&base, "new"), data, "fsync'd new file");
    let mut want = low.clone();
    want[123_456..123_456 + patch.len()].copy_from_slice(&patch);
    assert_eq!(read_upper(&base, "low"), want, "fdatasync'd copied-up file");
    assert_eq!(read_upper(&base, "low2.moved"), low, "renamed copy-up");
    let m = fs::metadata(base.join("upper/low2.moved")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o600);
    assert!(!base.join("upper/low2").exists() || is_whiteout(&base.join("upper/low2")));

    // And the view after a remount.
    let d2 = ForegroundDaemon::start(&l, &base, &[]);
    assert_eq!(fs::read(d2.merged.join("new")).unwrap(), data);
    assert_eq!(fs::read(d2.merged.join("low")).unwrap(), want);
    assert_eq!(fs::read(d2.merged.join("low2.moved")).unwrap(), low);
    assert!(!d2.merged.join("low2").exists());
}

fn is_whiteout(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == 0)
}

#[test]
fn fsync_opt_out_options_are_accepted() {
    for opt in ["fsync=0", "volatile", "fsync=1"] {
        let l = Layers::new(1);
        l.lower(0).file("low", "lower\n");
        let m = l.mount_with("m", &["-o", opt]);
        let mut f = File::create(m.path("new")).unwrap();
        f.write_all(b"data\n").unwrap();
        f.sync_all().unwrap();
        f.sync_data().unwrap();
        let g = OpenOptions::new().append(true).open(m.path("low")).unwrap();
        g.sync_all().unwrap();
        drop((f, g));
        assert_eq!(m.read("new"), "data\n", "-o {opt}");
    }
    // A bad value is an error.
    let l = Layers::new(1);
    let base = l.mkdir("bad");
    for d in ["upper", "work", "merged"] {
        fs::create_dir_all(base.join(d)).unwrap();
    }
    let mut args = native_args(
        &l.lower_paths(),
        Some(&base.join("upper")),
        Some(&base.join("work")),
        &base.join("merged"),
    );
    args.splice(0..0, ["-o".into(), "fsync=maybe".into()]);
    let out = run_unionmount(&args);
    assert!(!out.status.success(), "fsync=maybe was accepted");
    assert!(!is_mounted(&base.join("merged")));
}

fn have_strace() -> bool {
    Command::new("strace")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The fsync/fdatasync calls the daemon made on objects under `base`, as strace shows them.
fn traced_fsyncs(l: &Layers, name: &str, extra: &[&str]) -> Vec<String> {
    l.lower(0).file_bytes("low", &bytes(1 << 20, 3));
    l.lower(0).file("ro", "read only\n");
    for f in ["early", "early2"] {
        l.lower(0).file(f, "lower\n");
    }
    let base = l.mkdir(name);
    let trace = base.join("strace.out");
    let trace_s = trace.to_string_lossy().into_owned();
    let wrapper = [
        "strace",
        "-f",
        "-qq",
        "-y",
        "-e",
        "trace=fsync,fdatasync",
        "-o",
        &trace_s,
    ];
    let mut d = ForegroundDaemon::start_with(l, &base, extra, Some(&wrapper));
    let mut f = File::create(d.merged.join("new")).unwrap();
    f.write_all(b"new data\n").unwrap();
    f.sync_all().unwrap();
    let g = OpenOptions::new()
        .write(true)
        .open(d.merged.join("low"))
        .unwrap();
    g.write_all_at(b"patch", 10).unwrap();
    g.sync_data().unwrap();
    File::open(&d.merged).unwrap().sync_all().unwrap();
    // A read-only open of a lower file: nothing to sync.
    File::open(d.merged.join("ro")).unwrap().sync_all().unwrap();
    // Read-only opens made before another open copies the file up sync the copy: with
    // passthrough, through the file the daemon kept when the name moved to a new node; without,
    // through a new file reopened from the writer's while it is open, and by name once the
    // daemon has let the writer's file go (RELEASE comes in the background: waited for).
    // Only these syncs reach the copies.
    let daemon = fs::read_to_string(format!(
        "/proc/{0}/task/{0}/children",
        d.child.as_ref().expect("running").id()
    ))
    .unwrap()
    .split_whitespace()
    .next()
    .expect("strace runs the daemon")
    .to_string();
    let upper = base.join("upper");
    let daemon_files_of = |name: &str| {
        let want = upper.join(name);
        fs::read_dir(format!("/proc/{daemon}/fd"))
            .unwrap()
            .flatten()
            .filter(|e| fs::read_link(e.path()).is_ok_and(|t| t == want))
            .count()
    };
    let early = |name: &str, close_writer: bool| {
        let r = File::open(d.merged.join(name)).unwrap();
        let w = OpenOptions::new()
            .write(true)
            .open(d.merged.join(name))
            .unwrap();
        w.write_all_at(b"upper", 0).unwrap();
        let w = if close_writer {
            let open = daemon_files_of(name);
            drop(w);
            assert!(
                wait_until(Duration::from_secs(10), || daemon_files_of(name) < open),
                "the daemon kept the writer's file of {name}"
            );
            None
        } else {
            Some(w)
        };
        r.sync_all().unwrap();
        drop(w);
    };
    early("early", false);
    early("early2", true);
    drop((f, g));
    d.unmount().unwrap_or_else(|e| panic!("traced mount: {e}"));
    let root = l.root().to_string_lossy().into_owned();
    fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .filter(|s| s.contains("fsync(") || s.contains("fdatasync("))
        .filter(|s| s.contains(&root))
        .map(str::to_owned)
        .collect()
}

#[test]
fn daemon_calls_fsync_on_the_upper() {
    assert!(
        have_strace(),
        "strace is not installed (Debian/Ubuntu: apt-get install strace)"
    );
    let l = Layers::new(1);
    let calls = traced_fsyncs(&l, "traced", &[]);
    let upper = l.root().join("traced/upper");
    let work = l.root().join("traced/work/work");
    let on = |what: &Path, name: &str| {
        let want = format!("{}/{name}>", what.display());
        calls.iter().any(|c| c.contains(&want))
    };
    assert!(
        on(&upper, "new"),
        "no fsync of upper/new by the daemon: {calls:#?}"
    );
    assert!(
        on(&upper, "low"),
        "no fdatasync of the copied-up upper/low: {calls:#?}"
    );
    assert!(
        calls
            .iter()
            .any(|c| c.contains(&format!("{}>", upper.display()))),
        "fsync of the mount's root did not reach the upper directory: {calls:#?}"
    );
    for name in ["early", "early2"] {
        assert!(
            on(&upper, name),
            "a read-only open made before the copy-up did not sync upper/{name}: {calls:#?}"
        );
    }
    assert!(
        calls
            .iter()
            .any(|c| c.contains(&format!("{}/", work.display()))),
        "the copy-up was not fsync'd in the work dir before its rename: {calls:#?}"
    );
    let lower = format!("{}/", l.lowers[0].display());
    assert!(
        !calls.iter().any(|c| c.contains(&lower)),
        "the daemon fsync'd a lower file: {calls:#?}"
    );

    let l = Layers::new(1);
    let calls = traced_fsyncs(&l, "volatile", &["-o", "fsync=0"]);
    assert!(
        calls.is_empty(),
        "fsync=0 still fsyncs layer files: {calls:#?}"
    );
}

/// The pids of unionmount daemons serving `merged` (a unique temporary path).
fn daemons_of(merged: &Path) -> Vec<i32> {
    let want = merged.as_os_str().as_bytes();
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        let is_um = args
            .first()
            .is_some_and(|a| Path::new(std::ffi::OsStr::from_bytes(a)).ends_with("unionmount"));
        if is_um && args.contains(&want) {
            out.push(pid);
        }
    }
    out
}

/// The same for the forked background daemon (the default mode): found by its mountpoint,
/// killed, and its layers mounted again.
#[test]
fn kill9_of_background_daemon() {
    let l = Layers::new(1);
    let low = bytes(8 << 20, 11);
    l.lower(0).file_bytes("low", &low);
    let mut m = l.mount("bg");
    let pids = daemons_of(&m.merged);
    assert_eq!(pids.len(), 1, "daemon of {}: {pids:?}", m.merged.display());
    let f = OpenOptions::new().write(true).open(m.path("low")).unwrap();
    f.write_all_at(b"changed", 4096).unwrap();
    f.sync_all().unwrap();
    // SAFETY: the daemon this test started, found by its unique mountpoint.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    assert!(
        wait_until(Duration::from_secs(10), || daemons_of(&m.merged).is_empty()),
        "the daemon survived kill -9"
    );
    drop(f);
    // The fixture's unmount also takes a dead mount (lazily when it must).
    m.unmount();
    assert!(!is_mounted(&m.merged));
    let mut want = low.clone();
    want[4096..4096 + 7].copy_from_slice(b"changed");
    assert_eq!(fs::read(l.root().join("bg/upper/low")).unwrap(), want);
    let m2 = l.mount("bg");
    assert_eq!(fs::read(m2.path("low")).unwrap(), want);
    assert!(names(&l.root().join("bg/work/work")).is_empty());
}

/// The FUSE connection number of the mount at `merged`, from mountinfo (its device's minor).
fn connection_of(merged: &Path) -> Option<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = merged.to_string_lossy().replace(' ', "\\040");
    info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(4) == Some(&want.as_str())).then(|| f[2].strip_prefix("0:").map(String::from))?
    })
}

/// The states (from /proc/PID/task/*/stat) of the threads of `pid` named `name`.
fn thread_states(pid: i32, name: &str) -> Vec<char> {
    let mut out = Vec::new();
    for t in fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        if let Some(c) = stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next()) {
            out.push(c);
        }
    }
    out
}

/// Undoes what `a_killed_daemon_whose_thread_waits_for_a_directory_lock_frees_its_mount`
/// did to the machine, however it ends: aborts the outer connection (which frees whatever
/// still waits on it) and lets the stopped inner daemon go on.
struct Unstick {
    conn: Option<String>,
    stopped: i32,
}

impl Drop for Unstick {
    fn drop(&mut self) {
        if let Some(c) = &self.conn {
            let _ = fs::write(format!("/sys/fs/fuse/connections/{c}/abort"), "1");
        }
        // SAFETY: SIGCONT to the daemon this test stopped.
        unsafe { libc::kill(self.stopped, libc::SIGCONT) };
    }
}

/// A daemon killed with SIGKILL while one of its threads sleeps in the kernel waiting for a
/// directory's lock, which a request the daemon had read holds: that thread cannot end, so
/// the daemon kept its connection open, and the mount hung for good, with every process
/// that touched it (only aborting the connection by hand freed them). The daemon's watcher
/// aborts the connection as it dies, as the kernel does once a daemon's descriptors close.
/// Set up: the outer mount's second lower layer is another mount, whose daemon is stopped,
/// so that a lookup in a merged directory waits there (holding the directory's lock in the
/// kernel) while a copy-up of one name of a lower hard link has the outer daemon invalidate
/// the other name's entry in that directory.
#[test]
fn a_killed_daemon_whose_thread_waits_for_a_directory_lock_frees_its_mount() {
    let l = Layers::new(2);
    l.lower(0).file("d/f", "f").hardlink("d/f", "d/g");
    l.lower(1).file("d/other", "o");
    let inner_at = l.mkdir("inner");
    let inner_args: Vec<std::ffi::OsString> = vec![
        "--lower".into(),
        l.lowers[1].clone().into(),
        inner_at.clone().into(),
    ];
    let _inner = Mount::union(&inner_args, inner_at.clone(), None, None);
    let (upper, work, merged) = l.mount_dirs("outer");
    let mut lowers = l.lowers[0].clone().into_os_string();
    lowers.push(":");
    lowers.push(&inner_at);
    let outer_args: Vec<std::ffi::OsString> = vec![
        "--lower".into(),
        lowers,
        "--upper".into(),
        upper.clone().into(),
        "--work".into(),
        work.clone().into(),
        merged.clone().into(),
    ];
    let mut outer = Mount::union(&outer_args, merged.clone(), Some(upper), Some(work));
    let (inner_pid, outer_pid) = (daemons_of(&inner_at), daemons_of(&merged));
    assert_eq!((inner_pid.len(), outer_pid.len()), (1, 1), "the daemons");
    let (inner_pid, outer_pid) = (inner_pid[0], outer_pid[0]);
    // Both names of the hard link on one node, and the directory in the upper already.
    assert_eq!(fs::read(merged.join("d/f")).unwrap(), b"f");
    assert_eq!(fs::read(merged.join("d/g")).unwrap(), b"f");
    fs::write(merged.join("d/tmp"), "t").unwrap();
    fs::remove_file(merged.join("d/tmp")).unwrap();

    let _unstick = Unstick {
        conn: connection_of(&merged),
        stopped: inner_pid,
    };
    // SAFETY: SIGSTOP to the daemon this test started (Unstick continues it).
    unsafe { libc::kill(inner_pid, libc::SIGSTOP) };
    let (tx, rx) = mpsc::channel();
    let nope = merged.join("d/nope");
    std::thread::spawn(move || {
        let _ = tx.send(fs::symlink_metadata(&nope).map(drop));
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "the lookup did not wait for the stopped lower layer"
    );
    let f = merged.join("d/f");
    std::thread::spawn(move || {
        let _ = fs::set_permissions(&f, fs::Permissions::from_mode(0o600));
    });
    assert!(
        wait_until(Duration::from_secs(10), || thread_states(
            outer_pid,
            "invalidator"
        ) == ['D']),
        "the invalidation did not wait for the directory's lock: {:?}",
        thread_states(outer_pid, "invalidator")
    );

    // SAFETY: SIGKILL to the daemon this test started.
    unsafe { libc::kill(outer_pid, libc::SIGKILL) };
    let looked = rx.recv_timeout(Duration::from_secs(10));
    assert!(
        looked.is_ok(),
        "the lookup still waits 10 s after the daemon was killed: the mount hangs"
    );
    assert!(looked.unwrap().is_err(), "the lookup of a missing name");
    assert!(
        wait_until(Duration::from_secs(10), || daemons_of(&merged).is_empty()),
        "the killed daemon did not end"
    );
    outer.unmount();
    assert!(!is_mounted(&merged));
}

/// A bug that panics fails the one request it hit (EIO) and is logged; the daemon serves on
/// with all its threads. Debug builds answer a getxattr of a test name with a panic.
#[cfg(debug_assertions)]
#[test]
fn a_panic_fails_one_request_and_the_mount_serves_on() {
    let l = Layers::new(1);
    l.lower(0).file("lo", "x");
    let base = l.mkdir("m");
    // Two threads: without recovery, the third panic would leave none.
    let mut d = ForegroundDaemon::start(&l, &base, &["--threads", "2"]);
    for _ in 0..10 {
        assert_eq!(
            get_xattr(&d.merged.join("lo"), "user.unionmount.test.panic"),
            Err(libc::EIO)
        );
    }
    assert_eq!(fs::read_to_string(d.merged.join("lo")).unwrap(), "x");
    fs::write(d.merged.join("lo"), "y").unwrap();
    fs::write(d.merged.join("new"), "z").unwrap();
    assert_eq!(fs::read_to_string(base.join("upper/lo")).unwrap(), "y");
    assert_eq!(fs::read_to_string(base.join("upper/new")).unwrap(), "z");
    let log = d.log();
    assert_eq!(
        log.matches("failed with a panic; answered EIO").count(),
        10,
        "{log}"
    );
    assert_eq!(
        log.matches("a panic asked for by a test").count(),
        10,
        "{log}"
    );
    d.unmount().unwrap();
}

/// A panic in the middle of a copy-up leaves no half-built copy in the work directory. Debug
/// builds panic copying up a file with the test's xattr.
#[cfg(debug_assertions)]
#[test]
fn a_panic_in_a_copy_up_leaves_no_temporary_copy() {
    let l = Layers::new(1);
    l.lower(0).file("lo", "x").file("other", "o");
    set_xattr(&l.lower(0).path("lo"), "user.unionmount.test.panic", b"");
    let base = l.mkdir("m");
    let mut d = ForegroundDaemon::start(&l, &base, &[]);
    for _ in 0..3 {
        let err = fs::set_permissions(d.merged.join("lo"), fs::Permissions::from_mode(0o600));
        assert_eq!(err.unwrap_err().raw_os_error(), Some(libc::EIO));
        assert_eq!(names(&base.join("work/work")), Vec::<String>::new());
    }
    assert!(!base.join("upper/lo").exists());
    assert_eq!(fs::read_to_string(d.merged.join("lo")).unwrap(), "x");
    fs::write(d.merged.join("other"), "changed").unwrap();
    assert_eq!(
        fs::read_to_string(base.join("upper/other")).unwrap(),
        "changed"
    );
    d.unmount().unwrap();
}
