//! The merged view: shadowing, merged directories, whiteouts, opaque directories, private
//! names, readdir types and inode numbers. Each rule is checked in the merged view and, where
//! the kernel reads the same layers, against kernel overlayfs.

mod common;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, MetadataExt};

use common::*;

fn layers() -> Layers {
    let l = Layers::new(3);
    l.lower(0)
        .file("top", "from 0")
        .file("shadow", "0 wins")
        .dir("merged")
        .file("merged/from0", "0")
        .whiteout("gone_char")
        .aufs_whiteout("gone_aufs")
        .whiteout("merged/deleted")
        .opaque_xattr("opq_trusted", "trusted.overlay.opaque")
        .opaque_xattr("opq_user", "user.overlay.opaque")
        .opaque_xattr("opq_fo", "user.fuseoverlayfs.opaque")
        .opaque_marker("opq_marker")
        .file("opq_trusted/mine", "0")
        .file("opq_marker/mine", "0");
    l.lower(1)
        .file("shadow", "1 loses")
        .dir("merged")
        .file("merged/from1", "1")
        .file("merged/deleted", "hidden by layer 0")
        .file("gone_char", "hidden")
        .file("gone_aufs", "hidden")
        .symlink("link", "top")
        .fifo("fifo");
    for d in ["opq_trusted", "opq_user", "opq_fo", "opq_marker"] {
        l.lower(1).file(&format!("{d}/below"), "must not show");
    }
    l.lower(2)
        .dir("merged/sub")
        .file("merged/sub/deep", "2")
        .file("bottom", "2");
    l
}

#[test]
fn shadowing_and_merging() {
    let l = layers();
    let m = l.mount("u");
    assert_eq!(m.read("shadow"), "0 wins");
    assert_eq!(m.read("top"), "from 0");
    assert_eq!(m.read("bottom"), "2");
    assert_eq!(m.ls("merged"), vec!["from0", "from1", "sub"]);
    assert_eq!(m.read("merged/sub/deep"), "2");
    assert_eq!(fs::read_link(m.path("link")).unwrap().to_str(), Some("top"));
}

#[test]
fn whiteouts_hide_both_forms() {
    let l = layers();
    let m = l.mount("u");
    let root = m.ls("");
    for hidden in ["gone_char", "gone_aufs", ".wh.gone_aufs"] {
        assert!(
            !root.contains(&hidden.to_string()),
            "{hidden} listed: {root:?}"
        );
        assert_eq!(
            errno(fs::symlink_metadata(m.path(hidden))),
            libc::ENOENT,
            "{hidden}"
        );
    }
    assert!(!m.exists("merged/deleted"));
}

#[test]
fn opaque_directories_all_four_markers() {
    let l = layers();
    let m = l.mount("u");
    for d in ["opq_trusted", "opq_user", "opq_fo", "opq_marker"] {
        let names = m.ls(d);
        assert!(!names.contains(&"below".to_string()), "{d}: {names:?}");
        assert!(
            !names.iter().any(|n| n.starts_with(".wh.")),
            "{d}: {names:?}"
        );
    }
    assert_eq!(m.ls("opq_trusted"), vec!["mine"]);
    assert_eq!(m.ls("opq_marker"), vec!["mine"]);
}

#[test]
fn private_xattrs_are_hidden() {
    let l = layers();
    let m = l.mount("u");
    for d in ["opq_trusted", "opq_user", "opq_fo"] {
        let x = list_xattrs(&m.path(d));
        assert!(x.iter().all(|n| !n.contains("overlay")), "{d}: {x:?}");
        assert!(get_xattr(&m.path(d), "trusted.overlay.opaque").is_err());
    }
}

/// readdir's d_ino equals stat's st_ino, and d_type is the object's type.
#[test]
fn dirent_ino_and_type_match_stat() {
    let l = layers();
    let m = l.mount("u");
    for dir in ["", "merged", "merged/sub"] {
        let d = CString::new(m.path(dir).as_os_str().as_bytes()).unwrap();
        // SAFETY: opendir/readdir/closedir on a valid path, entries read before closedir.
        let entries: Vec<(String, u64, u8)> = unsafe {
            let dp = libc::opendir(d.as_ptr());
            assert!(!dp.is_null());
            let mut v = Vec::new();
            while let Some(e) = next_entry(dp) {
                v.push(e);
            }
            libc::closedir(dp);
            v
        };
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert!(
            names.contains(&".") && names.contains(&".."),
            "{dir}: {names:?}"
        );
        for (name, d_ino, d_type) in entries {
            if name == ".." {
                continue;
            }
            let md = fs::symlink_metadata(m.path(dir).join(&name)).unwrap();
            assert_eq!(d_ino, md.ino(), "{dir}/{name}: d_ino != st_ino");
            let want = match md.mode() & libc::S_IFMT {
                libc::S_IFDIR => libc::DT_DIR,
                libc::S_IFREG => libc::DT_REG,
                libc::S_IFLNK => libc::DT_LNK,
                libc::S_IFIFO => libc::DT_FIFO,
                _ => 0,
            };
            assert_eq!(d_type, want, "{dir}/{name}: d_type");
        }
    }
}

/// The same layers under kernel overlayfs show the same tree (the kernel does not read
/// `.wh.` whiteouts or the user.* opaque markers as root, so those parts are left out).
#[test]
fn same_view_as_kernel_overlayfs() {
    let l = Layers::new(3);
    l.lower(0)
        .file("shadow", "0")
        .dir("m")
        .file("m/a", "a")
        .whiteout("m/b")
        .whiteout("gone")
        .opaque_xattr("o", "trusted.overlay.opaque")
        .file("o/x", "x")
        .symlink("ln", "shadow")
        .chmod("shadow", 0o640)
        .xattr("m/a", "user.k", b"v");
    l.lower(1)
        .file("shadow", "1")
        .dir("m")
        .file("m/b", "b")
        .file("m/c", "c")
        .file("gone", "g")
        .file("o/y", "y");
    l.lower(2).dir("m/deep").file("m/deep/z", "z").fifo("p");
    let u = l.mount("u");
    let k = l.mount_kernel("k");
    let o = TreeOpts::default();
    assert_same_tree(
        &tree(&k.merged, &o),
        &tree(&u.merged, &o),
        "kernel vs unionmount",
    );
}

#[test]
fn many_lower_layers() {
    let l = Layers::new(50);
    for i in 0..50 {
        l.lower(i)
            .file(&format!("f{i}"), &i.to_string())
            .file("d/common", &i.to_string());
        l.lower(i).file(&format!("d/only{i}"), "x");
    }
    let m = l.mount("u");
    assert_eq!(m.read("d/common"), "0");
    assert_eq!(m.read("f49"), "49");
    assert_eq!(m.ls("d").len(), 51);
    let k = l.mount_kernel("k");
    let o = TreeOpts::default();
    assert_same_tree(&tree(&k.merged, &o), &tree(&m.merged, &o), "50 layers");
}

/// Offsets stay valid within one open directory stream, also while it changes.
#[test]
fn telldir_seekdir_are_stable() {
    let l = Layers::new(2);
    for i in 0..200 {
        l.lower(i % 2).file(&format!("d/f{i:03}"), "x");
    }
    let m = l.mount("u");
    let d = CString::new(m.path("d").as_os_str().as_bytes()).unwrap();
    // SAFETY: directory stream calls on a stream we opened and close.
    unsafe {
        let dp = libc::opendir(d.as_ptr());
        assert!(!dp.is_null());
        let mut seen = BTreeMap::new();
        let mut marks = Vec::new();
        loop {
            let pos = libc::telldir(dp);
            let Some((name, _, _)) = next_entry(dp) else {
                break;
            };
            marks.push((pos, name.clone()));
            seen.insert(name, ());
            if marks.len() == 50 {
                // Change the directory in the middle of the listing.
                fs::write(m.path("d/zz_new"), "n").unwrap();
                fs::remove_file(m.path("d/f199")).unwrap();
            }
        }
        assert!(seen.contains_key("f100"));
        // Position 0 is a rewind (a fresh listing, as kernel overlayfs does); every other
        // told position must still name the entry it named.
        for (pos, name) in marks.iter().skip(1).step_by(37) {
            libc::seekdir(dp, *pos);
            let got = next_entry(dp).expect("an entry at a told position").0;
            assert_eq!(&got, name, "seekdir to a told position");
        }
        libc::closedir(dp);
    }
    let names = m.ls("d");
    assert!(names.contains(&"zz_new".to_string()) && !names.contains(&"f199".to_string()));
}

/// Deletes every entry of `dir` while reading it with one stream, after a full listing (which
/// the kernel keeps in its cache); after 1,000 deletions another stream reads a few entries,
/// as an `ls` elsewhere would. Returns the number deleted and the number left.
fn delete_while_reading(dir: &std::path::Path) -> (usize, usize) {
    let _ = fs::read_dir(dir).unwrap().count();
    let d = CString::new(dir.as_os_str().as_bytes()).unwrap();
    let mut deleted = 0;
    // SAFETY: directory stream calls on streams we open and close.
    unsafe {
        let dp = libc::opendir(d.as_ptr());
        assert!(!dp.is_null());
        while let Some((name, _, _)) = next_entry(dp) {
            if name == "." || name == ".." {
                continue;
            }
            fs::remove_file(dir.join(&name)).unwrap();
            deleted += 1;
            if deleted == 1000 {
                let other = libc::opendir(d.as_ptr());
                assert!(!other.is_null());
                for _ in 0..10 {
                    assert!(next_entry(other).is_some());
                }
                libc::closedir(other);
            }
        }
        libc::closedir(dp);
    }
    (deleted, fs::read_dir(dir).unwrap().count())
}

/// A stream the kernel served from its listing cache goes on with the daemon when another
/// open finds the directory changed and drops that cache: its offset must keep its place in
/// the daemon's new listing. Offsets used to be places in one listing, so the stream skipped
/// as many entries as had been deleted (1,022 files of 5,000 left behind by a
/// delete-while-reading loop, `rm -r` style); kernel overlayfs leaves none.
#[test]
fn a_stream_continued_after_another_open_misses_nothing() {
    let l = Layers::new(2);
    for i in 0..3000 {
        l.lower(i % 2).file(&format!("d/f{i:04}"), "");
    }
    let k = l.mount_kernel("k");
    let m = l.mount("u");
    assert_eq!(
        delete_while_reading(&k.path("d")),
        (3000, 0),
        "kernel overlayfs"
    );
    assert_eq!(delete_while_reading(&m.path("d")), (3000, 0));
    fs::remove_dir(m.path("d")).unwrap();
}

/// A layer that deleted a directory and made a new one of the same name holds both `.wh.d`
/// and `d`: the new directory shows only its own entries, none of the deleted one's below.
#[test]
fn aufs_whiteout_beside_a_new_directory_hides_the_old_one() {
    let l = Layers::new(2);
    l.lower(0).aufs_whiteout("d").dir("d").file("d/new", "n");
    l.lower(1).dir("d").file("d/old", "o").file("keep", "k");
    let m = l.mount("u");
    let mut names: Vec<String> = std::fs::read_dir(m.path("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["new"]);
    assert_eq!(
        errno(std::fs::symlink_metadata(m.path("d/old"))),
        libc::ENOENT
    );
    let mut root: Vec<String> = std::fs::read_dir(&m.merged)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    root.sort();
    assert_eq!(root, ["d", "keep"]);
    // Removing the new directory needs no look below it.
    std::fs::remove_file(m.path("d/new")).unwrap();
    std::fs::remove_dir(m.path("d")).unwrap();
    assert_eq!(errno(std::fs::symlink_metadata(m.path("d"))), libc::ENOENT);
}

/// `readdirplus=on|auto`: listings that carry attributes show exactly what lookups show (the
/// same names, types, modes, sizes, link counts and inode numbers as with it off, and
/// `d_ino == st_ino`), through shadowing, whiteouts and opaque directories; the view equals
/// kernel overlayfs's.
#[test]
fn readdirplus_listings_match_lookups() {
    let l = Layers::new(2);
    l.lower(0)
        .file("top", "t")
        .file("shadow", "upper wins")
        .whiteout("gone")
        .dir("m")
        .file("m/a", "a0")
        .dir("op")
        .file("op/new", "n");
    l.lower(0).opaque_xattr("op", "trusted.overlay.opaque");
    l.lower(1)
        .file("shadow", "lower")
        .file("gone", "g")
        .dir("m")
        .file("m/b", "b1")
        .dir("op")
        .file("op/old", "o")
        .symlink("ln", "top");
    for i in 0..300 {
        l.lower(1).file(&format!("m/f{i}"), &"x".repeat(i));
    }
    let view = |root: &std::path::Path| -> Vec<String> {
        let mut out = Vec::new();
        for dir in ["", "m", "op"] {
            let d = root.join(dir);
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let md = std::fs::symlink_metadata(e.path()).unwrap();
                let t = e.file_type().unwrap();
                assert_eq!(t, md.file_type(), "d_type of {:?}", e.path());
                out.push(format!(
                    "{dir}/{} {:o} {} {}",
                    e.file_name().to_string_lossy(),
                    md.mode(),
                    if md.is_dir() { 0 } else { md.len() },
                    if md.is_dir() { 0 } else { md.nlink() },
                ));
            }
        }
        out.sort();
        out
    };
    let inos = |root: &std::path::Path| -> Vec<(String, u64, u64)> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(root.join("m")).unwrap() {
            let e = e.unwrap();
            let md = std::fs::symlink_metadata(e.path()).unwrap();
            v.push((
                e.file_name().to_string_lossy().into_owned(),
                e.ino(),
                md.ino(),
            ));
        }
        v.sort();
        v
    };
    let k = l.mount_kernel("k");
    let want = view(&k.merged);
    drop(k);
    assert!(want.iter().any(|x| x.starts_with("/shadow 100644 10 1")));
    assert!(
        !want
            .iter()
            .any(|x| x.contains("gone") || x.contains("op/old"))
    );
    for mode in ["off", "auto", "on"] {
        let m = l.mount_with(mode, &["-o", &format!("readdirplus={mode}")]);
        assert_eq!(view(&m.merged), want, "readdirplus={mode}");
        for (name, d_ino, st_ino) in inos(&m.merged) {
            assert_eq!(d_ino, st_ino, "readdirplus={mode}: d_ino of m/{name}");
        }
        // Listed again after the kernel has the entries: still the same.
        assert_eq!(view(&m.merged), want, "readdirplus={mode}, second listing");
    }
    let out = run_unionmount(&["--lower", "/nonexistent", "-o", "readdirplus=maybe", "/tmp"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("readdirplus"));
}

/// `ls -l` of a large directory gets the attributes with every batch of the listing: `ls`
/// stats each batch before reading the next (so the kernel asks for attributes again), and
/// `readdirplus=auto` gives a process's first directory whole batches. The daemon then sees
/// no LOOKUP of the listed names, where with `readdirplus=off` it sees one per name. (Read
/// from the daemon's request log.)
#[test]
fn ls_l_of_a_large_directory_looks_up_no_names() {
    const FILES: usize = 2000;
    let l = Layers::new(1);
    l.lower(0).dir("big");
    for i in 0..FILES {
        l.lower(0).file(&format!("big/f{i}"), "x");
    }
    let lookups = |mode: &str| -> usize {
        let base = l.mkdir(&format!("m-{mode}"));
        let opt = format!("readdirplus={mode}");
        let mut d = ForegroundDaemon::start(&l, &base, &["--log-level", "debug", "-o", &opt]);
        let out = std::process::Command::new("ls")
            .arg("-l")
            .arg(d.merged.join("big"))
            .output()
            .expect("run ls");
        assert!(out.status.success(), "ls -l: {out:?}");
        let listed = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| {
                l.split_whitespace()
                    .last()
                    .is_some_and(|n| n.starts_with('f'))
            })
            .count();
        assert_eq!(listed, FILES, "{mode}: ls -l lists every file");
        d.unmount().unwrap();
        d.log()
            .lines()
            .filter(|l| l.contains("Lookup { name: \"f"))
            .count()
    };
    assert_eq!(lookups("auto"), 0, "readdirplus=auto: names looked up");
    let off = lookups("off");
    assert!(off >= FILES, "readdirplus=off: {off} names looked up");
}

/// Names in one getdents64 call on `fd` (a large buffer: one FUSE reply per call).
fn getdents_names(fd: &std::fs::File) -> Vec<String> {
    getdents(fd, 32768).into_iter().map(|(n, _)| n).collect()
}

/// Names and numbers (`d_ino`) in one getdents64 call on `fd` with a buffer of `size` bytes.
fn getdents(fd: &std::fs::File, size: usize) -> Vec<(String, u64)> {
    use std::os::fd::AsRawFd;
    let mut buf = vec![0u8; size];
    // SAFETY: a valid directory fd and a buffer of the given length.
    let n = unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            fd.as_raw_fd(),
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    assert!(n >= 0, "getdents64: {}", std::io::Error::last_os_error());
    let mut out = Vec::new();
    let mut off = 0usize;
    while off < n as usize {
        // struct linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type, name...
        let ino = u64::from_ne_bytes(buf[off..off + 8].try_into().unwrap());
        let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
        let name = &buf[off + 19..off + reclen];
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        out.push((String::from_utf8_lossy(&name[..end]).into_owned(), ino));
        off += reclen;
    }
    out
}

/// A directory stream opened before a name was removed may go on to list it, and then with
/// the number its object had (fstests generic/637: the stream was continued by the daemon
/// after the removal, which gave the entry a new number, and kept that number for whatever
/// file reused the real inode). Both a lower and an upper object, each held open so the
/// kernel keeps it. With plain listings the daemon lists such names from the listing the
/// stream read first; kernel overlayfs leaves them out (so it is compared only when it lists
/// one), and so do listings with attributes (`readdirplus`), which look each name up.
#[test]
fn a_stream_opened_before_a_removal_lists_the_removed_object_with_its_number() {
    const N: usize = 300;
    let l = Layers::new(1);
    for i in 0..N {
        l.lower(0).file(&format!("d/l{i}"), "l");
    }
    for (what, opts) in [
        ("kernel overlayfs", None),
        ("unionmount", Some(&["-o", "readdirplus=off"][..])),
        ("unionmount readdirplus=auto", Some(&[][..])),
    ] {
        let m = match opts {
            None => l.mount_kernel("k"),
            Some(o) => l.mount_with("u", o),
        };
        for i in 0..N {
            m.write(&format!("d/u{i}"), "u");
        }
        let read_all = |dir: &fs::File| {
            let mut all = Vec::new();
            loop {
                let batch = getdents(dir, 4096);
                if batch.is_empty() {
                    return all;
                }
                all.extend(batch);
            }
        };
        // The stream's order, from a stream of its own; a change after it makes the next
        // open drop what the kernel cached, so that the stream below reads from the daemon.
        let order = read_all(&fs::File::open(m.path("d")).unwrap());
        m.write("d/x", "x");
        fs::remove_file(m.path("d/x")).unwrap();
        let last = |prefix: char| {
            order
                .iter()
                .rev()
                .find(|(n, _)| n.starts_with(prefix))
                .unwrap()
                .0
                .clone()
        };
        let victims = [last('l'), last('u')];

        let dir = fs::File::open(m.path("d")).unwrap();
        let first = getdents(&dir, 200);
        assert!(!first.is_empty(), "{what}: first batch");
        let mut held = Vec::new();
        for v in &victims {
            assert!(
                !first.iter().any(|(n, _)| n == v),
                "{what}: {v} comes late in the stream"
            );
            let f = fs::File::open(m.path(&format!("d/{v}"))).unwrap();
            let ino = f.metadata().unwrap().ino();
            fs::remove_file(m.path(&format!("d/{v}"))).unwrap();
            held.push((f, ino));
        }
        // A new stream after the removal, as the fstests program opens: the kernel's cached
        // listing is dropped, and the old stream continues with the daemon.
        let _new = fs::File::open(m.path("d")).unwrap();
        let rest: BTreeMap<String, u64> = read_all(&dir).into_iter().collect();
        assert!(rest.len() >= 2 * N - 2 - first.len(), "{what}: the rest");
        for (v, (_, ino)) in victims.iter().zip(&held) {
            match rest.get(v) {
                Some(listed) => assert_eq!(
                    listed, ino,
                    "{what}: d_ino of {v}, removed after the stream was opened"
                ),
                None => assert_ne!(
                    what, "unionmount",
                    "{v}: plain listings list it from the stream's first listing"
                ),
            }
        }
        // Files made afterwards get numbers of their own, which readdir agrees with.
        drop(held);
        for i in 0..20 {
            m.write(&format!("d/n{i}"), "n");
        }
        let now: BTreeMap<String, u64> = read_all(&fs::File::open(m.path("d")).unwrap())
            .into_iter()
            .collect();
        for i in 0..20 {
            let n = format!("n{i}");
            assert_eq!(
                now.get(&n),
                Some(&ino(&m.path(&format!("d/{n}")))),
                "{what}: d_ino of the new {n}"
            );
        }
    }
}

/// `readdirplus=auto` gives a process's first directory a whole first batch, as the kernel's
/// own heuristic would, and probes its second with a single entry after `.` and `..` (a
/// reader that takes one batch, as overlayfs's check of its upper layer does, still sees an
/// entry with its file type).
#[test]
fn a_first_listing_comes_whole_and_the_next_is_probed_with_one_entry() {
    let l = Layers::new(1);
    for d in ["d1", "d2"] {
        l.lower(0).dir(d);
        for n in ["a", "b", "c"] {
            l.lower(0).file(&format!("{d}/{n}"), n);
        }
    }
    let m = l.mount_with("u", &["-o", "readdirplus=auto"]);
    // Requests carry the calling thread's id: this thread is a new process to the daemon.
    let first = std::fs::File::open(m.path("d1")).unwrap();
    let mut got = getdents_names(&first);
    got.sort();
    assert_eq!(
        got,
        [".", "..", "a", "b", "c"],
        "first directory: one whole batch"
    );
    let second = std::fs::File::open(m.path("d2")).unwrap();
    let got = getdents_names(&second);
    assert_eq!(
        got.len(),
        3,
        "second directory: the dots and one entry: {got:?}"
    );
    assert_eq!(got[..2], [".", ".."], "second directory");
    assert!(["a", "b", "c"].contains(&got[2].as_str()), "{got:?}");
}

/// `readdirplus=auto` gives a process that has not shown it stats what it lists one entry per
/// reply; when that entry was removed after the listing was read, the reply must carry the
/// next one, not come back empty (which reads as the end of the directory).
#[test]
fn single_entry_listing_replies_skip_removed_names() {
    let l = Layers::new(1);
    l.lower(0).dir("d");
    for n in ["a", "b", "c", "d", "e"] {
        l.lower(0).file(&format!("d/{n}"), n);
    }
    let m = l.mount_with("u", &["-o", "readdirplus=auto"]);
    // The listing's order (the daemon's offsets), read by another process; a name made and
    // removed then has the kernel drop the listing it cached meanwhile.
    let out = std::process::Command::new("ls")
        .arg("-f")
        .arg(m.path("d"))
        .output()
        .unwrap();
    let order: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|n| *n != "." && *n != "..")
        .map(str::to_string)
        .collect();
    assert_eq!(order.len(), 5, "{order:?}");
    std::fs::write(m.path("d/tmp"), "").unwrap();
    std::fs::remove_file(m.path("d/tmp")).unwrap();
    let last = order[4].clone();
    // A process's first directory gets a whole batch; the next one is probed with one entry.
    std::fs::read_dir(m.path("")).unwrap().for_each(drop);
    // A lookup in the directory makes the kernel ask for attributes in the next reply.
    let look = || std::fs::symlink_metadata(m.path(&format!("d/{last}"))).unwrap();
    let dir = std::fs::File::open(m.path("d")).unwrap();
    let mut seen = getdents_names(&dir);
    assert_eq!(
        seen,
        [".", "..", order[0].as_str()],
        "first reply: the dots and one entry"
    );
    // This open directory reads the listing taken when it started; remove the name that
    // comes next in it before each reply.
    for (i, name) in order[1..4].iter().enumerate() {
        std::fs::remove_file(m.path(&format!("d/{name}"))).unwrap();
        look();
        let got = getdents_names(&dir);
        assert!(
            !got.is_empty(),
            "the listing ended after {} removals",
            i + 1
        );
        seen.extend(got);
        if seen.contains(&last) {
            break;
        }
    }
    while seen.last().is_some_and(|s| s != &last) {
        let got = getdents_names(&dir);
        assert!(!got.is_empty(), "the listing ended early: {seen:?}");
        seen.extend(got);
    }
    assert!(seen.contains(&last), "{seen:?}");
}

/// Another name of a hard link keeps showing one number in listings and in stat after one
/// name is removed while held: a listing of its directory built before the removal must not
/// give it the removed name's number (the object lives on under the other name), as an entry
/// whose object went does (see the test above). Lower and upper hard links; plain listings
/// reach the daemon once the kernel dropped its cached copy.
#[test]
fn another_name_of_a_removed_hard_link_shows_one_number() {
    let l = Layers::new(1);
    l.lower(0)
        .file("d/a", "x")
        .hardlink("d/a", "e/c")
        .file("e/o", "o")
        .file("f/a", "x")
        .hardlink("f/a", "g/c");
    let m = l.mount_with("u", &["-o", "readdirplus=off"]);
    fs::create_dir(m.path("ud")).unwrap();
    fs::create_dir(m.path("ue")).unwrap();
    m.write("ud/a", "y");
    fs::hard_link(m.path("ud/a"), m.path("ue/c")).unwrap();
    // The kernel drops its cached listing pages (not the inodes), or keeps them: then the
    // listing it keeps must be dropped when the number changes.
    for (d, e, drop_pages) in [("d", "e", true), ("ud", "ue", true), ("f", "g", false)] {
        let _ = fs::read_dir(m.path(e)).unwrap().count();
        if drop_pages {
            fs::write("/proc/sys/vm/drop_caches", "1").unwrap();
        }
        let held = fs::File::open(m.path(&format!("{d}/a"))).unwrap();
        fs::remove_file(m.path(&format!("{d}/a"))).unwrap();
        let st = ino(&m.path(&format!("{e}/c")));
        let listed: BTreeMap<String, u64> = fs::read_dir(m.path(e))
            .unwrap()
            .map(|x| {
                let x = x.unwrap();
                (x.file_name().to_string_lossy().into_owned(), x.ino())
            })
            .collect();
        assert_eq!(
            listed.get("c"),
            Some(&st),
            "{e}/c: d_ino against st_ino (pages dropped: {drop_pages})"
        );
        drop(held);
    }
}
