//! pjdfstest (the POSIX conformance suite, `cargo install pjdfstest`) must find no failure,
//! both on an empty lower layer and inside a directory merged from two lower layers, with
//! open files passed through to the kernel (the root default) and through the page cache
//! with writeback caching (`--passthrough off`, the rootless path).
//! As the root of a rootless container's user namespace (the test user mapping itself to
//! root and its subordinate ids below), on both kinds of mount, it must fail nothing that
//! passes on a plain directory in the same namespace, but for char 0/0 nodes without
//! `xattr_permissions` (see scripts/pjdfstest.sh).
//! scripts/pjdfstest.sh does the runs; this test fails if pjdfstest is missing.

mod common;

use std::process::Command;

#[test]
fn pjdfstest_finds_no_failure_with_passthrough() {
    run("");
}

#[test]
fn pjdfstest_finds_no_failure_through_the_page_cache() {
    run("--passthrough off");
}

#[test]
fn pjdfstest_rootless_fails_only_where_ext4_does() {
    // Char 0/0 nodes: a user namespace may not make the stand-in device (kernel overlayfs
    // refuses them everywhere).
    rootless("", 298, 41);
}

#[test]
fn pjdfstest_rootless_with_xattr_permissions_fails_only_where_ext4_does() {
    // Devices are regular files carrying their type: char 0/0 nodes too.
    rootless("-o xattr_permissions=2", 339, 0);
}

#[test]
fn pjdfstest_rootless_with_uid_mapping_fails_only_where_ext4_does() {
    // As podman's `--userns=keep-id` maps ids for user 1000: a file of container id 1000 on
    // disk shows as the namespace's root, ids 0-999 as 1-1000 (so the mount's root directory
    // belongs to another user than the caller, which makes every path walk slower: README).
    let map = "0:1:1000:1000:0:1:1001:1001:64535";
    rootless(&format!("-o uidmapping={map},gidmapping={map}"), 298, 41);
}

/// One rootless run with daemon options `args`: `passed` tests must pass, and `char0` fail
/// only as char 0/0 nodes; the script fails the run if anything else fails that passes on
/// the plain directory.
fn rootless(args: &str, passed: u32, char0: u32) {
    common::test_user();
    common::ensure_subids(common::TEST_USER);
    let stdout = script(args, &[("ROOTLESS", "1"), ("TEST_USER", common::TEST_USER)]);
    for run in ["empty-lower", "merged-dir"] {
        let summary = stdout
            .lines()
            .find(|l| l.starts_with(&format!("rootless {run}: Summary:")))
            .unwrap_or_else(|| panic!("no summary for {run}:\n{stdout}"));
        assert!(
            summary.contains(&format!(", {passed} passed,")),
            "{summary}"
        );
        for line in [
            format!("rootless {run}: {char0} failed on char 0/0 nodes"),
            format!("rootless {run}: 0 other tests failed here"),
        ] {
            assert!(stdout.contains(&line), "{line}:\n{stdout}");
        }
    }
}

fn run(args: &str) {
    let stdout = script(args, &[]);
    let summaries: Vec<&str> = stdout.lines().filter(|l| l.contains("Summary:")).collect();
    assert_eq!(summaries.len(), 4, "two runs of two passes each:\n{stdout}");
    for s in &summaries {
        assert!(s.contains("Summary: 0 failed,"), "{s}");
    }
    // Everything but LINK_MAX (unknowable through FUSE) runs: 384 + 13 of 398.
    for run in ["empty-lower", "merged-dir"] {
        let passed = |part: &str| -> u32 {
            let line = summaries
                .iter()
                .find(|s| s.starts_with(&format!("{run} ({part})")))
                .unwrap_or_else(|| panic!("no summary for {run} {part}"));
            let n = line
                .split(", ")
                .find(|f| f.ends_with(" passed"))
                .expect("passed count");
            n.trim_end_matches(" passed")
                .trim()
                .parse()
                .expect("a number")
        };
        assert_eq!(
            passed("main") + passed("erofs"),
            397,
            "{run}: tests that ran"
        );
    }
}

/// Runs scripts/pjdfstest.sh on the test build with daemon options `args` and more
/// environment `env`; returns its output, which must report success.
fn script(args: &str, env: &[(&str, &str)]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pjdfstest.sh");
    let out = Command::new(script)
        .env("UNIONMOUNT", common::BIN)
        .env("UNIONMOUNT_ARGS", args)
        .envs(env.iter().copied())
        .output()
        .expect("run scripts/pjdfstest.sh");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "pjdfstest reported failures (or could not run):\n{stdout}\n{stderr}"
    );
    stdout
}
