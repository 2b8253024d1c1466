#!/usr/bin/env bash
# Compares unionmount with kernel overlayfs, fuse-overlayfs 2.x and 1.x and the plain
# underlying filesystem on one fixed data set, and prints one table of medians with ratios to
# kernel overlayfs; writes the raw samples and the medians as CSV and the ratios as an SVG
# bar chart.
#
# Run as root from anywhere in the repository:   scripts/bench.sh
# Quick check with small sizes:   BENCH_FILES=2000 BENCH_MB=64 REPEAT=1 scripts/bench.sh
#
# Sizes and settings (environment):
#   REPEAT=3              runs of every workload on every peer (the table shows medians)
#   BENCH_FILES=50000     files in the tree walked cold (lstat walk, find)
#   BENCH_MB=512          size of the file read by fio and by the shared-mount test
#   BENCH_WRITE_MB=256    size written by the fio sequential write, then rewritten at random
#   BENCH_COPYUP_MB=256   size of the file copied up by a 1-byte append (and of the sparse one)
#   BENCH_ENTRIES=10000   entries of the merged directory listed with `ls -l`
#   BENCH_CREATE=5000     files created, then unlinked
#   BENCH_TAR_FILES=3000  small files (1-4 KiB) in the tarball unpacked on the mount
#   BENCH_GIT_FILES=3000  files in the git repository checked into the lower layer
#   BENCH_RUNTIME=3       seconds of each fio run from the page cache (random reads and
#                         writes, warm sequential read)
#   BENCH_MOUNTS=8        read-only mounts of one image for the page-cache sharing test
#   BENCH_PEERS="kernel um-root um-rootless fo2 fo1 plain"   which peers, in this order
#   BENCH_USER=umtest     unprivileged user for the rootless peer (needs /dev/fuse mode 0666)
#   BENCH_OUT=bench-results   directory for results.csv, samples.csv, ratios.svg, table.txt
#   BENCH_KEEP=0          1 keeps the scratch directory (under ${TMPDIR:-/tmp})
#   BENCH_FRESH_FS=1      1: every peer run writes to a new ext4 filesystem (a loop device with
#                         direct I/O); 0: to a directory of the filesystem holding the layers
#   BENCH_TRACE=          non-empty: trace the workload runners (bash -x with timestamps)
# Programs:
#   UNIONMOUNT        unionmount binary (default: `cargo build --release`, then target/release)
#   FUSE_OVERLAYFS2   fuse-overlayfs 2.x (default: a `fuse-overlayfs` reporting 2.x on PATH,
#                     in ${CARGO_HOME:-~/.cargo}/bin)
#   FUSE_OVERLAYFS1   fuse-overlayfs 1.x (default: a `fuse-overlayfs` reporting 1.x on PATH,
#                     /usr/bin/fuse-overlayfs)
# A peer that is not installed is shown as n/a.
#
# Peers: kernel (overlayfs), um-root (unionmount as root, --passthrough on), um-rdplus (the
# same with -o readdirplus=on, optional), um-rootless
# (unionmount as BENCH_USER inside `unshare -Urm`, page-cached path), fo2 / fo1 (fuse-overlayfs
# as root), plain (the underlying filesystem, no union: the lower layer read directly, writes
# to a scratch directory).
#
# The last row is the share of the CPUs' time the hypervisor took while each peer's workloads
# ran (0 on bare metal): samples taken under a high share are slowed by the host, not by the
# peer.
#
# Every repeat mounts each peer afresh on an empty upper layer, on a newly made ext4 filesystem
# (BENCH_FRESH_FS): ext4 slows inode allocation right after many deletions (it scans the
# inode table for recently freed inodes), so on a shared filesystem each run's create, untar
# and copy-up times would depend on what the runs before it deleted. The layers stay on the
# filesystem holding the scratch directory. Cold runs drop the page cache
# first (`echo 3 > /proc/sys/vm/drop_caches`; the rootless peer asks the root side to do it
# through a FIFO). `git status` runs with --no-optional-locks, so it never rewrites the index.

set -euo pipefail
export LC_ALL=C

# ---------------------------------------------------------------------------------------------
# Workloads: run by `bench.sh __run PEER` with the environment set up by the main part, as
# root or as BENCH_USER in a user namespace. Results go to $RUN_OUT as "metric value" lines.

now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v s="$1" -v e="$(now)" 'BEGIN { printf "%.4f", e - s }'; }

record() { echo "$1 $2" >>"$RUN_OUT"; }

drop_caches() {
    sync
    if [ -n "${BENCH_CTL:-}" ]; then
        echo drop >"$BENCH_CTL/req"
        read -r _ <"$BENCH_CTL/ack"
    else
        echo 3 >/proc/sys/vm/drop_caches
    fi
}

# fio_metric FIELD ARGS...: one field of fio's terse output (7 read KiB/s, 8 read IOPS,
# 48 write KiB/s, 49 write IOPS).
fio_metric() {
    local field=$1
    shift
    local out
    out=$(fio --minimal --ioengine=psync "$@" 2>/dev/null) || return 1
    awk -F';' -v f="$field" 'NR == 1 { v = $f; if (f == 7 || f == 48) v = v / 1024; printf "%.1f", v }' <<<"$out"
}

# failed METRIC: records NA and shows why on stderr.
failed() {
    record "$1" NA
    echo "$RUN_PEER: $1 failed: $(tail -n 3 "$RUN_ERR" | tr '\n' ' ')" >&2
}

# measure METRIC COMMAND...: records the command's wall time in seconds, or NA.
measure() {
    local metric=$1 t
    shift
    t=$(now)
    if "$@" >/dev/null 2>"$RUN_ERR"; then
        record "$metric" "$(elapsed "$t")"
    else
        failed "$metric"
    fi
}

# value METRIC COMMAND...: records what the command prints, or NA.
value() {
    local metric=$1 v
    shift
    if v=$("$@" 2>"$RUN_ERR") && [ -n "$v" ]; then
        record "$metric" "$v"
    else
        failed "$metric"
    fi
}

daemon_pid() {
    local m=$1 p a
    for p in /proc/[0-9]*; do
        case $(readlink "$p/exe" 2>/dev/null) in
        *unionmount* | *fuse-overlayfs*) ;;
        *) continue ;;
        esac
        while IFS= read -r -d '' a; do
            if [ "$a" = "$m" ]; then
                echo "${p#/proc/}"
                return 0
            fi
        done <"$p/cmdline" 2>/dev/null || true
    done
    return 1
}

rss_kib() {
    local pid
    pid=$(daemon_pid "$1") || return 1
    awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status"
}

cached_kib() { awk '/^Cached:/ { print $2 }' /proc/meminfo; }

# Clock ticks the hypervisor took from this machine's CPUs (all CPUs together).
steal_ticks() { awk '/^cpu / { print $9 }' /proc/stat; }

# steal_pct TICKS0 START: share of the CPUs' time stolen since then, in percent.
steal_pct() {
    awk -v t0="$1" -v s="$2" -v t1="$(steal_ticks)" -v e="$(now)" -v hz="$(getconf CLK_TCK)" \
        -v n="$(nproc)" 'BEGIN { printf "%.1f", 100 * (t1 - t0) / hz / ((e - s) * n) }'
}

# do_mount PEER MNT UPPER WORK: UPPER empty for a read-only mount.
do_mount() {
    local peer=$1 m=$2 u=$3 w=$4
    mkdir -p "$m"
    case $peer in
    kernel)
        if [ -n "$u" ]; then
            mount -t overlay overlay -o "lowerdir=$LOWERS,upperdir=$u,workdir=$w" "$m"
        else
            mount -t overlay overlay -o "lowerdir=$LOWERS" -r "$m"
        fi
        ;;
    um-root | um-rootless | um-rdplus)
        local pt=on extra=()
        [ "$peer" = um-rootless ] && pt=off
        [ "$peer" = um-rdplus ] && extra=(-o readdirplus=on)
        if [ -n "$u" ]; then
            "$UM_BIN" --lower "$LOWERS" --upper "$u" --work "$w" "$m" --passthrough "$pt" "${extra[@]}"
        else
            "$UM_BIN" --lower "$LOWERS" "$m" --passthrough "$pt" "${extra[@]}"
        fi
        ;;
    fo2 | fo1)
        local bin=$FO2_BIN
        [ "$peer" = fo1 ] && bin=$FO1_BIN
        if [ -n "$u" ]; then
            "$bin" -o "lowerdir=$LOWERS,upperdir=$u,workdir=$w" "$m"
        else
            "$bin" -o "lowerdir=$LOWERS" "$m"
        fi
        ;;
    esac
    # Wait until the mount is live (fuse-overlayfs returns as soon as it forks).
    local i
    for i in $(seq 100); do
        mountpoint -q "$m" && return 0
        sleep 0.05
    done
    return 1
}

do_umount() {
    local m=$1 i
    mountpoint -q "$m" || return 0
    for i in 1 2 3 4 5; do
        umount "$m" 2>/dev/null || fusermount3 -u "$m" 2>/dev/null || true
        mountpoint -q "$m" || return 0
        sleep 0.2
    done
    umount -l "$m" 2>/dev/null || fusermount3 -uz "$m" 2>/dev/null || true
}

RUN_MOUNTS=()
run_cleanup() {
    local m
    for m in "${RUN_MOUNTS[@]}"; do
        do_umount "$m"
    done
}

create_files() {
    local d=$1 i
    mkdir -p "$d"
    for ((i = 0; i < BENCH_CREATE; i++)); do
        : >"$d/f$i"
    done
}

append_byte() { printf x >>"$1"; }

du_kib() { du -k "$1" | cut -f1; }

read_through_mounts() {
    local m
    for m in "$@"; do
        cat "$m/data/big.bin" >/dev/null || return 1
    done
}

# shared_cache_mib VIEW...: page cache used by reading one file through every view: the
# pages of the lower file plus those of each view's own inode (cachestat), or else the growth
# of Cached in /proc/meminfo (noisy on a busy machine).
shared_cache_mib() {
    local before after m files=("$BIG_LOWER")
    drop_caches
    before=$(cached_kib)
    read_through_mounts "$@" || return 1
    after=$(cached_kib)
    if [ "$RUN_PEER" != plain ]; then
        for m in "$@"; do files+=("$m/data/big.bin"); done
    fi
    python3 "$BENCH_BIN/bench_cachestat.py" "${files[@]}" ||
        echo $(((after - before) / 1024))
}

run_workloads() {
    local peer=$1 base=$RUN_BASE view scratch upper=""
    RUN_PEER=$peer
    RUN_ERR=$base/stderr
    : >"$RUN_OUT"
    # Time the hypervisor takes from this machine slows whatever runs meanwhile; the run's
    # share is recorded so that a slow sample can be told from a slow peer.
    local steal0 start0
    steal0=$(steal_ticks)
    start0=$(now)
    if [ -n "${BENCH_TRACE:-}" ]; then
        PS4='+ $EPOCHREALTIME '
        set -x
    fi
    trap run_cleanup EXIT
    trap 'exit 143' INT TERM
    if [ "$peer" = plain ]; then
        view=$PLAIN_VIEW
        scratch=$base/scratch
    else
        view=$base/mnt
        upper=$base/upper
        mkdir -p "$upper" "$base/work"
        RUN_MOUNTS+=("$view")
        do_mount "$peer" "$view" "$upper" "$base/work" 2>"$RUN_ERR" || {
            echo "mount of $peer failed: $(tail -n 3 "$RUN_ERR")" >&2
            return 1
        }
        scratch=$view/scratch
        case $peer in
        kernel) ;;
        *) value rss_idle_kib rss_kib "$view" ;;
        esac
    fi
    mkdir -p "$scratch"
    local big=$view/data/big.bin

    drop_caches
    value seqread_cold_mibs fio_metric 7 --name=seq --filename="$big" --rw=read --bs=1M \
        --size="${BENCH_MB}M" --readonly --invalidate=0
    cat "$big" >/dev/null || true
    # A single pass from the page cache takes a tenth of a second, and single passes varied
    # from 3.8 to 8 GB/s: passes are repeated for BENCH_RUNTIME seconds.
    value seqread_warm_mibs fio_metric 7 --name=seq --filename="$big" --rw=read --bs=1M \
        --size="${BENCH_MB}M" --readonly --invalidate=0 --time_based --runtime="$BENCH_RUNTIME"
    value randread_1j_iops fio_metric 8 --name=rr --filename="$big" --rw=randread --bs=4k \
        --size="${BENCH_MB}M" --readonly --invalidate=0 --time_based --runtime="$BENCH_RUNTIME"
    value randread_4j_iops fio_metric 8 --name=rr --filename="$big" --rw=randread --bs=4k \
        --size="${BENCH_MB}M" --readonly --invalidate=0 --time_based --runtime="$BENCH_RUNTIME" \
        --numjobs=4 --group_reporting
    value seqwrite_mibs fio_metric 48 --name=sw --filename="$scratch/w.bin" --rw=write --bs=1M \
        --size="${BENCH_WRITE_MB}M" --end_fsync=1
    # Rewrites of an existing file, 4 KiB at a time (a database's pattern).
    value randwrite_iops fio_metric 49 --name=rw --filename="$scratch/w.bin" --rw=randwrite \
        --bs=4k --size="${BENCH_WRITE_MB}M" --time_based --runtime="$BENCH_RUNTIME"
    rm -f "$scratch/w.bin"

    drop_caches
    measure walk_lstat_cold_s find "$view/tree" -printf '%s %i\n'
    case $peer in
    kernel | plain) ;;
    *) value rss_walk_kib rss_kib "$view" ;;
    esac
    drop_caches
    measure find_cold_s find "$view/tree"

    measure create_s create_files "$scratch/c"
    measure unlink_s rm -rf "$scratch/c"
    mkdir -p "$scratch/t"
    measure untar_s tar -xf "$BENCH_TARBALL" -C "$scratch/t"

    drop_caches
    measure git_status_cold_s git -c safe.directory='*' --no-optional-locks -C "$view/repo" \
        status --porcelain
    drop_caches
    measure ls_l_cold_s ls -l "$view/dir"

    if [ "$peer" != plain ]; then
        drop_caches
        measure copyup_s append_byte "$view/data/cow.bin"
        append_byte "$view/data/sparse.bin" || true
        value sparse_copy_kib du_kib "$upper/data/sparse.bin"
    fi
    rm -rf "$scratch"

    # One image, several read-only mounts, one file read through each: page cache used.
    if [ "$peer" = plain ]; then
        local views=()
        for ((i = 0; i < BENCH_MOUNTS; i++)); do views+=("$view"); done
        value shared_cached_mib shared_cache_mib "${views[@]}"
    else
        do_umount "$view"
        local views=() i m
        for ((i = 0; i < BENCH_MOUNTS; i++)); do
            m=$base/ro$i
            RUN_MOUNTS+=("$m")
            do_mount "$peer" "$m" "" "" 2>"$RUN_ERR" || {
                failed shared_cached_mib
                views=()
                break
            }
            views+=("$m")
        done
        if [ ${#views[@]} -gt 0 ]; then
            value shared_cached_mib shared_cache_mib "${views[@]}"
        fi
    fi
    value host_steal_pct steal_pct "$steal0" "$start0"
    run_cleanup
    trap - EXIT INT TERM
}

if [ "${1:-}" = __run ]; then
    run_workloads "$2"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# Main part: as root.

if [ "$(id -u)" != 0 ]; then
    echo "bench.sh: run as root (kernel overlayfs and dropping caches need it)" >&2
    exit 1
fi

REPEAT=${REPEAT:-3}
export BENCH_FILES=${BENCH_FILES:-50000}
export BENCH_MB=${BENCH_MB:-512}
export BENCH_WRITE_MB=${BENCH_WRITE_MB:-256}
export BENCH_COPYUP_MB=${BENCH_COPYUP_MB:-256}
export BENCH_ENTRIES=${BENCH_ENTRIES:-10000}
export BENCH_CREATE=${BENCH_CREATE:-5000}
export BENCH_TAR_FILES=${BENCH_TAR_FILES:-3000}
export BENCH_GIT_FILES=${BENCH_GIT_FILES:-3000}
export BENCH_RUNTIME=${BENCH_RUNTIME:-3}
export BENCH_MOUNTS=${BENCH_MOUNTS:-8}
BENCH_PEERS=${BENCH_PEERS:-kernel um-root um-rootless fo2 fo1 plain}
BENCH_USER=${BENCH_USER:-umtest}
BENCH_OUT=${BENCH_OUT:-bench-results}
BENCH_FRESH_FS=${BENCH_FRESH_FS:-1}

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$script_dir/.." && pwd)
start=$(now)

tools="fio git tar python3 mountpoint"
[ "$BENCH_FRESH_FS" = 1 ] && tools+=" mkfs.ext4 losetup findmnt"
for tool in $tools; do
    command -v "$tool" >/dev/null || {
        echo "bench.sh: $tool is needed (mkfs.ext4, losetup and findmnt only with BENCH_FRESH_FS=1)" >&2
        exit 1
    }
done

W=$(mktemp -d "${TMPDIR:-/tmp}/unionmount-bench.XXXXXX")
chmod 755 "$W"
HELPER_PID=""
CHILD_PID=""

# Loop devices backed by images under $W.
detach_loops() {
    local dev
    for dev in $(losetup --list --noheadings --output NAME,BACK-FILE 2>/dev/null |
        awk -v w="$W/" 'index($2, w) == 1 { print $1 }'); do
        losetup --detach "$dev"
    done
}

cleanup() {
    set +e
    [ -n "$CHILD_PID" ] && kill "$CHILD_PID" 2>/dev/null && wait "$CHILD_PID" 2>/dev/null
    [ -n "$HELPER_PID" ] && kill "$HELPER_PID" 2>/dev/null && wait "$HELPER_PID" 2>/dev/null
    local m left=0
    for m in $(awk -v w="$W/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r); do
        do_umount "$m"
    done
    detach_loops
    if awk -v w="$W/" 'index($2, w) == 1 { found = 1 } END { exit !found }' /proc/mounts; then
        echo "bench.sh: mounts left under $W" >&2
        left=1
    fi
    if [ "${BENCH_KEEP:-0}" = 1 ] || [ $left = 1 ]; then
        echo "bench.sh: scratch kept in $W" >&2
    else
        rm -rf --one-file-system "$W"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- programs ---------------------------------------------------------------------------------

fo_major() { "$1" --version 2>&1 | sed -n 's/.*version \([0-9][0-9]*\)\..*/\1/p' | head -1; }

find_fo() {
    local want=$1 c
    shift
    for c in "$@"; do
        [ -n "$c" ] && [ -x "$c" ] || continue
        if [ "$(fo_major "$c")" = "$want" ]; then
            echo "$c"
            return 0
        fi
    done
    return 1
}

mkdir -p "$W/bin"
if [ -n "${UNIONMOUNT:-}" ]; then
    um_src=$UNIONMOUNT
else
    echo "building unionmount (release)..." >&2
    (cd "$repo" && cargo build --release --quiet --bin unionmount)
    target=$(cd "$repo" && cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
    um_src=$target/release/unionmount
fi
# A private copy: readable by the rootless user, and unaffected by rebuilds during the run.
cp "$um_src" "$W/bin/unionmount"
chmod 755 "$W/bin/unionmount"
export UM_BIN=$W/bin/unionmount

path_fo=$(command -v fuse-overlayfs || true)
FO2_BIN=$(find_fo 2 "${FUSE_OVERLAYFS2:-}" "$path_fo" "${CARGO_HOME:-$HOME/.cargo}/bin/fuse-overlayfs") || FO2_BIN=""
FO1_BIN=$(find_fo 1 "${FUSE_OVERLAYFS1:-}" "$path_fo" /usr/bin/fuse-overlayfs) || FO1_BIN=""
export FO2_BIN FO1_BIN

available() {
    case $1 in
    kernel) grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null ;;
    um-root | um-rdplus | plain) true ;;
    um-rootless)
        id -u "$BENCH_USER" >/dev/null 2>&1 && [ -c /dev/fuse ] &&
            [ "$(stat -c %a /dev/fuse)" = 666 ] && command -v setpriv >/dev/null &&
            command -v unshare >/dev/null
        ;;
    fo2) [ -n "$FO2_BIN" ] ;;
    fo1) [ -n "$FO1_BIN" ] ;;
    *) false ;;
    esac
}

peers=()
for p in $BENCH_PEERS; do
    if available "$p"; then
        peers+=("$p")
    else
        echo "peer $p: not available, shown as n/a" >&2
    fi
done

# --- data ---------------------------------------------------------------------------------------

echo "building data in $W ..." >&2
L0=$W/layers/top
L1=$W/layers/bottom
export LOWERS=$L0:$L1
mkdir -p "$L0" "$L1/data" "$L1/tree" "$L1/dir" "$L0/dir"

head -c "$((BENCH_MB * 1024 * 1024))" /dev/urandom >"$L1/data/big.bin"
head -c "$((BENCH_COPYUP_MB * 1024 * 1024))" /dev/urandom >"$L1/data/cow.bin"
# Sparse: 1 MiB of data at the start and in the middle, holes elsewhere.
truncate -s "${BENCH_COPYUP_MB}M" "$L1/data/sparse.bin"
head -c 1048576 /dev/urandom | dd of="$L1/data/sparse.bin" conv=notrunc status=none
head -c 1048576 /dev/urandom | dd of="$L1/data/sparse.bin" bs=1M seek=$((BENCH_COPYUP_MB / 2)) \
    conv=notrunc status=none

# Tree: 100 files per directory, 100 directories per level.
for ((i = 0; i < BENCH_FILES; i++)); do
    if ((i % 100 == 0)); then
        d=$L1/tree/d$((i / 10000))/e$(((i / 100) % 100))
        mkdir -p "$d"
    fi
    echo "$i" >"$d/f$i"
done

# Merged directory: every name in the bottom layer; the top layer shadows a fifth of them,
# whites out 1% and adds as many new names, so the merged view has BENCH_ENTRIES names.
wh=$((BENCH_ENTRIES / 100))
((wh > 0)) || wh=1
for ((i = 0; i < BENCH_ENTRIES; i++)); do
    echo "$i" >"$L1/dir/n$i"
    if ((i % 5 == 0)); then echo "top $i" >"$L0/dir/n$i"; fi
done
for ((i = 1; i < BENCH_ENTRIES; i += BENCH_ENTRIES / wh)); do
    if ((i % 5 != 0)); then
        mknod "$L0/dir/n$i" c 0 0
        echo "new $i" >"$L0/dir/x$i"
    fi
done

# Git repository, committed in the lower layer.
mkdir -p "$L1/repo"
for ((i = 0; i < BENCH_GIT_FILES; i++)); do
    if ((i % 100 == 0)); then mkdir -p "$L1/repo/s$((i / 100))"; fi
    echo "line $i" >"$L1/repo/s$((i / 100))/f$i.txt"
done
git -C "$L1/repo" init -q
git -C "$L1/repo" add -A
git -C "$L1/repo" -c user.name=bench -c user.email=bench@localhost commit -qm data

# Tarball of small files under one top directory (kept outside the layers).
mkdir -p "$W/tarsrc/pkg"
for ((i = 0; i < BENCH_TAR_FILES; i++)); do
    if ((i % 100 == 0)); then mkdir -p "$W/tarsrc/pkg/t$((i / 100))"; fi
    printf -v content '%*s' $((1023 + (i % 4) * 1024)) "$i"
    echo "$content" >"$W/tarsrc/pkg/t$((i / 100))/f$i"
done
export BENCH_TARBALL=$W/small.tar
tar -cf "$BENCH_TARBALL" -C "$W/tarsrc" pkg
rm -rf "$W/tarsrc"
chmod -R a+rX "$W/layers" "$BENCH_TARBALL"
# The image belongs to the rootless user (its root inside the namespace), as a rootless
# container's layers do; root peers are not affected.
if [[ " ${peers[*]} " == *" um-rootless "* ]]; then
    chown -R "$BENCH_USER:" "$W/layers"
fi
export PLAIN_VIEW=$L1 BIG_LOWER=$L1/data/big.bin
sync
echo "data ready in $(elapsed "$start") s" >&2

# --- runs ---------------------------------------------------------------------------------------

cp "${BASH_SOURCE[0]}" "$W/bin/bench.sh"
cp "$script_dir/bench_cachestat.py" "$W/bin/"
chmod 755 "$W/bin/bench.sh" "$W/bin/bench_cachestat.py"
export BENCH_BIN=$W/bin
SAMPLES=$W/samples.csv
echo "peer,repeat,metric,value" >"$SAMPLES"

start_helper() {
    local ctl=$1
    mkdir -p "$ctl"
    mkfifo "$ctl/req" "$ctl/ack"
    chmod 755 "$ctl"
    chmod 666 "$ctl/req" "$ctl/ack"
    (
        while read -r line <"$ctl/req"; do
            [ "$line" = quit ] && break
            sync
            echo 3 >/proc/sys/vm/drop_caches
            echo ok >"$ctl/ack"
        done
    ) &
    HELPER_PID=$!
}

# fresh_fs DIR: mounts a new ext4 filesystem on DIR, big enough for the writes of one run.
fresh_fs() {
    local dir=$1 img=$1.img dev mib
    mib=$((2 * BENCH_WRITE_MB + 3 * BENCH_COPYUP_MB + 1024))
    truncate -s "${mib}M" "$img"
    # Inode tables and journal written now, so no background initialisation runs meanwhile.
    mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$img"
    dev=$(losetup --find --show --direct-io=on "$img")
    mount "$dev" "$dir"
}

release_fs() {
    local dir=$1 dev
    dev=$(findmnt -n -o SOURCE --mountpoint "$dir") || return 0
    umount "$dir" && losetup --detach "$dev"
    rm -f "$dir.img"
}

# machine_line: the kernel, the CPUs and what an idle CPU does. A FUSE round trip wakes the
# daemon and then the caller; when the woken side's CPU sleeps in a halt (a virtual machine
# whose guest halt polling is off), each wake costs tens of microseconds, so the metadata rows
# of the FUSE peers depend on these settings, where the kernel's rows do not.
machine_line() {
    local idle=/sys/devices/system/cpu/cpuidle line model qos
    model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
    line="Linux $(uname -r), $(nproc) CPUs${model:+ ($model)}"
    if [ -r "$idle/current_driver" ]; then
        line+=", cpuidle $(cat "$idle/current_driver")/$(cat "$idle/current_governor_ro")"
    fi
    if [ -r /sys/module/haltpoll/parameters/guest_halt_poll_ns ]; then
        line+=", guest_halt_poll_ns=$(cat /sys/module/haltpoll/parameters/guest_halt_poll_ns)"
        # A setting of the haltpoll governor, which no CPU uses without a cpuidle driver.
        if [ "$(cat "$idle/current_driver" 2>/dev/null)" = none ]; then
            line+=" (not applied: no cpuidle driver)"
        fi
    fi
    # The system-wide CPU latency limit (2000000000 when nobody asks for one).
    qos=$(od -An -t d4 -N4 /dev/cpu_dma_latency 2>/dev/null | tr -d ' ') || true
    line+="${qos:+, cpu_dma_latency=$qos us}"
    echo "$line"
}

run_peer() {
    local peer=$1 rep=$2 base=$W/run/$1.$2
    mkdir -p "$base"
    if [ "$BENCH_FRESH_FS" = 1 ]; then
        fresh_fs "$base"
    fi
    local out=$base/result
    if [ "$peer" = um-rootless ]; then
        chown "$BENCH_USER:" "$base"
        start_helper "$W/ctl.$peer.$rep"
        HOME=$base RUN_BASE=$base RUN_OUT=$out BENCH_CTL=$W/ctl.$peer.$rep \
            setpriv --reuid "$BENCH_USER" --regid "$BENCH_USER" --clear-groups -- \
            unshare -Urm bash "$W/bin/bench.sh" __run "$peer" &
        CHILD_PID=$!
        wait "$CHILD_PID" || echo "peer $peer repeat $rep: runner failed" >&2
        CHILD_PID=""
        echo quit >"$W/ctl.$peer.$rep/req" 2>/dev/null || true
        wait "$HELPER_PID" 2>/dev/null || true
        HELPER_PID=""
    else
        RUN_BASE=$base RUN_OUT=$out bash "$W/bin/bench.sh" __run "$peer" ||
            echo "peer $peer repeat $rep: runner failed" >&2
    fi
    if [ -f "$out" ]; then
        awk -v p="$peer" -v r="$rep" 'NF == 2 { print p "," r "," $1 "," $2 }' "$out" >>"$SAMPLES"
    fi
    if [ "$BENCH_FRESH_FS" = 1 ]; then
        release_fs "$base"
    fi
    rm -rf --one-file-system "$base"
}

for ((rep = 1; rep <= REPEAT; rep++)); do
    for peer in "${peers[@]}"; do
        echo "repeat $rep/$REPEAT: $peer ($(elapsed "$start") s)" >&2
        run_peer "$peer" "$rep"
    done
done

# --- report -------------------------------------------------------------------------------------

mkdir -p "$BENCH_OUT"
cp "$SAMPLES" "$BENCH_OUT/samples.csv"
sizes="files=$BENCH_FILES mb=$BENCH_MB write_mb=$BENCH_WRITE_MB copyup_mb=$BENCH_COPYUP_MB"
sizes+=" entries=$BENCH_ENTRIES create=$BENCH_CREATE tar=$BENCH_TAR_FILES git=$BENCH_GIT_FILES"
sizes+=" runtime=${BENCH_RUNTIME}s mounts=$BENCH_MOUNTS repeat=$REPEAT fresh_fs=$BENCH_FRESH_FS"
python3 "$script_dir/bench_report.py" "$BENCH_OUT/samples.csv" "$BENCH_OUT" \
    --peers "$BENCH_PEERS" --sizes "$sizes" --machine "$(machine_line)" | tee "$BENCH_OUT/table.txt"
echo "total time: $(elapsed "$start") s; results in $BENCH_OUT/" >&2
