#!/bin/sh
# Long-form crash-safety run (tests/crash.rs, crash_rounds): kill -9 of the daemon at ROUNDS
# random moments of a script of large copy-ups, renames, rmdirs and whiteouts, each followed by
# a remount, a consistency check and a comparison with kernel overlayfs. Needs root, /dev/fuse
# and overlayfs. A failure prints the seed and round; pass the seed again to replay the run.
#
# Usage: scripts/crash.sh [ROUNDS (500)] [SEED (from the clock)] [MIB of the largest file (64)]
set -eu
cd "$(dirname "$0")/.."
rounds="${1:-500}"
seed="${2:-$(date +%s)}"
mib="${3:-64}"
echo "crash.sh: $rounds rounds, seed $seed, ${mib} MiB"
UNIONMOUNT_CRASH_ROUNDS="$rounds" UNIONMOUNT_CRASH_SEED="$seed" UNIONMOUNT_CRASH_MIB="$mib" \
    exec cargo test --release --test crash -- --nocapture --exact crash_rounds
