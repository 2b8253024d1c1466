//! FUSE passthrough (root): open files served by the kernel from the backing file.
//!
//! The kernel ties one backing file to a FUSE inode while any passthrough open of it exists
//! and accepts no other kind of open on that inode. A file opened read-only from a lower layer
//! is backed by the lower file; when another open then copies it up, unionmount moves the name
//! to a new inode backed by the upper copy (the kernel retries the open on it). Checked here:
//! no write reaches the lower layer, no open fails, the old descriptor keeps the data it had
//! (a documented difference: kernel overlayfs reopens it on the upper copy), and new opens see
//! the new data.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};

use common::*;

/// A mount with the default I/O path, passthrough, whatever `UNIONMOUNT_TEST_ARGS` says.
fn passthrough_mount(l: &Layers) -> Mount {
    l.mount_with("u", &["--passthrough", "auto"])
}

/// The pid of the daemon serving `m`.
fn daemon_pid(m: &Mount) -> i32 {
    let want = m.merged.to_string_lossy().into_owned();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| a.ends_with("unionmount")) && args.last() == Some(&want) {
            return pid;
        }
    }
    panic!("no daemon for {want}");
}

/// Waits (bounded) until every thread of process `pid` is in the stopped state.
fn wait_all_stopped(pid: i32) {
    let stopped = || -> bool {
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        tasks.flatten().all(|t| {
            let stat = fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // The state follows the command name, which is in parentheses.
            let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
            state.is_some_and(|r| r.starts_with('T') || r.starts_with('t'))
        })
    };
    assert!(
        wait_until(std::time::Duration::from_secs(5), stopped),
        "daemon {pid} did not stop"
    );
}

/// Whether reads of an open file bypass the daemon: they complete while it is stopped.
fn reads_bypass_daemon(m: &Mount, rel: &str) -> bool {
    let f = File::open(m.path(rel)).unwrap();
    let pid = daemon_pid(m);
    /// Continues the stopped daemon when dropped, also if the test panics meanwhile.
    struct Stopped(i32);
    impl Drop for Stopped {
        fn drop(&mut self) {
            // SAFETY: signals the daemon process this test stopped.
            unsafe { libc::kill(self.0, libc::SIGCONT) };
        }
    }
    // SAFETY: signals the daemon process found above; `_stopped` continues it.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let _stopped = Stopped(pid);
    // kill() returns before every thread has stopped; a worker still running could serve
    // the read below. Wait until the whole process is stopped.
    wait_all_stopped(pid);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut b = vec![0u8; 4096];
        let _ = tx.send(f.read_at(&mut b, 0).is_ok());
    });
    // A read through the daemon cannot finish until it is continued; give a passthrough
    // read ample time (this bounds a wait, it measures nothing).
    rx.recv_timeout(std::time::Duration::from_secs(5))
        .unwrap_or(false)
}

#[test]
fn root_mounts_use_passthrough_and_off_means_off() {
    let l = Layers::new(1);
    l.lower(0)
        .file_bytes("a", &[1u8; 65536])
        .file_bytes("b", &[2u8; 65536]);
    let m = passthrough_mount(&l);
    assert!(
        reads_bypass_daemon(&m, "a"),
        "passthrough is on by default as root"
    );
    let off = l.mount_with("off", &["--passthrough", "off"]);
    assert!(
        !reads_bypass_daemon(&off, "b"),
        "--passthrough off serves reads itself"
    );
}

#[test]
fn copy_up_of_an_open_file() {
    let l = Layers::new(1);
    l.lower(0).file("f", "lower data\n");
    let lower_before = fs::read(l.lowers[0].join("f")).unwrap();
    let m = passthrough_mount(&l);
    // The whole listing, which the kernel keeps.
    let d_ino = || {
        let all: Vec<fs::DirEntry> = fs::read_dir(&m.merged)
            .unwrap()
            .map(|e| e.unwrap())
            .collect();
        std::os::unix::fs::DirEntryExt::ino(&all[0])
    };
    let ino = fs::symlink_metadata(m.path("f")).unwrap().ino();
    assert_eq!(d_ino(), ino);
    let mut ro = File::open(m.path("f")).unwrap();
    let mut buf = String::new();
    ro.read_to_string(&mut buf).unwrap();
    assert_eq!(buf, "lower data\n");

    // Open for writing while the read-only open is live: copy-up, no EIO.
    let mut w = OpenOptions::new()
        .append(true)
        .open(m.path("f"))
        .expect("write open after copy-up");
    w.write_all(b"upper data\n").unwrap();
    w.sync_all().unwrap();

    // The lower layer never changes.
    assert_eq!(fs::read(l.lowers[0].join("f")).unwrap(), lower_before);
    assert_eq!(
        fs::read_to_string(m.upper_path("f")).unwrap(),
        "lower data\nupper data\n"
    );
    // The descriptor opened before the copy-up keeps the lower data (README: the passthrough
    // difference from kernel overlayfs).
    let mut again = String::new();
    ro.seek(SeekFrom::Start(0)).unwrap();
    ro.read_to_string(&mut again).unwrap();
    assert_eq!(again, "lower data\n");
    // New opens see the new data, through passthrough of the upper copy.
    assert_eq!(m.read("f"), "lower data\nupper data\n");
    let st = fs::metadata(m.path("f")).unwrap();
    assert_eq!(st.len(), 22);
    // The name moved to a new inode with a number of its own (README), and the listing the
    // kernel cached before shows that number.
    assert_ne!(st.ino(), ino);
    assert_eq!(d_ino(), st.ino());
    drop(ro);
    drop(w);
    // Once every open is closed, the file is one file again: read and write both work.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("f"))
        .unwrap();
    f.write_at(b"LOWER", 0).unwrap();
    assert_eq!(m.read("f"), "LOWER data\nupper data\n");
    assert_eq!(fs::read(l.lowers[0].join("f")).unwrap(), lower_before);
}

/// A descriptor opened before a copy-up keeps reading the lower file (README), and what the
/// daemon answers for it agrees: seeks for data and holes, copies from it and its size are
/// the lower file's, also after the copy was cut and regrown into one hole.
#[test]
fn seeks_and_copies_through_a_descriptor_opened_before_a_copy_up() {
    let l = Layers::new(1);
    let data = "abcdefghij".repeat(10_000);
    l.lower(0).file("f", &data);
    let m = passthrough_mount(&l);
    let old = File::open(m.path("f")).unwrap();
    let w = OpenOptions::new().write(true).open(m.path("f")).unwrap();
    w.set_len(0).unwrap();
    w.set_len(300_000).unwrap();
    drop(w);
    let seek = |whence| {
        // SAFETY: lseek on an open descriptor.
        let r = unsafe { libc::lseek(std::os::fd::AsRawFd::as_raw_fd(&old), 0, whence) };
        if r < 0 {
            Err(std::io::Error::last_os_error().raw_os_error())
        } else {
            Ok(r)
        }
    };
    assert_eq!(old.metadata().unwrap().len(), 100_000);
    assert_eq!(
        seek(libc::SEEK_DATA),
        Ok(0),
        "SEEK_DATA: the lower file's data"
    );
    assert_eq!(
        old.metadata().unwrap().len(),
        100_000,
        "size after the seek"
    );
    let mut buf = [0u8; 10];
    assert_eq!(old.read_at(&mut buf, 50_000).unwrap(), 10);
    assert_eq!(&buf, b"abcdefghij");
    let out = File::create(m.path("copied")).unwrap();
    let mut off_in: i64 = 0;
    // SAFETY: copy_file_range between two open descriptors, with an offset of our own.
    let n = unsafe {
        libc::copy_file_range(
            std::os::fd::AsRawFd::as_raw_fd(&old),
            &mut off_in,
            std::os::fd::AsRawFd::as_raw_fd(&out),
            std::ptr::null_mut(),
            20,
            0,
        )
    };
    assert_eq!(
        n,
        20,
        "copy_file_range: {}",
        std::io::Error::last_os_error()
    );
    drop(out);
    assert_eq!(fs::read(m.path("copied")).unwrap(), &data.as_bytes()[..20]);
    // New opens see the copy: one hole.
    assert_eq!(fs::metadata(m.path("f")).unwrap().len(), 300_000);
}

/// Owner, mode, times and xattrs changed through a descriptor opened before another open
/// copied the file up land on the copy and show through the name, and the reverse (as on
/// kernel overlayfs); its stat tells the size of the data it reads.
#[test]
fn changes_through_a_descriptor_opened_before_a_copy_up() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::io::AsRawFd;
    let l = Layers::new(1);
    l.lower(0).file("f", "lower data\n");
    let lower_before = fs::metadata(l.lowers[0].join("f")).unwrap();
    let m = passthrough_mount(&l);
    let ro = File::open(m.path("f")).unwrap();
    let mut w = OpenOptions::new().append(true).open(m.path("f")).unwrap();
    w.write_all(b"upper data\n").unwrap();
    // Its stat: the size of what it reads.
    let mut read = Vec::new();
    (&ro).seek(SeekFrom::Start(0)).unwrap();
    (&ro).read_to_end(&mut read).unwrap();
    assert_eq!(ro.metadata().unwrap().len(), read.len() as u64);
    // The kernel holds the name's attributes before each change through the old descriptor.
    let mode = |p: &std::path::Path| fs::metadata(p).unwrap().mode() & 0o7777;
    assert_eq!(mode(&m.path("f")), 0o644);
    ro.set_permissions(fs::Permissions::from_mode(0o600))
        .expect("fchmod through the old descriptor");
    assert_eq!(mode(&m.path("f")), 0o600);
    assert_eq!(mode(&m.upper_path("f")), 0o600);
    let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(2_000_000);
    ro.set_times(fs::FileTimes::new().set_modified(when))
        .expect("futimens through the old descriptor");
    assert_eq!(fs::metadata(m.path("f")).unwrap().mtime(), 2_000_000);
    let name = c"user.k";
    // SAFETY: a live fd, a NUL-terminated name and a 1-byte value.
    let rc = unsafe { libc::fsetxattr(ro.as_raw_fd(), name.as_ptr(), b"v".as_ptr().cast(), 1, 0) };
    assert_eq!(rc, 0, "fsetxattr: {}", std::io::Error::last_os_error());
    assert_eq!(get_xattr(&m.path("f"), "user.k"), Ok(b"v".to_vec()));
    assert_eq!(get_xattr(&m.upper_path("f"), "user.k"), Ok(b"v".to_vec()));
    // Inode flags (lsattr) through it: the copy's.
    let mut flags: libc::c_long = 0;
    const FS_IOC_GETFLAGS: libc::c_ulong = 0x8008_6601;
    // SAFETY: a live fd and a buffer of the size the ioctl writes.
    let rc = unsafe { libc::ioctl(ro.as_raw_fd(), FS_IOC_GETFLAGS, &mut flags) };
    assert_eq!(
        rc,
        0,
        "FS_IOC_GETFLAGS: {}",
        std::io::Error::last_os_error()
    );
    // Changes by name show in the old descriptor's stat.
    let before = ro.metadata().unwrap().mode() & 0o7777;
    assert_eq!(before, 0o600);
    fs::set_permissions(m.path("f"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(ro.metadata().unwrap().mode() & 0o7777, 0o640);
    ro.sync_all().unwrap();
    // A read-only reopen through /proc reads what the old descriptor reads.
    let again = fs::read(format!("/proc/self/fd/{}", ro.as_raw_fd())).unwrap();
    assert_eq!(again, read);
    // A writable one is refused (README) and changes nothing, O_TRUNC included.
    let reopen = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(format!("/proc/self/fd/{}", ro.as_raw_fd()));
    assert_eq!(errno(reopen), libc::ESTALE);
    assert_eq!(m.read("f"), "lower data\nupper data\n");
    drop(ro);
    drop(w);
    assert_eq!(
        fs::read(l.lowers[0].join("f")).unwrap(),
        b"lower data\n".to_vec()
    );
    let after = fs::metadata(l.lowers[0].join("f")).unwrap();
    assert_eq!(
        (after.mode(), after.mtime(), after.ctime()),
        (
            lower_before.mode(),
            lower_before.mtime(),
            lower_before.ctime()
        )
    );
}

/// Append-only and immutable flags of a file split by a copy-up (a descriptor opened before
/// it): set through the old descriptor they hold for the name, set by name they hold for the
/// old descriptor, as kernel overlayfs has one inode for both.
#[test]
fn protection_flags_of_a_file_split_by_a_copy_up() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::io::AsRawFd;
    let l = Layers::new(1);
    l.lower(0).file("f", "lower\n").file("g", "lower\n");
    let m = passthrough_mount(&l);
    let all_flags = |f: &File| -> Result<u32, i32> {
        let mut flags: libc::c_int = 0;
        // SAFETY: a live fd and a buffer of the size the ioctl writes.
        match unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_GETFLAGS, &mut flags) } {
            0 => Ok(flags as u32),
            _ => Err(std::io::Error::last_os_error().raw_os_error().unwrap()),
        }
    };
    let flags_of = |f: &File| all_flags(f).map(|x| x & (FS_APPEND_FL | FS_IMMUTABLE_FL));
    // As chattr does: the flags read, the protection flags replaced.
    let set_flags_of = |f: &File, prot: u32| {
        let flags =
            (all_flags(f).unwrap() & !(FS_APPEND_FL | FS_IMMUTABLE_FL) | prot) as libc::c_int;
        // SAFETY: a live fd and the int the ioctl reads.
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_SETFLAGS, &flags) };
        assert_eq!(
            rc,
            0,
            "FS_IOC_SETFLAGS: {}",
            std::io::Error::last_os_error()
        );
    };
    let split = |name: &str| {
        let ro = File::open(m.path(name)).unwrap();
        OpenOptions::new().append(true).open(m.path(name)).unwrap();
        ro
    };
    let chmod = |p: &std::path::Path| {
        fs::set_permissions(p, fs::Permissions::from_mode(0o600)).map_err(|e| e.raw_os_error())
    };

    // Set through the old descriptor: the name is append-only.
    let f = split("f");
    set_flags_of(&f, FS_APPEND_FL);
    assert_eq!(get_flags(&m.path("f")).map(|x| x & 0x30), Ok(FS_APPEND_FL));
    assert_eq!(chmod(&m.path("f")), Err(Some(libc::EPERM)));
    assert_eq!(
        errno(OpenOptions::new().write(true).open(m.path("f"))),
        libc::EPERM
    );
    assert_eq!(errno(fs::remove_file(m.path("f"))), libc::EPERM);
    set_flags_of(&f, 0);
    assert_eq!(chmod(&m.path("f")), Ok(()));

    // Set by name: the old descriptor sees it and changes nothing through it.
    let g = split("g");
    add_flags(&m.path("g"), FS_IMMUTABLE_FL).unwrap();
    assert_eq!(flags_of(&g), Ok(FS_IMMUTABLE_FL));
    assert_eq!(
        errno(g.set_permissions(fs::Permissions::from_mode(0o600))),
        libc::EPERM
    );
    let name = c"user.k";
    // SAFETY: a live fd, a NUL-terminated name and a 1-byte value.
    let rc = unsafe { libc::fsetxattr(g.as_raw_fd(), name.as_ptr(), b"v".as_ptr().cast(), 1, 0) };
    let err = std::io::Error::last_os_error().raw_os_error();
    assert_eq!((rc, err), (-1, Some(libc::EPERM)));
    remove_flags(&m.path("g"), FS_IMMUTABLE_FL).unwrap();
    assert_eq!(flags_of(&g), Ok(0));
}

/// A file open read-only from a lower layer, hard-linked (which copies it up), then opened
/// again: its names move to a new inode together, so both show one inode and two links, as
/// on kernel overlayfs.
#[test]
fn names_of_a_file_split_by_a_copy_up_stay_one_inode() {
    let l = Layers::new(1);
    l.lower(0).file("f", "lower\n");
    let m = passthrough_mount(&l);
    let ro = File::open(m.path("f")).unwrap();
    fs::hard_link(m.path("f"), m.path("g")).unwrap();
    let again = File::open(m.path("g")).unwrap();
    // The kernel is told of the other name's move by the daemon's invalidation thread, which
    // may come a moment after the open returns.
    let g = fs::metadata(m.path("g")).unwrap();
    assert!(
        wait_until(std::time::Duration::from_secs(5), || {
            fs::metadata(m.path("f")).unwrap().ino() == g.ino()
        }),
        "f stays on the old inode"
    );
    let f = fs::metadata(m.path("f")).unwrap();
    assert_eq!((f.ino(), f.nlink()), (g.ino(), 2));
    assert_eq!(g.nlink(), 2);
    drop((ro, again));
}

#[test]
fn many_readers_and_writers_of_one_file() {
    let l = Layers::new(1);
    l.lower(0).file_bytes("data", &vec![7u8; 1 << 20]);
    let m = passthrough_mount(&l);
    let readers: Vec<File> = (0..4)
        .map(|_| File::open(m.path("data")).unwrap())
        .collect();
    let w = OpenOptions::new().write(true).open(m.path("data")).unwrap();
    w.write_at(&[9u8; 4096], 0).unwrap();
    let w2 = OpenOptions::new().write(true).open(m.path("data")).unwrap();
    w2.write_at(&[8u8; 4096], 8192).unwrap();
    let mut b = [0u8; 1];
    for r in &readers {
        r.read_at(&mut b, 0).unwrap();
        assert_eq!(b[0], 7, "old descriptors keep the lower data");
    }
    let now = fs::read(m.path("data")).unwrap();
    assert_eq!((now[0], now[8192], now[5000]), (9, 8, 7));
    assert!(
        fs::read(l.lowers[0].join("data"))
            .unwrap()
            .iter()
            .all(|&x| x == 7)
    );
    assert_eq!(fs::metadata(m.upper_path("data")).unwrap().size(), 1 << 20);
}

/// mmap through passthrough, shared and writable, reaches the upper copy only; the times
/// its writes set show in the view once the file is closed (the kernel's FUSE inode is not
/// told of a mapping's writes; they used to stay hidden behind its cached attributes).
#[test]
fn shared_mmap_write() {
    let l = Layers::new(1);
    l.lower(0).file_bytes("m", &[1u8; 8192]);
    let m = passthrough_mount(&l);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("m"))
        .unwrap();
    let before;
    // SAFETY: a mapping of a file we hold open, unmapped before the file is closed.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        *(p as *mut u8).add(100) = 42;
        assert_eq!(libc::msync(p, 8192, libc::MS_SYNC), 0);
        // The kernel caches the attributes now; the next write to the cleaned page sets the
        // times again.
        before = fs::metadata(m.path("m")).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        *(p as *mut u8).add(101) = 43;
        assert_eq!(libc::msync(p, 8192, libc::MS_SYNC), 0);
        libc::munmap(p, 8192);
    }
    drop(f);
    assert_eq!(fs::read(m.upper_path("m")).unwrap()[100..102], [42, 43]);
    assert_eq!(fs::read(l.lowers[0].join("m")).unwrap()[100], 1);
    let upper = fs::metadata(m.upper_path("m")).unwrap();
    assert!(upper.mtime_nsec() != before.mtime_nsec() || upper.mtime() != before.mtime());
    let time = |md: &fs::Metadata| (md.mtime(), md.mtime_nsec());
    // The release that drops the cached attributes is asynchronous.
    assert!(
        wait_until(std::time::Duration::from_secs(5), || {
            time(&fs::metadata(m.path("m")).unwrap()) == time(&upper)
        }),
        "view mtime {:?}, upper {:?}",
        time(&fs::metadata(m.path("m")).unwrap()),
        time(&upper)
    );
}

/// A lower layer whose files cannot back passthrough opens (itself on overlayfs: stacking
/// too deep) beside an upper whose files can: a lower file opened and mapped by a reader is
/// served by the daemon, and a writer's open copies it up. The kernel refuses passthrough on
/// an inode whose direct-I/O file is mapped, and a mapping while passthrough opens exist, so
/// the writer's open failed with EIO (and every open after it, until the reader unmapped), and
/// a mapping through a descriptor opened before the copy-up with ENODEV; kernel overlayfs
/// allows all of them. While the daemon serves an open of a file, it serves the new ones too.
#[test]
fn opens_beside_a_mapped_file_the_daemon_serves() {
    use std::os::fd::AsRawFd;
    let l = Layers::new(1);
    l.lower(0)
        .file_bytes("f", &[b'A'; 10000])
        .file_bytes("g", &[b'A'; 10000]);
    let base = l.mkdir("stack");
    let (ou, ow, stacked) = (base.join("ou"), base.join("ow"), base.join("lower"));
    let (upper, work, merged) = (base.join("u"), base.join("w"), base.join("m"));
    for d in [&ou, &ow, &stacked, &upper, &work, &merged] {
        fs::create_dir(d).unwrap();
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        l.lowers[0].display(),
        ou.display(),
        ow.display()
    );
    let _lower_fs = scratch_mount(&["-t", "overlay", "-o", &opts], "overlay", &stacked);
    let args: Vec<std::ffi::OsString> = vec![
        "--lower".into(),
        stacked.clone().into(),
        "--upper".into(),
        upper.clone().into(),
        "--work".into(),
        work.clone().into(),
        "--passthrough".into(),
        "auto".into(),
        merged.clone().into(),
    ];
    let m = Mount::union(&args, merged, Some(upper), Some(work));
    let map = |f: &File| {
        // SAFETY: a read-only shared mapping of an open file, checked, unmapped by the caller.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                10000,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        p
    };
    let reader = File::open(m.path("f")).unwrap();
    let mapped = map(&reader);
    let w = OpenOptions::new().write(true).open(m.path("f"));
    let w = w.expect("a write open beside a mapped reader");
    w.write_all_at(b"BB", 0).unwrap();
    drop(w);
    assert_eq!(&fs::read(m.path("f")).unwrap()[..3], b"BBA");
    // SAFETY: the mapping made above, of 10000 bytes.
    unsafe { libc::munmap(mapped, 10000) };
    drop(reader);

    let older = File::open(m.path("g")).unwrap();
    let w = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("g"))
        .unwrap();
    w.write_all_at(b"CC", 0).unwrap();
    let mapped = map(&older);
    // SAFETY: the mapping made above, of 10000 bytes, read and unmapped.
    let head = unsafe {
        let head = std::slice::from_raw_parts(mapped as *const u8, 3).to_vec();
        libc::munmap(mapped, 10000);
        head
    };
    assert_eq!(
        head, b"CCA",
        "a mapping through a descriptor opened before the copy-up"
    );
    assert_eq!(&fs::read(l.lowers[0].join("f")).unwrap()[..2], b"AA");
}
