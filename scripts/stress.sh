#!/usr/bin/env bash
# Runs stress-ng's filesystem stressors through a unionmount mount, then the same on kernel
# overlayfs over the same lower layer for comparison, and prints both results side by side
# (bogo ops per second, real time).
#
# Both mounts have a lower layer with content (files, directories, symlinks) and an upper;
# the stressors work in a directory that exists in the lower, so every directory they use is
# a merged one. All stressors run at once, INSTANCES processes each, for DURATION seconds.
#
# unionmount passes when stress-ng exits 0 (no stressor failed or verified a wrong result),
# its daemon is still running afterwards, and the mount still answers (listing, write and
# read back, statfs, the lower content intact). The exit status is non-zero otherwise; the
# kernel overlayfs run is for comparison only and does not decide it.
#
# Needs root (mount(8) for overlayfs, /dev/fuse) and stress-ng (apt-get install stress-ng).
#
# Environment:
#   DURATION    seconds per filesystem (default 180)
#   INSTANCES   processes per stressor (default 1)
#   STRESSORS   space-separated stressor names (default: the list below)
#   UNIONMOUNT  the binary (default: a release build of this checkout)
#   UNIONMOUNT_ARGS  more daemon options, e.g. "--passthrough off"
#   KERNEL=0    skip the kernel overlayfs run
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
duration=${DURATION:-180}
instances=${INSTANCES:-1}
# Each of these was tried on unionmount and on kernel overlayfs and runs on both (fiemap is
# left out: FUSE has no FS_IOC_FIEMAP, so stress-ng skips it).
stressors=${STRESSORS:-"dir dirdeep dentry filename rename link symlink mknod chmod chown \
open fstat fcntl access touch utime hdd iomix fallocate fpunch copy-file xattr lockf flock \
locka lockofd mmap msync readahead seek"}

if [[ $(id -u) -ne 0 ]]; then
    echo "stress.sh: needs root (mounts kernel overlayfs, uses /dev/fuse)" >&2
    exit 2
fi
if ! command -v stress-ng >/dev/null; then
    echo "stress.sh: stress-ng not found; install it (Debian/Ubuntu: apt-get install stress-ng)" >&2
    exit 2
fi
if [[ -z ${UNIONMOUNT:-} ]]; then
    (cd "$here" && cargo build --release --quiet)
    UNIONMOUNT=$here/target/release/unionmount
fi
UNIONMOUNT=$(realpath "$UNIONMOUNT")

tmp=$(mktemp -d /tmp/um-stress.XXXXXX)
mounted=()

cleanup() {
    local m
    for m in "${mounted[@]}"; do
        if mountpoint -q "$m"; then
            umount "$m" 2>/dev/null || fusermount3 -u "$m" 2>/dev/null || umount -l "$m" || true
        fi
    done
    for m in "${mounted[@]}"; do
        if mountpoint -q "$m"; then
            echo "stress.sh: $m is still mounted; keeping $tmp" >&2
            return
        fi
    done
    rm -rf "$tmp"
}
trap cleanup EXIT

# The lower layer: a tree with content, and the stressors' directory with some files in it.
lower=$tmp/lower
mkdir -p "$lower/stress"
for d in 1 2 3 4; do
    mkdir -p "$lower/tree/d$d/sub"
    for f in $(seq 1 40); do
        head -c $((f * 997)) /dev/urandom >"$lower/tree/d$d/f$f"
    done
    ln -s "d$d/f1" "$lower/tree/link$d"
done
for f in $(seq 1 50); do
    head -c $((f * 1500)) /dev/urandom >"$lower/stress/seed$f"
done
(cd "$lower" && find . -type f -exec sha256sum {} + | sort -k2) >"$tmp/lower.sums"

# The unionmount daemon serving MERGED, if any.
daemon_pid() {
    local p args exe
    for p in /proc/[0-9]*; do
        args=$( { tr '\0' '\n' <"$p/cmdline"; } 2>/dev/null) || continue
        exe=$(readlink "$p/exe" 2>/dev/null) || continue
        # A rebuilt binary shows as "PATH (deleted)" in a daemon started before.
        if [[ ${exe% (deleted)} == "$UNIONMOUNT" && $(tail -n1 <<<"$args") == "$1" ]]; then
            basename "$p"
            return
        fi
    done
}

# Does the mount at $1 still answer? Prints what failed.
check_alive() {
    local m=$1 ok=0
    mountpoint -q "$m" || { echo "not mounted any more"; return 1; }
    timeout 30 ls "$m/stress" >/dev/null || { echo "listing failed"; ok=1; }
    timeout 30 sh -c "echo still-here >'$m/after-stress' && test \"\$(cat '$m/after-stress')\" = still-here" ||
        { echo "write/read back failed"; ok=1; }
    timeout 30 stat -f "$m" >/dev/null || { echo "statfs failed"; ok=1; }
    (cd "$m" && timeout 60 sha256sum $(awk '{print $2}' "$tmp/lower.sums" | grep -v '^./stress/') |
        sort -k2 | diff -q - <(grep -v ' ./stress/' "$tmp/lower.sums") >/dev/null) ||
        { echo "lower content not intact"; ok=1; }
    return $ok
}

# run NAME: mounts NAME (unionmount|kernel), runs stress-ng in it; sets status_NAME.
run() {
    local name=$1 base=$tmp/$1
    mkdir -p "$base/upper" "$base/work" "$base/merged"
    local m=$base/merged
    mounted+=("$m")
    if [[ $name == unionmount ]]; then
        # shellcheck disable=SC2086
        "$UNIONMOUNT" ${UNIONMOUNT_ARGS:-} --lower "$lower" --upper "$base/upper" \
            --work "$base/work" "$m"
    else
        mount -t overlay overlay \
            -o "lowerdir=$lower,upperdir=$base/upper,workdir=$base/work" "$m"
    fi
    local args=() s
    for s in $stressors; do
        args+=("--$s" "$instances")
    done
    echo "== $name: ${duration}s, $instances instance(s) of: $stressors"
    local rc=0
    # A bound that only a hang reaches: stressors overrun their timeout by a little.
    (cd "$m/stress" && timeout --kill-after=30 $((duration * 3 + 120)) \
        stress-ng "${args[@]}" --timeout "${duration}s" --metrics-brief \
        --temp-path "$m/stress" --yaml "$tmp/$name.yaml") >"$tmp/$name.log" 2>&1 || rc=$?
    grep -E 'fail|error|skipp|not supported|successful run|passed:|untrustworthy' "$tmp/$name.log" |
        sed 's/^stress-ng: //' || true
    local verdict="stress-ng exit $rc"
    [[ $rc -eq 124 || $rc -eq 137 ]] && verdict+=" (did not finish: deadlock?)"
    local dead=""
    if [[ $name == unionmount ]]; then
        if [[ -z $(daemon_pid "$m") ]]; then
            dead="daemon not running"
        fi
    fi
    local why
    if why=$(check_alive "$m"); then
        verdict+=", mount answers"
    else
        verdict+=", mount broken: ${why//$'\n'/; }"
        [[ $rc -eq 0 ]] && rc=1
    fi
    if [[ -n $dead ]]; then
        verdict+=", $dead"
        [[ $rc -eq 0 ]] && rc=1
    fi
    echo "== $name: $verdict"
    eval "status_$name=$rc"
}

# bogo ops/s (real time) per stressor from a stress-ng log.
rates() {
    awk '$2 == "metrc:" && NF == 10 && $5 $6 $7 $8 $9 $10 ~ /^[0-9.]+$/ && !seen[$4]++ {
        print $4, $9
    }' "$1"
}

status_unionmount=0
status_kernel=0
run unionmount
if [[ ${KERNEL:-1} != 0 ]]; then
    run kernel
fi

echo
printf '%-12s %16s %16s %8s\n' stressor "unionmount ops/s" "overlayfs ops/s" ratio
declare -A k=()
if [[ -f $tmp/kernel.log ]]; then
    while read -r s r; do k[$s]=$r; done < <(rates "$tmp/kernel.log")
fi
while read -r s r; do
    kr=${k[$s]:-}
    ratio=""
    if [[ -n $kr ]]; then
        ratio=$(awk -v a="$r" -v b="$kr" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
    fi
    printf '%-12s %16s %16s %8s\n' "$s" "$r" "${kr:--}" "$ratio"
done < <(rates "$tmp/unionmount.log")
echo
echo "unionmount: exit $status_unionmount; kernel overlayfs: exit $status_kernel"
if [[ $status_unionmount -ne 0 ]]; then
    echo "FAIL; the end of the unionmount stress-ng log:" >&2
    tail -n 40 "$tmp/unionmount.log" >&2
    exit 1
fi
echo PASS
