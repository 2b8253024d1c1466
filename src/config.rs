//! Both command-line forms, the `-o` options, and the checks on layer paths made before
//! anything is created or mounted.
//!
//! ```text
//! unionmount --lower L1:L2 [--upper U [--work W]] MERGED [options]
//! unionmount [SOURCE] MERGED -o lowerdir=L1:L2,upperdir=U,workdir=W[,more]
//! ```

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::idmap::{self, IdMap};
use crate::mountinfo;
use crate::union::Options;

pub const MAX_LAYERS: usize = 500;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Passthrough {
    Auto,
    On,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "unionmount",
    version,
    about = "Mount read-only lower layers and an optional writable upper layer as one merged tree (an OverlayFS-compatible union filesystem in user space).",
    override_usage = "unionmount --lower L1[:L2...] [--upper U [--work W]] MERGED [options]\n       unionmount [SOURCE] MERGED -o lowerdir=L1[:L2...][,upperdir=U,workdir=W][,...]",
    after_help = "Without --upper the mount is read-only. Without --work, the work directory is .NAME.work next to the upper directory NAME (created if missing). \
Options for -o: lowerdir=, upperdir=, workdir=, uidmapping=C:H:N[:C:H:N...], gidmapping=, squash_to_root, squash_to_uid=N, squash_to_gid=N, \
xattr_permissions=0|1|2, static_nlink, readdirplus=off|auto|on, timeout=SECONDS, threaded=0|1, fsync=0|1, volatile, noacl, noxattrs=0|1, debug, ro, rw, allow_other, allow_root, \
default_permissions, dev, nodev, suid, nosuid, exec, noexec, atime, noatime, nodiratime, context=\"...\". Unknown options are warned about and ignored.\n\
Unmount with: fusermount3 -u MERGED (or umount MERGED)."
)]
struct Cli {
    /// Read-only layers, top-most first, separated by ':' (write '\:' for a ':' in a path)
    #[arg(long, value_name = "L1:L2:...")]
    lower: Option<OsString>,
    /// The writable layer (without it the mount is read-only)
    #[arg(long, value_name = "DIR")]
    upper: Option<PathBuf>,
    /// Scratch directory on the upper's filesystem [default: .NAME.work beside the upper]
    #[arg(long, value_name = "DIR")]
    work: Option<PathBuf>,
    /// Stay in the foreground (default: return once the mount is live)
    #[arg(short = 'f', long)]
    foreground: bool,
    /// Stay in the foreground and log every request (--foreground --log-level debug)
    #[arg(short = 'd', long)]
    debug: bool,
    /// Request-serving threads [default: twice the CPUs, at least 4]
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Microseconds the reading thread polls for the next request before it sleeps (0: never
    /// polls; at most 10000)
    #[arg(long, value_name = "US", default_value_t = 50)]
    spin_us: u64,
    /// Serve open files straight from the backing file in the kernel (needs root)
    #[arg(long, value_enum, default_value = "auto")]
    passthrough: Passthrough,
    #[arg(long, value_enum, default_value = "warn")]
    log_level: LogLevel,
    /// Mount options, comma-separated; may repeat
    #[arg(short = 'o', value_name = "OPT[,OPT...]", action = clap::ArgAction::Append)]
    options: Vec<OsString>,
    /// [SOURCE] MERGED: the mountpoint, optionally preceded by a source name for /proc/mounts
    #[arg(value_name = "MERGED", num_args = 0..)]
    paths: Vec<PathBuf>,
}

/// Flags for the mount itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MountFlags {
    pub read_only: bool,
    pub dev: bool,
    pub suid: bool,
    pub noexec: bool,
    pub noatime: bool,
    pub nodiratime: bool,
    /// `Some` when given explicitly; root mounts default to allowing other users.
    pub allow_other: Option<bool>,
    pub allow_root: bool,
}

impl MountFlags {
    /// Applies the generic mount flag `key` (`nodev`, `exec`, `noatime`, ...).
    fn set(&mut self, key: &str) {
        match key {
            "dev" => self.dev = true,
            "nodev" => self.dev = false,
            "suid" => self.suid = true,
            "nosuid" => self.suid = false,
            "exec" => self.noexec = false,
            "noexec" => self.noexec = true,
            "atime" | "relatime" | "strictatime" => self.noatime = false,
            "noatime" => self.noatime = true,
            "diratime" => self.nodiratime = false,
            "nodiratime" => self.nodiratime = true,
            _ => {}
        }
    }

    /// The `MS_*` flags the generic mount flag `key` sets (true) or clears (false), for a
    /// remount.
    fn ms_changes(key: &str) -> Vec<(u64, bool)> {
        let (noatime, relatime, strict) =
            (libc::MS_NOATIME, libc::MS_RELATIME, libc::MS_STRICTATIME);
        match key {
            "dev" => vec![(libc::MS_NODEV, false)],
            "nodev" => vec![(libc::MS_NODEV, true)],
            "suid" => vec![(libc::MS_NOSUID, false)],
            "nosuid" => vec![(libc::MS_NOSUID, true)],
            "exec" => vec![(libc::MS_NOEXEC, false)],
            "noexec" => vec![(libc::MS_NOEXEC, true)],
            "atime" => vec![(noatime, false)],
            "relatime" => vec![(noatime, false), (strict, false), (relatime, true)],
            "strictatime" => vec![(noatime, false), (relatime, false), (strict, true)],
            "noatime" => vec![(noatime, true)],
            "diratime" => vec![(libc::MS_NODIRATIME, false)],
            "nodiratime" => vec![(libc::MS_NODIRATIME, true)],
            _ => vec![],
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub lowers: Vec<PathBuf>,
    pub upper: Option<PathBuf>,
    pub work: Option<PathBuf>,
    pub mountpoint: PathBuf,
    pub fsname: String,
    pub foreground: bool,
    pub threads: usize,
    /// How long the reading thread polls for the next request (zero: it never polls).
    pub spin: std::time::Duration,
    pub passthrough: Passthrough,
    pub log_level: LogLevel,
    pub flags: MountFlags,
    pub opts: Options,
    /// Lines to print as warnings (unknown options).
    pub warnings: Vec<String>,
}

/// `-o remount,...` (what `mount -o remount` hands a mount helper): change the flags of a
/// live mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remount {
    pub mountpoint: PathBuf,
    /// `Some(true)` for ro, `Some(false)` for rw, `None` to keep.
    pub read_only: Option<bool>,
    /// The other mount flags asked for (`nosuid`, `exec`, `noatime`, ...), in order: the
    /// `MS_*` flag, and whether it is set or cleared.
    pub changes: Vec<(u64, bool)>,
}

/// What parsing asks the caller to do.
pub enum Parsed {
    Mount(Box<Config>),
    Remount(Remount),
    /// --help or --version: print this and exit 0.
    Print(String),
}

/// Splits an option string on commas outside double quotes; a backslash keeps the next
/// character (escapes survive for the layer-list splitter).
pub fn split_options(s: &str) -> Vec<String> {
    split_option_bytes(s.as_bytes())
        .into_iter()
        .map(|o| String::from_utf8(o).expect("split at ASCII bytes only"))
        .collect()
}

/// `split_options` of bytes: an option's value may be a path, which need not be UTF-8.
fn split_option_bytes(s: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut quoted = false;
    let mut bytes = s.iter();
    while let Some(&c) = bytes.next() {
        match c {
            b'\\' => {
                cur.push(c);
                if let Some(&n) = bytes.next() {
                    cur.push(n);
                }
            }
            b'"' => {
                quoted = !quoted;
                cur.push(c);
            }
            b',' if !quoted => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out.retain(|o| !o.is_empty());
    out
}

/// Splits a layer list on ':' where `\:` (and any `\X`) stands for the character itself.
pub fn split_layers(s: &OsStr) -> Vec<PathBuf> {
    unescaped_paths(s, Some(b':'))
}

/// A path given in an option, where `\X` stands for X.
fn unescape(s: &OsStr) -> PathBuf {
    unescaped_paths(s, None).pop().unwrap_or_default()
}

/// The paths of `s` split at `sep` (one path without it), where `\X` stands for X. Bytes,
/// not characters: a path need not be UTF-8 (`\\` and `:` are ASCII either way).
fn unescaped_paths(s: &OsStr, sep: Option<u8>) -> Vec<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    let path = |b: Vec<u8>| PathBuf::from(OsString::from_vec(b));
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut bytes = s.as_bytes().iter();
    while let Some(&c) = bytes.next() {
        if c == b'\\' {
            if let Some(&n) = bytes.next() {
                cur.push(n);
            }
        } else if Some(c) == sep {
            out.push(path(std::mem::take(&mut cur)));
        } else {
            cur.push(c);
        }
    }
    out.push(path(cur));
    out
}

fn parse_num(opt: &str, v: &str) -> Result<u32, String> {
    v.parse::<u32>()
        .map_err(|_| format!("option {opt}: {v:?} is not a number"))
}

fn parse_bool01(opt: &str, v: &str) -> Result<bool, String> {
    match v {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(format!("option {opt}: {v:?} must be 0 or 1")),
    }
}

fn default_threads() -> usize {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    (cpus * 2).clamp(4, 32)
}

/// Parses the command line (program name first).
pub fn parse<I: IntoIterator<Item = OsString>>(args: I) -> Result<Parsed, String> {
    parse_args(args).map_err(|e| one_line(&e))
}

/// Error messages are one line, whatever the paths and values in them hold.
pub fn one_line(msg: &str) -> String {
    msg.replace('\n', "\\n").replace('\r', "\\r")
}

fn parse_args<I: IntoIterator<Item = OsString>>(args: I) -> Result<Parsed, String> {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                return Ok(Parsed::Print(e.to_string()));
            }
            let text = e.to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ")
                .to_string();
            return Err(format!("{first} (see unionmount --help)"));
        }
    };
    let mut lower = cli.lower.map(|l| (l, "--lower"));
    let mut upper = cli.upper.clone();
    let mut work = cli.work.clone();
    // Set-user-ID programs run from a root mount (as on kernel overlayfs, and as fuse-overlayfs
    // mounts as root: containers' sudo, su and passwd need it); `nosuid` turns it off.
    let mut flags = MountFlags {
        suid: crate::sys::geteuid() == 0,
        ..MountFlags::default()
    };
    let mut opts = Options::default();
    let mut warnings = Vec::new();
    let mut threads = cli.threads;
    let mut fsname = None;
    let mut squash_root = false;
    let mut debug = cli.debug;
    let mut idmap = IdMap::default();
    let mut remount = false;
    let mut ro_given = None;
    let mut changes: Vec<(u64, bool)> = Vec::new();

    for group in &cli.options {
        for opt in split_option_bytes(group.as_bytes()) {
            use std::os::unix::ffi::OsStringExt;
            let (key, value) = match opt.iter().position(|&b| b == b'=') {
                Some(at) => (&opt[..at], Some(OsString::from_vec(opt[at + 1..].to_vec()))),
                None => (&opt[..], None),
            };
            let key = String::from_utf8_lossy(key).into_owned();
            // A path (any bytes).
            let need_path = |v: &Option<OsString>| -> Result<OsString, String> {
                v.clone()
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| format!("option {key} needs a value ({key}=...)"))
            };
            let need = |v: &Option<OsString>| -> Result<String, String> {
                need_path(v)?
                    .into_string()
                    .map_err(|v| format!("option {key} has a value that is not UTF-8: {v:?}"))
            };
            // A flag: `ro=0` must not mount read-only.
            let flag = |v: &Option<OsString>| -> Result<(), String> {
                match v {
                    Some(v) => Err(format!(
                        "option {key} takes no value (got {key}={})",
                        v.to_string_lossy()
                    )),
                    None => Ok(()),
                }
            };
            let twice = |what: &str, opt: &str, flag: &str, from_flag: bool| {
                if from_flag {
                    format!("{what} given twice ({flag} and {opt}=)")
                } else {
                    format!("{what} given twice ({opt}= more than once)")
                }
            };
            match key.as_str() {
                "lowerdir" => {
                    if let Some((_, from)) = &lower {
                        let cli = *from == "--lower";
                        return Err(twice("lower layers", "lowerdir", "--lower", cli));
                    }
                    lower = Some((need_path(&value)?, "lowerdir="));
                }
                "upperdir" => {
                    if upper.is_some() {
                        let cli = cli.upper.is_some();
                        return Err(twice("upper layer", "upperdir", "--upper", cli));
                    }
                    upper = Some(unescape(&need_path(&value)?));
                }
                "workdir" => {
                    if work.is_some() {
                        let cli = cli.work.is_some();
                        return Err(twice("work directory", "workdir", "--work", cli));
                    }
                    work = Some(unescape(&need_path(&value)?));
                }
                "uidmapping" => {
                    idmap.uids = idmap::parse_ranges(&need(&value)?)
                        .map_err(|e| format!("option uidmapping: {e}"))?
                }
                "gidmapping" => {
                    idmap.gids = idmap::parse_ranges(&need(&value)?)
                        .map_err(|e| format!("option gidmapping: {e}"))?
                }
                "squash_to_root" => {
                    flag(&value)?;
                    squash_root = true;
                }
                "squash_to_uid" => idmap.squash_uid = Some(parse_num(&key, &need(&value)?)?),
                "squash_to_gid" => idmap.squash_gid = Some(parse_num(&key, &need(&value)?)?),
                "xattr_permissions" => {
                    let v = need(&value)?;
                    opts.xattr_permissions = match v.as_str() {
                        "0" => 0,
                        "1" => 1,
                        "2" => 2,
                        _ => {
                            return Err(format!(
                                "option xattr_permissions: {v:?} must be 0, 1 or 2"
                            ));
                        }
                    }
                }
                "static_nlink" => {
                    flag(&value)?;
                    opts.static_nlink = true;
                }
                "timeout" => {
                    let v = need(&value)?;
                    let secs: f64 = v
                        .parse()
                        .ok()
                        .filter(|s: &f64| s.is_finite() && *s >= 0.0 && *s < 1e9)
                        .ok_or_else(|| {
                            format!("option timeout: {v:?} is not a number of seconds")
                        })?;
                    opts.ttl = Duration::from_secs_f64(secs);
                }
                "threaded" => {
                    if !parse_bool01(&key, &need(&value)?)? {
                        threads = Some(1);
                    }
                }
                "fsync" => opts.fsync = parse_bool01(&key, &need(&value)?)?,
                "volatile" => {
                    flag(&value)?;
                    opts.fsync = false;
                }
                "noacl" => {
                    flag(&value)?;
                    opts.posix_acl = false;
                }
                "noxattrs" => opts.no_xattrs = parse_bool01(&key, &need(&value)?)?,
                // fuse-overlayfs's (libfuse's) debugging mode.
                "debug" => {
                    flag(&value)?;
                    debug = true;
                }
                "readdirplus" => {
                    opts.readdirplus = match need(&value)?.as_str() {
                        "off" => crate::union::ReaddirPlus::Off,
                        "auto" => crate::union::ReaddirPlus::Auto,
                        "on" => crate::union::ReaddirPlus::On,
                        v => {
                            return Err(format!(
                                "option readdirplus: {v:?} must be off, auto or on"
                            ));
                        }
                    }
                }
                "ro" | "rw" => {
                    flag(&value)?;
                    flags.read_only = key == "ro";
                    ro_given = Some(flags.read_only);
                }
                "remount" => {
                    flag(&value)?;
                    remount = true;
                }
                "allow_other" => {
                    flag(&value)?;
                    flags.allow_other = Some(true);
                }
                "allow_root" => {
                    flag(&value)?;
                    flags.allow_root = true;
                }
                "default_permissions" => flag(&value)?,
                "dev" | "nodev" | "suid" | "nosuid" | "exec" | "noexec" | "atime" | "relatime"
                | "strictatime" | "noatime" | "diratime" | "nodiratime" => {
                    flag(&value)?;
                    flags.set(&key);
                    changes.extend(MountFlags::ms_changes(&key));
                }
                "fsname" => fsname = Some(need(&value)?),
                // SELinux labels: nothing to do without an LSM that labels FUSE mounts.
                "context" | "fscontext" | "defcontext" | "rootcontext" | "subtype" => {}
                _ => warnings.push(format!(
                    "unknown option {:?} ignored",
                    String::from_utf8_lossy(&opt)
                )),
            }
        }
    }
    if opts.no_xattrs {
        // No ACLs either: the kernel would ask for them at every permission check of a
        // non-owner, and take ENOTSUP for the answer (EOPNOTSUPP to ls, cat, ...).
        opts.posix_acl = false;
    }
    if squash_root {
        idmap.squash_uid.get_or_insert(0);
        idmap.squash_gid.get_or_insert(0);
    }
    opts.idmap = idmap;
    opts.noatime = flags.noatime;
    opts.dir_atime = !(flags.noatime || flags.nodiratime || flags.read_only);

    if remount {
        let mountpoint = cli
            .paths
            .last()
            .cloned()
            .ok_or_else(|| "remount: no mountpoint given".to_string())?;
        return Ok(Parsed::Remount(Remount {
            mountpoint,
            read_only: ro_given,
            changes,
        }));
    }

    let (lower, lower_from) = lower.ok_or_else(|| {
        "no lower layer given (use --lower DIR[:DIR...] or -o lowerdir=DIR[:DIR...])".to_string()
    })?;
    let lowers = split_layers(&lower);
    if lowers.iter().any(|l| l.as_os_str().is_empty()) {
        return Err(format!("{lower_from} has an empty layer path in {lower:?}"));
    }
    if lowers.len() > MAX_LAYERS {
        return Err(format!(
            "{} lower layers given; at most {MAX_LAYERS} are supported",
            lowers.len()
        ));
    }
    if work.is_some() && upper.is_none() {
        return Err("a work directory was given without an upper layer".into());
    }
    let (source, mountpoint) = match cli.paths.len() {
        0 => return Err("no mountpoint given (the last argument is the merged directory)".into()),
        1 => (None, cli.paths[0].clone()),
        2 => (Some(cli.paths[0].clone()), cli.paths[1].clone()),
        _ => {
            return Err(format!(
                "too many arguments: expected [SOURCE] MERGED, got {:?}",
                cli.paths
            ));
        }
    };
    let fsname = fsname
        .or(source.map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "unionmount".to_string());
    if fsname.contains(',') || fsname.contains('\n') {
        return Err(format!(
            "the source name {fsname:?} may not contain ',' or a newline"
        ));
    }
    // mount(2) takes a source of at most a page (and fusermount3 its options string).
    if fsname.len() >= 4096 {
        return Err(format!(
            "the source name is {} bytes long; at most 4095 are allowed",
            fsname.len()
        ));
    }
    if upper.is_none() {
        flags.read_only = true;
    }
    let threads = threads.unwrap_or_else(default_threads);
    if threads == 0 || threads > 1024 {
        return Err(format!("--threads {threads}: must be between 1 and 1024"));
    }
    if cli.spin_us > 10_000 {
        return Err(format!(
            "--spin-us {}: must be at most 10000 (10 ms)",
            cli.spin_us
        ));
    }
    Ok(Parsed::Mount(Box::new(Config {
        lowers,
        upper,
        work,
        mountpoint,
        fsname,
        foreground: cli.foreground || debug,
        threads,
        spin: std::time::Duration::from_micros(cli.spin_us),
        passthrough: cli.passthrough,
        log_level: if debug {
            LogLevel::Debug
        } else {
            cli.log_level
        },
        flags,
        opts,
        warnings,
    })))
}

/// Paths after checking, canonical.
#[derive(Debug)]
pub struct Paths {
    pub lowers: Vec<PathBuf>,
    pub upper: Option<PathBuf>,
    /// The work directory, and whether it has to be created (the default one).
    pub work: Option<(PathBuf, bool)>,
    pub mountpoint: PathBuf,
}

fn describe(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOENT) => "does not exist".into(),
        Some(libc::ENOTDIR) => "is not a directory".into(),
        Some(libc::EACCES) => "is not accessible (permission denied)".into(),
        Some(libc::ELOOP) => "has too many levels of symbolic links".into(),
        _ => format!("cannot be used: {e}"),
    }
}

/// A directory that must exist; returns its canonical path.
fn existing_dir(what: &str, p: &Path, need: libc::c_int) -> Result<PathBuf, String> {
    let meta =
        std::fs::metadata(p).map_err(|e| format!("{what} {} {}", p.display(), describe(&e)))?;
    if !meta.is_dir() {
        return Err(format!("{what} {} is not a directory", p.display()));
    }
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{what} {} contains a NUL byte", p.display()))?;
    if let Err(e) = crate::sys::access(&c, need) {
        let e = std::io::Error::from_raw_os_error(e.code());
        let mode = if need & libc::W_OK != 0 {
            "writable"
        } else {
            "readable"
        };
        return Err(format!("{what} {} is not {mode}: {e}", p.display()));
    }
    p.canonicalize()
        .map_err(|e| format!("{what} {}: {}", p.display(), describe(&e)))
}

/// Checks every path of a config: existence, type, access, filesystems, and that no two of
/// them are the same directory or nested in each other.
pub fn check_paths(cfg: &Config) -> Result<Paths, String> {
    check_paths_inner(cfg).map_err(|e| one_line(&e))
}

fn check_paths_inner(cfg: &Config) -> Result<Paths, String> {
    let mut named: Vec<(String, PathBuf)> = Vec::new();
    let mut lowers = Vec::new();
    for (i, l) in cfg.lowers.iter().enumerate() {
        let what = if cfg.lowers.len() > 1 {
            format!("lower layer {} ({})", i + 1, l.display())
        } else {
            format!("lower layer {}", l.display())
        };
        let what_short = "lower layer";
        let c = existing_dir(what_short, l, libc::R_OK | libc::X_OK)?;
        named.push((what, c.clone()));
        lowers.push(c);
    }
    let upper = match &cfg.upper {
        Some(u) => {
            let c = existing_dir("upper layer", u, libc::R_OK | libc::W_OK | libc::X_OK)?;
            named.push((format!("upper layer {}", u.display()), c.clone()));
            Some(c)
        }
        None => None,
    };
    let work = match (&upper, &cfg.work) {
        (None, _) => None,
        (Some(_), Some(w)) => {
            let c = existing_dir("work directory", w, libc::R_OK | libc::W_OK | libc::X_OK)?;
            named.push((format!("work directory {}", w.display()), c.clone()));
            Some((c, false))
        }
        (Some(u), None) => {
            let name = u
                .file_name()
                .ok_or_else(|| "the upper layer cannot be / without --work".to_string())?;
            let mut n = OsString::from(".");
            n.push(name);
            n.push(".work");
            let w = u.parent().unwrap_or(Path::new("/")).join(n);
            let create = match std::fs::symlink_metadata(&w) {
                Ok(m) if m.is_dir() => false,
                Ok(_) => {
                    return Err(format!(
                        "the default work directory {} exists and is not a directory (give --work)",
                        w.display()
                    ));
                }
                Err(_) => true,
            };
            let parent_dev = std::fs::metadata(w.parent().unwrap_or(Path::new("/")))
                .map(|m| m.dev())
                .unwrap_or(0);
            let upper_dev = std::fs::metadata(u).map(|m| m.dev()).unwrap_or(1);
            if create && parent_dev != upper_dev {
                return Err(format!(
                    "the upper layer {} is the root of a filesystem, so the default work directory {} would be on another one (give --work on the upper's filesystem)",
                    u.display(),
                    w.display()
                ));
            }
            let parent = w.parent().unwrap_or(Path::new("/"));
            let at = if create { parent } else { w.as_path() };
            if !same_mount(u, at) {
                return Err(format!(
                    "the upper layer {} is the root of a mount, so the default work directory {} would be on another mount (give --work under the upper's mount)",
                    u.display(),
                    w.display()
                ));
            }
            if !create {
                named.push((format!("work directory {}", w.display()), w.clone()));
            }
            Some((w, create))
        }
    };
    if let (Some(u), Some((w, false))) = (&upper, &work) {
        let ud = std::fs::metadata(u).map(|m| m.dev()).unwrap_or(0);
        let wd = std::fs::metadata(w).map(|m| m.dev()).unwrap_or(1);
        if ud != wd {
            // One mount, two devices: a btrfs subvolume, which renames do not leave either.
            let place = match crate::sys::mount_id(u).zip(crate::sys::mount_id(w)) {
                Some((a, b)) if a == b => "btrfs subvolume",
                _ => "filesystem",
            };
            return Err(format!(
                "work directory {} is on another {place} than the upper layer {} (it must be on the same one)",
                w.display(),
                u.display()
            ));
        }
    }
    let mountpoint = existing_dir("mountpoint", &cfg.mountpoint, libc::X_OK)?;
    named.push((
        format!("mountpoint {}", cfg.mountpoint.display()),
        mountpoint.clone(),
    ));

    check_overlaps(&named, &mountinfo::read())?;
    if let (Some(u), Some((w, false))) = (&upper, &work)
        && !same_mount(u, w)
    {
        return Err(format!(
            "work directory {} is on another mount than the upper layer {} (a bind mount; it must be under the upper's mount, where a rename from one to the other works)",
            w.display(),
            u.display()
        ));
    }
    if let Some((w, true)) = &work
        && let Some(u) = &upper
        && w.starts_with(u)
    {
        return Err("the default work directory would be inside the upper layer".into());
    }
    Ok(Paths {
        lowers,
        upper,
        work,
        mountpoint,
    })
}

/// Whether `a` and `b` are under the same mount: a rename between two mounts of one
/// filesystem fails (EXDEV), so copy-up from the work directory would. True where the kernel
/// does not say.
fn same_mount(a: &Path, b: &Path) -> bool {
    match (crate::sys::mount_id(a), crate::sys::mount_id(b)) {
        (Some(x), Some(y)) => x == y,
        _ => true,
    }
}

/// The same directory twice, or one inside another: by path, and by place in the filesystem
/// (`mounts`), since a directory may also be reached through a bind mount of it or of one
/// above it (kernel overlayfs refuses these too).
fn check_overlaps(named: &[(String, PathBuf)], mounts: &[mountinfo::Mount]) -> Result<(), String> {
    let places: Vec<_> = named
        .iter()
        .map(|(_, p)| mountinfo::place(mounts, p))
        .collect();
    for (i, (a, pa)) in named.iter().enumerate() {
        for (j, (b, pb)) in named.iter().enumerate() {
            if i == j {
                continue;
            }
            let (same_place, place_inside) = match (&places[i], &places[j]) {
                (Some((da, qa)), Some((db, qb))) if da == db => {
                    (qa == qb, qa != qb && qa.starts_with(qb))
                }
                _ => (false, false),
            };
            let path_inside = pa != pb && pa.starts_with(pb);
            if (pa == pb || same_place) && i < j {
                let bind = if pa == pb {
                    ""
                } else {
                    " (one reached through a bind mount)"
                };
                if b.starts_with("mountpoint") {
                    return Err(format!("the {b} is itself a layer ({a}){bind}"));
                }
                return Err(format!(
                    "the same directory is given twice: {a} and {b}{bind}"
                ));
            }
            if pa != pb && !same_place && (path_inside || place_inside) {
                let bind = if path_inside {
                    ""
                } else {
                    " (reached through a bind mount)"
                };
                return Err(format!(
                    "{a} is inside {b}{bind}; layers, work directory and mountpoint must not overlap"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlaps_through_bind_mounts() {
        let mounts = mountinfo::parse(
            "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
             30 22 8:1 /srv/upper/sub /mnt/alias rw - ext4 /dev/sda1 rw\n\
             31 22 0:40 / /tmp rw - tmpfs tmpfs rw\n",
        );
        let named = |l: &str, u: &str| {
            vec![
                ("lower".to_string(), PathBuf::from(l)),
                ("upper".to_string(), PathBuf::from(u)),
            ]
        };
        let e = check_overlaps(&named("/mnt/alias", "/srv/upper"), &mounts).unwrap_err();
        assert!(e.contains("lower is inside upper"), "{e}");
        let e = check_overlaps(&named("/mnt/alias", "/srv/upper/sub"), &mounts).unwrap_err();
        assert!(e.contains("same directory"), "{e}");
        assert!(check_overlaps(&named("/srv/lower", "/srv/upper"), &mounts).is_ok());
        assert!(check_overlaps(&named("/tmp/srv/upper/sub", "/srv/upper"), &mounts).is_ok());
        // Without mountinfo, paths alone.
        let e = check_overlaps(&named("/srv/upper/x", "/srv/upper"), &[]).unwrap_err();
        assert!(e.contains("lower is inside upper;"), "{e}");
    }

    fn args(s: &[&str]) -> Vec<OsString> {
        std::iter::once("unionmount")
            .chain(s.iter().copied())
            .map(OsString::from)
            .collect()
    }

    fn cfg(s: &[&str]) -> Config {
        match parse(args(s)) {
            Ok(Parsed::Mount(c)) => *c,
            Ok(Parsed::Print(p)) => panic!("printed {p}"),
            Ok(Parsed::Remount(r)) => panic!("remount {r:?}"),
            Err(e) => panic!("error {e}"),
        }
    }

    #[test]
    fn remount_as_mount_helper() {
        match parse(args(&["src", "/m", "-o", "remount,ro"])) {
            Ok(Parsed::Remount(r)) => {
                assert_eq!(r.mountpoint, PathBuf::from("/m"));
                assert_eq!(r.read_only, Some(true));
            }
            _ => panic!("not a remount"),
        }
    }

    fn err(s: &[&str]) -> String {
        match parse(args(s)) {
            Err(e) => e,
            Ok(_) => panic!("accepted {s:?}"),
        }
    }

    #[test]
    fn flag_options_take_no_value() {
        let base = "lowerdir=/l,upperdir=/u,workdir=/w";
        for flag in [
            "ro=0",
            "static_nlink=0",
            "noacl=yes",
            "volatile=1",
            "nodev=1",
            "atime=0",
            "squash_to_root=1",
            "rw=1",
            "remount=1",
            "allow_other=0",
            "allow_root=1",
            "default_permissions=0",
            "dev=0",
            "suid=0",
            "nosuid=0",
            "exec=0",
            "noexec=0",
            "relatime=1",
            "strictatime=1",
            "noatime=0",
            "diratime=1",
            "nodiratime=0",
        ] {
            let e = err(&["/m", "-o", &format!("{base},{flag}")]);
            let key = flag.split('=').next().unwrap();
            assert!(
                e.contains(&format!("option {key} takes no value")),
                "{flag}: {e}"
            );
        }
    }

    #[test]
    fn a_source_name_longer_than_a_page_is_refused() {
        let long = "s".repeat(5000);
        let e = err(&[&long, "/m", "-o", "lowerdir=/l"]);
        assert!(e.contains("source name is 5000 bytes"), "{e}");
        assert_eq!(
            cfg(&[&long[..4095], "/m", "-o", "lowerdir=/l"])
                .fsname
                .len(),
            4095
        );
    }

    #[test]
    fn nodiratime_keeps_noatime() {
        let c = cfg(&["/m", "-o", "lowerdir=/l,noatime,nodiratime"]);
        assert!(c.flags.noatime && c.flags.nodiratime);
        let c = cfg(&["/m", "-o", "lowerdir=/l,nodiratime,atime"]);
        assert!(!c.flags.noatime && c.flags.nodiratime);
    }

    #[test]
    fn a_layer_option_given_twice_names_how() {
        let e = err(&["/m", "-o", "lowerdir=/a", "-o", "lowerdir=/b"]);
        assert!(e.contains("lowerdir= more than once"), "{e}");
        let e = err(&["--lower", "/a", "/m", "-o", "lowerdir=/b"]);
        assert!(e.contains("--lower and lowerdir="), "{e}");
        let e = err(&["/m", "-o", "lowerdir=/a,upperdir=/u,upperdir=/v"]);
        assert!(e.contains("upperdir= more than once"), "{e}");
        let e = err(&[
            "--work",
            "/w",
            "/m",
            "-o",
            "lowerdir=/a,upperdir=/u,workdir=/v",
        ]);
        assert!(e.contains("--work and workdir="), "{e}");
    }

    #[test]
    fn native_form() {
        let c = cfg(&["--lower", "a:b", "--upper", "u", "m"]);
        assert_eq!(c.lowers, vec![PathBuf::from("a"), PathBuf::from("b")]);
        assert_eq!(c.upper, Some(PathBuf::from("u")));
        assert_eq!(c.mountpoint, PathBuf::from("m"));
        assert_eq!(c.fsname, "unionmount");
        assert!(!c.flags.read_only);
    }

    #[test]
    fn fuse_overlayfs_form() {
        let c = cfg(&[
            "overlay",
            "/m",
            "-o",
            "rw,lowerdir=/l1:/l2,upperdir=/u,workdir=/w,dev,suid",
            "-o",
            "context=\"system_u:object_r:container_file_t:s0:c1,c2\",nodev",
        ]);
        assert_eq!(c.fsname, "overlay");
        assert_eq!(c.lowers.len(), 2);
        assert_eq!(c.work, Some(PathBuf::from("/w")));
        assert!(!c.flags.dev, "nodev comes last");
        assert!(c.flags.suid);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn escapes_and_quotes() {
        assert_eq!(
            split_options(r#"a=1,context="x,y",lowerdir=/a\,b:/c"#),
            vec!["a=1", "context=\"x,y\"", r"lowerdir=/a\,b:/c"]
        );
        assert_eq!(
            split_layers(r"/a\:b:/c\,d".as_ref()),
            vec![PathBuf::from("/a:b"), PathBuf::from("/c,d")]
        );
    }

    #[test]
    fn lower_paths_need_not_be_utf8() {
        use std::os::unix::ffi::OsStringExt;
        let lower = OsString::from_vec(b"/l\xff:/m\\:\xfe".to_vec());
        let args = [
            "unionmount".into(),
            "--lower".into(),
            lower,
            "/merged".into(),
        ];
        let Ok(Parsed::Mount(c)) = parse(args) else {
            panic!("refused");
        };
        let want =
            [b"/l\xff".to_vec(), b"/m:\xfe".to_vec()].map(|b| PathBuf::from(OsString::from_vec(b)));
        assert_eq!(c.lowers, want);
        // The same through -o, with upper and work directories, as mount(8) passes them.
        let o = b"lowerdir=/l\xff:/m\\:\xfe,upperdir=/u\xfd\\,x,workdir=/w\xfc".to_vec();
        let args = [
            "unionmount".into(),
            "/merged".into(),
            "-o".into(),
            OsString::from_vec(o),
        ];
        let Ok(Parsed::Mount(c)) = parse(args) else {
            panic!("refused");
        };
        assert_eq!(c.lowers, want);
        let path = |b: &[u8]| Some(PathBuf::from(OsString::from_vec(b.to_vec())));
        assert_eq!(c.upper, path(b"/u\xfd,x"));
        assert_eq!(c.work, path(b"/w\xfc"));
        // A value that is no path must be UTF-8: one clear line.
        let o = OsString::from_vec(b"lowerdir=/l,uidmapping=\xff".to_vec());
        let e = parse(["unionmount".into(), "/m".into(), "-o".into(), o]).err();
        assert!(e.is_some_and(|e| e.contains("uidmapping has a value that is not UTF-8")));
    }

    #[test]
    fn options_are_honoured() {
        let c = cfg(&[
            "m",
            "-o",
            "lowerdir=/l,squash_to_root,timeout=2.5,fsync=0,static_nlink,noacl,threaded=0,uidmapping=0:1000:1",
        ]);
        assert_eq!(c.opts.idmap.squash_uid, Some(0));
        assert_eq!(c.opts.ttl, Duration::from_millis(2500));
        assert!(!c.opts.fsync && c.opts.static_nlink && !c.opts.posix_acl);
        assert_eq!(c.threads, 1);
        assert!(c.flags.read_only, "no upper: read-only");
        assert_eq!(c.opts.idmap.uids.len(), 1);
    }

    #[test]
    fn unknown_options_warn() {
        let c = cfg(&["m", "-o", "lowerdir=/l,redirect_dir=off"]);
        assert_eq!(c.warnings.len(), 1);
        assert!(c.warnings[0].contains("redirect_dir"));
    }

    #[test]
    fn bad_input_is_one_line() {
        for (a, want) in [
            (&["m"][..], "no lower layer"),
            (&["--lower", "a"][..], "no mountpoint"),
            (&["--lower", "a", "x", "y", "z"][..], "too many arguments"),
            (
                &["m", "-o", "lowerdir=a,squash_to_uid=x"][..],
                "squash_to_uid",
            ),
            (
                &["m", "-o", "lowerdir=a,xattr_permissions=3"][..],
                "xattr_permissions",
            ),
            (&["m", "-o", "lowerdir=a,uidmapping=1:2"][..], "uidmapping"),
            (&["m", "-o", "lowerdir=a,timeout=soon"][..], "timeout"),
            (&["m", "--lower", "a", "-o", "lowerdir=b"][..], "twice"),
            (&["m", "--lower", "a:", "--upper", "u"][..], "empty layer"),
            (&["m", "--bogus"][..], "--bogus"),
            (
                &["m", "--lower", "a", "--work", "w"][..],
                "without an upper",
            ),
        ] {
            let e = err(a);
            assert!(e.contains(want), "{a:?}: {e}");
            assert!(!e.contains('\n'), "{a:?}: not one line: {e}");
        }
    }

    #[test]
    fn too_many_layers() {
        let many = vec!["l"; MAX_LAYERS + 1].join(":");
        assert!(err(&["--lower", &many, "m"]).contains("at most 500"));
        let ok = vec!["l"; MAX_LAYERS].join(":");
        assert_eq!(cfg(&["--lower", &ok, "m"]).lowers.len(), MAX_LAYERS);
    }
}
