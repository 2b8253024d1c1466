//! In-process hot paths of the daemon, measured without FUSE in the way: name resolution down
//! a stack of 1, 10 and 500 layers, building a merged listing of about 10k entries, and the
//! whiteout / opaque checks every lookup and readdir makes.
//!
//! Layers are real directories in a temporary directory (`TMPDIR` decides where), so the
//! figures include the system calls the daemon makes, with dentries and inodes warm.
//!
//! Run with `cargo bench --bench hot_paths`; add `-- --quick` for a fast pass, or a filter
//! such as `-- lookup/`. `UM_BENCH_LAYERS="1 10 500"` sets the depths of the lookup stacks.

use std::ffi::{CStr, CString, OsStr};
use std::fs;
use std::hint::black_box;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use tempfile::TempDir;

use unionmount::fdcache::CachedDir;
use unionmount::layer::{Layer, Layers};
use unionmount::readdir::DirHandle;
use unionmount::sys;
use unionmount::union::{Options, Union};
use unionmount::whiteout::{self, Format};

/// Ordinary files in every layer of the lookup stacks, so that directories are not trivial.
const FILLER_PER_LAYER: usize = 20;

fn touch(p: &Path) {
    fs::write(p, b"x").expect("create file");
}

fn set_xattr(p: &Path, name: &CStr, value: &[u8]) -> bool {
    let c = CString::new(p.as_os_str().as_bytes()).expect("no NUL");
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        ) == 0
    }
}

/// A char 0/0 whiteout; falls back to the `.wh.NAME` form where mknod is refused.
fn whiteout_at(dir: &Path, name: &str) -> bool {
    let c = CString::new(dir.join(name).as_os_str().as_bytes()).expect("no NUL");
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, 0) } == 0 {
        true
    } else {
        fs::write(dir.join(format!(".wh.{name}")), b"").expect("create .wh. file");
        false
    }
}

fn layers(lowers: &[&Path], upper: Option<&Path>) -> Layers {
    Layers {
        lowers: lowers
            .iter()
            .map(|p| Layer::open_root(p).expect("open layer"))
            .collect(),
        upper: upper.map(|p| Layer::open_root(p).expect("open upper")),
        work: None,
        format: Format::Trusted,
        rename_whiteout: false,
        upper_acls: true,
        upper_noatime: None,
    }
}

fn union_of(lowers: &[&Path], upper: Option<&Path>) -> Union {
    Union::new(layers(lowers, upper), Options::default()).expect("build union")
}

/// `n` lower layers, top-most first: every layer has the merged directory `d` and some filler;
/// the top layer has `top.txt`, the bottom layer `bottom.txt` and `d/deep.txt`.
fn lookup_stack(n: usize) -> (TempDir, Union) {
    let tmp = tempfile::Builder::new()
        .prefix("um-bench-lookup")
        .tempdir()
        .expect("tempdir");
    let mut paths = Vec::with_capacity(n);
    for i in 0..n {
        let l = tmp.path().join(format!("l{i}"));
        fs::create_dir_all(l.join("d")).expect("mkdir");
        for j in 0..FILLER_PER_LAYER {
            touch(&l.join(format!("f{i}_{j}")));
        }
        touch(&l.join("d").join(format!("g{i}")));
        paths.push(l);
    }
    touch(&paths[0].join("top.txt"));
    touch(&paths[n - 1].join("bottom.txt"));
    touch(&paths[n - 1].join("d").join("deep.txt"));
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let u = union_of(&refs, None);
    (tmp, u)
}

fn bench_lookup(c: &mut Criterion) {
    // The daemon raises its fd limit at start; the fd cache is sized from it.
    sys::raise_nofile_limit();
    let mut g = c.benchmark_group("lookup");
    // `UM_BENCH_LAYERS="1 10 500"` (the default) chooses the stack depths.
    let depths: Vec<usize> = std::env::var("UM_BENCH_LAYERS")
        .ok()
        .map(|v| {
            v.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .filter(|v: &Vec<usize>| !v.is_empty() && !v.contains(&0))
        .unwrap_or_else(|| vec![1, 10, 500]);
    for n in depths {
        if n >= 100 {
            // Milliseconds per lookup: a few equal samples, not criterion's growing ramp.
            g.sampling_mode(SamplingMode::Flat).sample_size(10);
        }
        let (_tmp, u) = lookup_stack(n);
        let root = u.table.root();
        let d = u.lookup(&root, OsStr::new("d")).expect("lookup d");
        // Warm the directory fd caches once, as a running mount would have them.
        let _ = u.probe(&root, OsStr::new("absent"));
        let _ = u.probe(&d, OsStr::new("absent"));
        let cases: [(&str, &Arc<unionmount::inode::Node>, &str, bool); 5] = [
            ("top_hit", &root, "top.txt", true),
            ("bottom_hit", &root, "bottom.txt", true),
            ("miss", &root, "absent", false),
            ("merged_dir", &root, "d", true),
            ("subdir_bottom_hit", &d, "deep.txt", true),
        ];
        for (name, parent, child, exists) in cases {
            assert_eq!(
                u.probe(parent, OsStr::new(child)).expect("probe").is_some(),
                exists,
                "{name} with {n} layers"
            );
            g.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter(|| black_box(u.probe(parent, black_box(OsStr::new(child)))))
            });
        }
    }
    g.finish();
}

/// Upper plus two lowers merging to 10,000 names, with shadowing and both whiteout forms.
///
/// bottom: n0..n5999; mid: n4500..n7499 (1500 shadow bottom), `.wh.n0`..`.wh.n499`;
/// upper: n7000..n9499 (500 shadow mid), char 0/0 (or `.wh.`) whiteouts for n500..n999.
/// Merged: n1000..n9499 plus upper-only n9500..n10999 = 10,000 names.
fn merge_tree() -> (TempDir, Union, usize) {
    let tmp = tempfile::Builder::new()
        .prefix("um-bench-readdir")
        .tempdir()
        .expect("tempdir");
    let (bottom, mid, upper) = (
        tmp.path().join("bottom"),
        tmp.path().join("mid"),
        tmp.path().join("upper"),
    );
    for p in [&bottom, &mid, &upper] {
        fs::create_dir(p).expect("mkdir");
    }
    for i in 0..6000 {
        if i % 10 == 0 {
            fs::create_dir(bottom.join(format!("n{i}"))).expect("mkdir");
        } else {
            touch(&bottom.join(format!("n{i}")));
        }
    }
    for i in 4500..7500 {
        touch(&mid.join(format!("n{i}")));
    }
    for i in 0..500 {
        fs::write(mid.join(format!(".wh.n{i}")), b"").expect("whiteout");
    }
    for i in (7000..9500).chain(9500..11000) {
        touch(&upper.join(format!("n{i}")));
    }
    for i in 500..1000 {
        whiteout_at(&upper, &format!("n{i}"));
    }
    let u = union_of(&[&mid, &bottom], Some(&upper));
    (tmp, u, 10_000)
}

fn bench_readdir(c: &mut Criterion) {
    let mut g = c.benchmark_group("readdir");
    g.sampling_mode(SamplingMode::Flat).sample_size(20);

    let (_tmp, u, expect) = merge_tree();
    let root = u.table.root();
    assert_eq!(
        u.listing(&root).expect("listing").entries.len(),
        expect,
        "merged listing size"
    );
    g.throughput(Throughput::Elements(expect as u64));
    g.bench_function("merge_10k_3_layers", |b| {
        b.iter(|| {
            // A new version retires the cached listing, so every pass reads the layers.
            u.dir_changed(&root);
            black_box(u.listing(&root).expect("listing").entries.len())
        })
    });
    g.bench_function("cached_listing_10k", |b| {
        b.iter(|| black_box(u.listing(&root).expect("listing").entries.len()))
    });
    // What readdir sends from a cached listing: one `d_ino` per entry from the inode table.
    let h = DirHandle::new(root.clone());
    g.bench_function("send_10k_from_cache", |b| {
        b.iter(|| {
            let mut n = 0u64;
            u.read_dir(&h, 0, true, |e| {
                n = n.wrapping_add(e.ino);
                false
            })
            .expect("read_dir");
            black_box(n)
        })
    });

    let single = tempfile::Builder::new()
        .prefix("um-bench-readdir1")
        .tempdir()
        .expect("tempdir");
    for i in 0..10_000 {
        touch(&single.path().join(format!("n{i}")));
    }
    let u1 = union_of(&[single.path()], None);
    let r1 = u1.table.root();
    g.bench_function("single_layer_10k", |b| {
        b.iter(|| {
            u1.dir_changed(&r1);
            black_box(u1.listing(&r1).expect("listing").entries.len())
        })
    });
    g.finish();
}

fn bench_whiteout(c: &mut Criterion) {
    let mut g = c.benchmark_group("whiteout");
    let tmp = tempfile::Builder::new()
        .prefix("um-bench-whiteout")
        .tempdir()
        .expect("tempdir");
    let t = tmp.path();
    touch(&t.join("plain"));
    let char_whiteout = whiteout_at(t, "gone");
    let root = Layer::open_root(t).expect("open");

    // The stat check of a lookup: char 0/0 or not.
    let names: &[(&str, &CStr)] = if char_whiteout {
        &[("stat_char00", c"gone"), ("stat_regular", c"plain")]
    } else {
        eprintln!("mknod 0/0 refused: char whiteout case skipped");
        &[("stat_regular", c"plain")]
    };
    for (label, name) in names {
        let want = *label == "stat_char00";
        assert_eq!(
            whiteout::is_whiteout(&sys::fstatat(root.root(), name, 0).expect("stat")),
            want
        );
        g.bench_function(*label, |b| {
            b.iter(|| {
                let st = sys::fstatat(root.root(), black_box(name), 0).expect("stat");
                black_box(whiteout::is_whiteout(&st))
            })
        });
    }

    g.finish();

    // `.wh.` name classification over a mixed batch, as readdir does for every entry.
    let batch: Vec<Vec<u8>> = (0..1000)
        .map(|i| match i % 4 {
            0 => format!(".wh.file{i}").into_bytes(),
            1 => b".wh..wh..opq".to_vec(),
            _ => format!("ordinary_name_{i}.txt").into_bytes(),
        })
        .collect();
    let mut names = c.benchmark_group("whiteout_names");
    names.throughput(Throughput::Elements(batch.len() as u64));
    names.bench_function("wh_names_1000", |b| {
        b.iter(|| {
            let mut n = 0usize;
            for name in &batch {
                if whiteout::is_private_name(black_box(name)) {
                    n += whiteout::whited_out_name(name).map_or(1, |s| s.len());
                }
            }
            black_box(n)
        })
    });
    names.finish();

    let mut g = c.benchmark_group("whiteout");

    // Opaque detection: each xattr form, the marker file, and a plain directory (the common
    // case, which costs every check).
    let mut dirs: Vec<(&str, std::path::PathBuf)> = Vec::new();
    for (label, xattr) in [
        ("opaque_trusted", Some(whiteout::TRUSTED_OPAQUE)),
        ("opaque_user", Some(whiteout::USER_OPAQUE)),
        ("opaque_fuseoverlayfs", Some(whiteout::FUSEOVERLAYFS_OPAQUE)),
        ("opaque_marker", None),
        ("not_opaque", None),
    ] {
        let p = t.join(label);
        fs::create_dir(&p).expect("mkdir");
        if label == "opaque_marker" {
            fs::write(p.join(".wh..wh..opq"), b"").expect("marker");
        }
        if let Some(x) = xattr
            && !set_xattr(&p, x, b"y")
        {
            eprintln!("{label}: xattr refused here, case skipped");
            continue;
        }
        dirs.push((label, p));
    }
    for (label, p) in &dirs {
        let name = CString::new(p.file_name().expect("name").as_bytes()).expect("no NUL");
        let fd =
            sys::openat(root.root(), &name, libc::O_PATH | libc::O_DIRECTORY, 0).expect("open dir");
        assert_eq!(
            whiteout::is_opaque_dir(fd.as_fd()).expect("opaque check"),
            *label != "not_opaque",
            "{label}"
        );
        g.bench_function(*label, |b| {
            b.iter(|| black_box(whiteout::is_opaque_dir(fd.as_fd())))
        });
    }

    // `.wh.NAME` probe after a miss: one scan per lower directory, a stat in the upper.
    let lowerdir = t.join("aufs");
    fs::create_dir(&lowerdir).expect("mkdir");
    for i in 0..1000 {
        touch(&lowerdir.join(format!("f{i}")));
        if i % 10 == 0 {
            fs::write(lowerdir.join(format!(".wh.w{i}")), b"").expect("wh");
        }
    }
    let cached = CachedDir::new(
        sys::openat(root.root(), c"aufs", libc::O_PATH | libc::O_DIRECTORY, 0).expect("open"),
    );
    assert!(cached.has_aufs_whiteout(b"w10", true).expect("scan"));
    for (label, immutable) in [
        ("aufs_probe_lower_scanned", true),
        ("aufs_probe_upper_stat", false),
    ] {
        g.bench_function(label, |b| {
            b.iter(|| black_box(cached.has_aufs_whiteout(black_box(b"absent"), immutable)))
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_lookup, bench_readdir, bench_whiteout
}
criterion_main!(benches);
