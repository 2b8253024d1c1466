#!/usr/bin/env bash
# Runs pjdfstest (the Rust port, `cargo install pjdfstest`) on unionmount, twice:
#   1. on a fresh mount with an empty lower layer;
#   2. inside a directory that already exists in a lower layer, so that everything pjdfstest
#      does happens in a merged directory.
# Prints each run's summary and exits non-zero if any test failed.
#
# Each run is two pjdfstest processes on the same mount: every test but the remounting ones,
# then the 13 EROFS tests, which remount the filesystem read-only. They need a process of
# their own because pjdfstest 0.2.2 leaks descriptors of deleted files from earlier tests,
# and no filesystem can go read-only while a deleted file is open.
#
# Needs root (pjdfstest switches to the dummy users nobody/nogroup and daemon/daemon).
# Each run happens in a private mount namespace in which /usr/local/sbin holds a link to
# unionmount: mount(8) runs the mount helper with a fixed PATH, and the EROFS tests remount
# the filesystem read-only with `mount -o remount,ro`, which goes through that helper.
#
# With ROOTLESS=1 it runs instead as the root of a rootless container's user namespace: the
# test user (TEST_USER, default umtest, created with subordinate ids if missing) maps itself
# to root and its subordinate ids to 1-65535, as podman does; the daemon mounts in that
# namespace (the page-cached path: passthrough needs the initial namespace's privileges).
# pjdfstest runs on the two mounts above and, as the oracle, on a plain directory of the same
# filesystem in the same namespace (no EROFS pass: it remounts). A test that fails here and passes there counts as a
# failure, with one exception, reported apart: a char 0/0 node refused with EPERM (kernel
# overlayfs refuses those everywhere, as they are whiteouts; unionmount stores them as a
# stand-in device as root, which a user namespace may not make; see README).
#
# Environment: UNIONMOUNT (binary, default: a release build of this checkout), PJDFSTEST
# (default: pjdfstest from PATH or ~/.cargo/bin), NAPTIME (seconds, default 0.05),
# VERBOSE=1 to show every test, UNIONMOUNT_ARGS for more daemon options (e.g.
# "--passthrough off" for the page-cached path), ROOTLESS=1, TEST_USER.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
if [[ $(id -u) -ne 0 ]]; then
    echo "pjdfstest.sh: needs root (pjdfstest switches users)" >&2
    exit 2
fi
pjd=${PJDFSTEST:-$(command -v pjdfstest || echo "$HOME/.cargo/bin/pjdfstest")}
if [[ ! -x $pjd ]]; then
    echo "pjdfstest.sh: pjdfstest not found; install it with: cargo install pjdfstest" >&2
    exit 2
fi
if [[ -z ${UNIONMOUNT:-} ]]; then
    (cd "$here" && cargo build --release --quiet)
    UNIONMOUNT=$here/target/release/unionmount
fi
UNIONMOUNT=$(realpath "$UNIONMOUNT")
naptime=${NAPTIME:-0.05}
for u in nobody daemon; do
    getent passwd "$u" >/dev/null || { echo "pjdfstest.sh: user $u is missing" >&2; exit 2; }
done
getent group nogroup >/dev/null || { echo "pjdfstest.sh: group nogroup is missing" >&2; exit 2; }

work=$(mktemp -d /tmp/um-pjdfstest.XXXXXX)
chmod 755 "$work"   # the dummy users must reach the test directories
cleanup() { rm -rf "$work"; }
trap cleanup EXIT

cat >"$work/pjdfstest.in" <<EOF
# Every opt-in feature Linux has; the FreeBSD-only ones (chflags, nfsv4_acls,
# stat_st_birthtime) are left out.
[features]
posix_fallocate = {}
utimensat = {}
utime_now = {}
rename_ctime = {}

[settings]
naptime = $naptime
allow_remount = ALLOW_REMOUNT

[dummy_auth]
entries = [["nobody", "nogroup"], ["daemon", "daemon"]]
EOF

sed 's/ALLOW_REMOUNT/false/' "$work/pjdfstest.in" >"$work/main.toml"
sed 's/ALLOW_REMOUNT/true/' "$work/pjdfstest.in" >"$work/erofs.toml"

# pjdfstest 0.2.2 panics building a PATH_MAX-long path when the length left after its
# two temporary directories (22 characters) is a multiple of 127; choose a test directory
# whose length avoids that.
pad_dir() {
    local base=$1 pad=""
    while (( (4095 - ${#base} - ${#pad} - 22) % 127 == 0 )); do pad+="x"; done
    echo "$base$pad"
}

# One run, in a private mount namespace. $1: name, $2: "empty" or "merged".
run_one() {
    local name=$1 kind=$2
    local d=$work/$name
    mkdir -p "$d/lower1" "$d/lower2" "$d/upper" "$d/sbin" "$d/secondary"
    local mnt
    mnt=$(pad_dir "$d/m")
    mkdir -p "$mnt"
    local target=$mnt
    if [[ $kind == merged ]]; then
        # A directory present in both lower layers, with content, so the tests run in a
        # merged directory.
        target=$(pad_dir "$mnt/tests")
        local sub=${target#"$mnt"/}
        mkdir -p "$d/lower1/$sub" "$d/lower2/$sub/sub"
        echo lower1 >"$d/lower1/$sub/from-lower1"
        echo lower2 >"$d/lower2/$sub/sub/from-lower2"
    fi
    ln -s "$UNIONMOUNT" "$d/sbin/unionmount"
    local verbose=()
    if [[ ${VERBOSE:-0} == 1 ]]; then verbose=(-v); fi
    unshare --mount --propagation private bash -euo pipefail -c '
        d=$1; mnt=$2; target=$3; bin=$4; pjd=$5; work=$6; args=$7; shift 7
        mount --bind "$d/sbin" /usr/local/sbin
        "$bin" $args --lower "$d/lower1:$d/lower2" --upper "$d/upper" "$mnt"
        trap "cd /; fusermount3 -u \"$mnt\" 2>/dev/null || umount -l \"$mnt\"" EXIT
        cd "$target"
        "$pjd" -c "$work/main.toml" -p "$target" -s "$d/secondary" "$@" >"$d/main.out" 2>&1 || true
        "$pjd" -c "$work/erofs.toml" -p "$target" -s "$d/secondary" "$@" erofs >"$d/erofs.out" 2>&1 || true
    ' run "$d" "$mnt" "$target" "$UNIONMOUNT" "$pjd" "$work" "${UNIONMOUNT_ARGS:-}" "${verbose[@]}"
    local ok=0 part summary
    for part in main erofs; do
        summary=$(grep -E '^Summary:' "$d/$part.out" || echo "Summary: pjdfstest did not finish")
        if [[ ${VERBOSE:-0} == 1 ]]; then
            cat "$d/$part.out"
        else
            grep -E 'FAILED$' -A3 "$d/$part.out" | grep -v '^ *[0-9]*: ' || true
            grep -E 'skipped$' -A1 "$d/$part.out" | grep -E '^\s' | sort | uniq -c | sed 's/^/  skipped: /' || true
        fi
        echo "$name ($part): $summary"
        [[ $summary == "Summary: 0 failed,"* ]] || ok=1
    done
    return $ok
}

# The rootless run (ROOTLESS=1, see the top).
run_rootless() {
    local user=${TEST_USER:-umtest} d=$work verbose=()
    if [[ ${VERBOSE:-0} == 1 ]]; then verbose=(-v); fi
    id "$user" >/dev/null 2>&1 || useradd -M -s /usr/sbin/nologin "$user"
    grep -q "^$user:" /etc/subuid || usermod --add-subuids 300000-365535 "$user"
    grep -q "^$user:" /etc/subgid || usermod --add-subgids 300000-365535 "$user"
    # Two mounts, as for root: empty lower layers, and a directory merged from both.
    mkdir -p "$d"/{out,secondary,plain}
    local name mnt targets=()
    for name in empty-lower merged-dir; do
        mkdir -p "$d/$name"/{lower1,lower2,upper,work}
        mnt=$(pad_dir "$d/$name/m")
        mkdir -p "$mnt"
        if [[ $name == merged-dir ]]; then
            local target sub
            target=$(pad_dir "$mnt/tests")
            sub=${target#"$mnt"/}
            mkdir -p "$d/$name/lower1/$sub" "$d/$name/lower2/$sub/sub"
            echo lower1 >"$d/$name/lower1/$sub/from-lower1"
            echo lower2 >"$d/$name/lower2/$sub/sub/from-lower2"
            targets+=("$mnt" "$target")
        else
            targets+=("$mnt" "$mnt")
        fi
    done
    chown -R "$user:" "$d"
    cp "$UNIONMOUNT" "$d/unionmount"   # reachable by the user wherever the build is
    cp "$pjd" "$d/pjdfstest"
    chmod 755 "$d/unionmount" "$d/pjdfstest"
    setpriv --reuid="$user" --regid="$user" --clear-groups -- \
        unshare --user --map-root-user --map-auto --mount --propagation private -- bash -euc '
            d=$1; args=$2; shift 2
            declare -A mnt=([empty-lower]=$1 [merged-dir]=$3) target=([empty-lower]=$2 [merged-dir]=$4)
            shift 4
            pjd() { "$d/pjdfstest" -c "$d/main.toml" -p "$1" -s "$d/secondary" "${@:3}" >"$d/out/$2.out" 2>&1 || true; }
            # Whatever fails, no mount (and so no daemon) outlives the namespace.
            unmount() { umount "$1" 2>/dev/null || umount -l "$1" 2>/dev/null || true; }
            trap "cd /; unmount \"\${mnt[empty-lower]}\"; unmount \"\${mnt[merged-dir]}\"" EXIT
            for name in empty-lower merged-dir; do
                "$d/unionmount" $args --lower "$d/$name/lower1:$d/$name/lower2" \
                    --upper "$d/$name/upper" --work "$d/$name/work" "${mnt[$name]}"
                (cd "${target[$name]}" && pjd "${target[$name]}" "$name" "$@")
                umount "${mnt[$name]}"
            done
            cd "$d/plain" && pjd "$d/plain" ext4 "$@"
        ' run "$d" "${UNIONMOUNT_ARGS:-}" "${targets[@]}" "${verbose[@]}"
    local part summary ok=0
    for part in empty-lower merged-dir ext4; do
        summary=$(grep -E '^Summary:' "$d/out/$part.out" || echo "Summary: pjdfstest did not finish")
        [[ ${VERBOSE:-0} == 1 ]] && cat "$d/out/$part.out"
        echo "rootless $part: $summary"
        [[ $summary == "Summary: pjdfstest did not finish" ]] && ok=1
        grep -E 'FAILED$' "$d/out/$part.out" | awk '{print $1}' | sort >"$d/out/$part.failed" || true
    done
    # Each test that fails on a mount and passes on the plain directory, with its failure.
    local t why char0 worse
    for part in empty-lower merged-dir; do
        char0=() worse=()
        while read -r t; do
            why=$(grep -E "^$t +FAILED$" -A1 "$d/out/$part.out" | tail -n1)
            if [[ $t == *::char && $why == *"Err\` value: EPERM"* ]]; then
                char0+=("$t")
            else
                worse+=("$t: $why")
            fi
        done < <(comm -23 "$d/out/$part.failed" "$d/out/ext4.failed")
        echo "rootless $part: ${#char0[@]} failed on char 0/0 nodes (EPERM, as kernel overlayfs answers)"
        for t in "${char0[@]}"; do echo "  char 0/0: $t"; done
        echo "rootless $part: ${#worse[@]} other tests failed here and passed on the plain directory"
        for t in "${worse[@]}"; do echo "  FAILED: $t"; done
        [[ ${#worse[@]} -eq 0 ]] || ok=1
    done
    return $ok
}

status=0
if [[ ${ROOTLESS:-0} == 1 ]]; then
    sed 's/ALLOW_REMOUNT/false/' "$work/pjdfstest.in" >"$work/main.toml"
    run_rootless || status=1
    exit $status
fi
run_one empty-lower empty || status=1
run_one merged-dir merged || status=1
exit $status
