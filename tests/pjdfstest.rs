//! pjdfstest (the POSIX conformance suite, `cargo install pjdfstest`) must find no failure,
//! both on an empty lower layer and inside a directory merged from two lower layers, with
//! open files passed through to the kernel (the root default) and through the page cache
//! with writeback caching (`--passthrough off`, the rootless path).
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

fn run(args: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pjdfstest.sh");
    let out = Command::new(script)
        .env("UNIONMOUNT", common::BIN)
        .env("UNIONMOUNT_ARGS", args)
        .output()
        .expect("run scripts/pjdfstest.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "pjdfstest reported failures (or could not run):\n{stdout}\n{stderr}"
    );
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
