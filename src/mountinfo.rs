//! The mount table as `/proc/self/mountinfo` lists it: which filesystem a path is on, and
//! where in that filesystem.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// One mount: its device (`major:minor`), the directory of its filesystem it shows, where
/// it is mounted, and its filesystem type.
pub struct Mount {
    pub dev: String,
    pub root: PathBuf,
    pub at: PathBuf,
    pub fstype: String,
}

/// The calling process's mounts, oldest first (none if mountinfo cannot be read).
pub fn read() -> Vec<Mount> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| parse(&info))
        .unwrap_or_default()
}

pub fn parse(info: &str) -> Vec<Mount> {
    // Fields: id parent major:minor root mountpoint options [optional...] - fstype source
    // superoptions.
    info.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            Some(Mount {
                dev: f.get(2)?.to_string(),
                root: unescape(f.get(3)?),
                at: unescape(f.get(4)?),
                fstype: f.get(sep + 1)?.to_string(),
            })
        })
        .collect()
}

/// The type of the newest mount of device `dev` (a `st_dev`) in the calling process's mounts.
pub fn type_of_dev(dev: u64) -> Option<String> {
    let want = format!("{}:{}", libc::major(dev), libc::minor(dev));
    read()
        .into_iter()
        .rev()
        .find(|m| m.dev == want)
        .map(|m| m.fstype)
}

/// The newest mount at `at` (a canonical path): the one a lookup of it reaches.
pub fn newest_at<'a>(mounts: &'a [Mount], at: &Path) -> Option<&'a Mount> {
    mounts.iter().rev().find(|m| m.at == at)
}

/// Where a directory (a canonical path) lies in its filesystem: the device and the path from
/// that filesystem's root, through the newest mount with the longest mountpoint above it.
/// The same directory reached through a bind mount has the same place.
pub fn place(mounts: &[Mount], p: &Path) -> Option<(String, PathBuf)> {
    let m = mounts
        .iter()
        .enumerate()
        .filter(|(_, m)| p.starts_with(&m.at))
        .max_by_key(|(i, m)| (m.at.components().count(), *i))?
        .1;
    let rest = p.strip_prefix(&m.at).ok()?;
    Some((m.dev.clone(), m.root.join(rest)))
}

/// A mountinfo path field (space, tab, newline and backslash are written `\ooo`).
fn unescape(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
                        30 22 8:1 /srv/upper/sub /mnt/alias rw - ext4 /dev/sda1 rw\n\
                        31 22 0:40 / /tmp rw shared:5 - tmpfs tmpfs rw\n\
                        32 22 8:1 /a\\040b /mnt/sp rw - ext4 /dev/sda1 rw\n\
                        33 22 0:41 / /tmp rw - tmpfs tmpfs rw\n";

    #[test]
    fn bind_mounts_are_placed_in_their_filesystem() {
        let m = parse(INFO);
        let at = |p: &str| place(&m, Path::new(p)).unwrap();
        assert_eq!(
            at("/mnt/alias/x"),
            ("8:1".into(), "/srv/upper/sub/x".into())
        );
        assert_eq!(at("/mnt/sp"), ("8:1".into(), "/a b".into()));
        assert_eq!(at("/srv/lower"), ("8:1".into(), "/srv/lower".into()));
        // The newest of two mounts at one place is the one seen.
        assert_eq!(at("/tmp/y"), ("0:41".into(), "/y".into()));
    }

    #[test]
    fn newest_mount_at_a_path() {
        let m = parse(INFO);
        let tmp = newest_at(&m, Path::new("/tmp")).unwrap();
        assert_eq!((tmp.dev.as_str(), tmp.fstype.as_str()), ("0:41", "tmpfs"));
        assert_eq!(
            newest_at(&m, Path::new("/mnt/sp")).unwrap().at,
            Path::new("/mnt/sp")
        );
        assert!(newest_at(&m, Path::new("/mnt")).is_none());
    }
}
