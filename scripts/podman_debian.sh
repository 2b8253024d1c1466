#!/usr/bin/env bash
# The long form of tests/podman.rs: a real Debian image instead of busybox. Builds a Debian
# root filesystem with debootstrap (cached), then in three podman storages (podman's own
# overlay driver on kernel overlayfs, unionmount as mount_program as root, and rootless as an
# unprivileged user) imports it, builds an image on it (dpkg -i and -r, useradd, groupadd,
# usermod, files copied and deleted), runs a container that works on it the way package and
# account tools do (useradd, userdel -r with lock files and hard links, su, ldconfig,
# update-alternatives, dpkg -r, perl's write-and-rename, sed -i, renames of lower
# directories, cp -a, tar out and back in), commits it, and runs the result and the original
# image again. A fourth storage repeats the rootless run with force_mask=shared (owners and
# modes in user.containers.override_stat, xattr_permissions=2).
#
# Every listing the containers print (type, mode, owner, size, link count, MD5 of every
# file; directories without link count and size) must equal the kernel's. Exits non-zero on
# any difference, printing it. For force_mask the set-ID and sticky bits and the root
# directory's mode are left out: containers-storage (4.3) drops the first when it extracts a
# layer and gives each layer's root mode 0755.
#
# Needs root, network access to a Debian mirror (once, for debootstrap) and podman, runc,
# uidmap, debootstrap (apt-get install podman runc uidmap debootstrap). The rootless run uses
# the test user umtest (created if missing, with subordinate ids).
#
# Environment:
#   SUITE       Debian suite (default bookworm)
#   MIRROR      Debian mirror (default http://deb.debian.org/debian)
#   CACHE       where the root filesystem tar is kept (default target/podman-debian)
#   UNIONMOUNT  the binary (default: a release build of this checkout)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
suite=${SUITE:-bookworm}
mirror=${MIRROR:-http://deb.debian.org/debian}
cache=${CACHE:-$here/target/podman-debian}
user=umtest

if [[ $(id -u) -ne 0 ]]; then
    echo "podman_debian.sh: needs root (runs podman as root and as $user)" >&2
    exit 2
fi
for tool in podman runc newuidmap debootstrap; do
    if ! command -v "$tool" >/dev/null; then
        echo "podman_debian.sh: $tool not found; install podman runc uidmap debootstrap" >&2
        exit 2
    fi
done
if [[ -z ${UNIONMOUNT:-} ]]; then
    (cd "$here" && cargo build --release --quiet)
    UNIONMOUNT=$here/target/release/unionmount
fi

mkdir -p "$cache"
tarball=$cache/$suite.tar
if [[ ! -s $tarball ]]; then
    echo "podman_debian.sh: debootstrap $suite into the cache (once)"
    rm -rf "$cache/rootfs"
    debootstrap --variant=minbase "$suite" "$cache/rootfs" "$mirror" >"$cache/debootstrap.log"
    tar --numeric-owner -C "$cache/rootfs" -cf "$tarball.part" .
    mv "$tarball.part" "$tarball"
    rm -rf "$cache/rootfs"
fi

id "$user" >/dev/null 2>&1 || useradd -M -s /usr/sbin/nologin "$user"
grep -q "^$user:" /etc/subuid || usermod --add-subuids 300000-365535 "$user"
grep -q "^$user:" /etc/subgid || usermod --add-subgids 300000-365535 "$user"

work=$(mktemp -d /tmp/podman-debian.XXXXXX)
chmod 755 "$work"
pids_file=$work/pause-pids
cleanup() {
    for d in "$work"/kernel "$work"/root "$work"/rootless "$work"/masked; do
        [[ -d $d ]] || continue
        podman_in "$d" rm --all --force >/dev/null 2>&1 || true
    done
    # Whatever podman left mounted under its storages, deepest first.
    awk -v w="$work" '$2 ~ "^"w {print $2}' /proc/self/mounts | sort -r | while read -r m; do
        umount -l "$m" || true
    done
    for f in "$work"/*/run/libpod/pause.pid "$work"/*/run/libpod/tmp/pause.pid; do
        [[ -s $f ]] && kill -9 "$(cat "$f")" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

# The scripts the containers run, on a read-only volume at /host.
mkdir "$work/host"
cp "$UNIONMOUNT" "$work/host/unionmount"
(cd "$work/host" && apt-get download hello >/dev/null 2>&1) ||
    { echo "podman_debian.sh: apt-get download hello failed" >&2; exit 1; }
deb=$(cd "$work/host" && ls hello_*.deb)
cat >"$work/host/Containerfile" <<EOF
FROM localhost/debian
COPY $deb /tmp/
RUN dpkg -i /tmp/$deb && rm /tmp/$deb && useradd -m -s /bin/bash alice && groupadd grp && usermod -aG grp alice
RUN dpkg -r e2fsprogs && rm -rf /usr/share/doc/* && mkdir -p /opt/app && cp -a /usr/lib/x86_64-linux-gnu/libz* /opt/app/ && ln -s /opt/app /app
EOF
cat >"$work/host/changes.sh" <<'EOF'
set -e
hello >/dev/null
useradd -m bob
usermod -aG grp bob
userdel -r alice 2>/dev/null
su bob -s /bin/sh -c 'echo hi > ~/f; mkdir ~/d; ln ~/f ~/d/g; chmod 600 ~/f'
echo /opt/app > /etc/ld.so.conf.d/app.conf
ldconfig
update-alternatives --install /usr/bin/hi hi /usr/bin/hello 10 >/dev/null
dpkg -r hello >/dev/null
perl -e 'open F, ">", "/tmp/p" or die; print F "x" x 10000; close F; rename "/tmp/p", "/etc/p" or die'
sed -i 's/^root:/root:/' /etc/passwd
mv /usr/share/perl5 /usr/share/perl5.moved
mv /usr/share/perl5.moved /usr/share/perl5
cp -a /usr/lib /tmp/lib
rm -rf /tmp/lib
tar -C / --exclude=etc/hosts --exclude=etc/hostname --exclude=etc/resolv.conf -cf /tmp/etc.tar etc
mkdir /tmp/x
tar -C /tmp/x -xf /tmp/etc.tar
rm -rf /usr/share/locale /etc/systemd
tar -C / -xf /tmp/etc.tar
rm -rf /tmp/x /tmp/etc.tar
EOF
cat >"$work/host/list.sh" <<'EOF'
cd /
skip='( -path /proc -o -path /sys -o -path /dev -o -path /host -o -path /etc/hosts -o -path /etc/hostname -o -path /etc/resolv.conf -o -path /run/.containerenv -o -path /var/log -o -path /var/cache/ldconfig )'
find / -xdev $skip -prune -o -print0 | sort -z | xargs -0 stat -c '%n %F %a %u:%g %s %h' |
    awk '$2 == "directory" { print $1, $2, $3, $4; next } { print }' >/dev/shm/listing
find / -xdev $skip -prune -o -type f -print0 | sort -z | xargs -0 md5sum
cat /dev/shm/listing
EOF
chmod -R a+rX "$work/host"

podman_in() {
    local d=$1
    shift
    local pre=() mp=()
    case $(basename "$d") in
    rootless | masked) pre=(setpriv --reuid "$user" --regid "$user" --init-groups --) ;;
    esac
    [[ $(basename "$d") != kernel ]] && mp=(--storage-opt "overlay.mount_program=$work/host/unionmount")
    [[ $(basename "$d") == masked ]] && mp+=(--storage-opt overlay.force_mask=shared)
    env HOME="$d/home" XDG_RUNTIME_DIR="$d/run" TMPDIR="$d/tmp" "${pre[@]}" podman \
        --root "$d/storage" --runroot "$d/run/storage" --tmpdir "$d/run/libpod" \
        --storage-driver overlay --cgroup-manager cgroupfs --events-backend none \
        --runtime runc "${mp[@]}" "$@"
}

# runc (crun refuses a hybrid cgroup hierarchy); limits no higher than the caller's (raising
# them needs CAP_SYS_RESOURCE).
run_opts=(--network none --ulimit nofile=1024:1024 --ulimit nproc=4096:4096)

scenario() {
    local d=$work/$1
    mkdir -p "$d/home" "$d/run" "$d/tmp" "$d/out"
    chmod 700 "$d/run"
    [[ $1 == rootless || $1 == masked ]] && chown -R "$user:$user" "$d"
    chmod 644 "$tarball" 2>/dev/null || true
    podman_in "$d" import --quiet "$tarball" localhost/debian >/dev/null
    podman_in "$d" build --quiet "${run_opts[@]}" -t localhost/built \
        -f "$work/host/Containerfile" "$work/host" >/dev/null
    local v=(-v "$work/host:/host:ro")
    podman_in "$d" run --rm "${run_opts[@]}" "${v[@]}" localhost/built bash /host/list.sh \
        >"$d/out/1-built"
    podman_in "$d" run "${run_opts[@]}" "${v[@]}" --name changer localhost/built \
        bash -c 'bash /host/changes.sh && bash /host/list.sh' >"$d/out/2-changed"
    podman_in "$d" commit --quiet changer localhost/committed >/dev/null
    podman_in "$d" rm changer >/dev/null
    podman_in "$d" run --rm "${run_opts[@]}" "${v[@]}" localhost/committed bash /host/list.sh \
        >"$d/out/3-committed"
    podman_in "$d" run --rm "${run_opts[@]}" "${v[@]}" localhost/built bash /host/list.sh \
        >"$d/out/4-built-again"
}

# The tarball must be readable by the rootless user.
if ! setpriv --reuid "$user" --regid "$user" --init-groups -- test -r "$tarball"; then
    cp "$tarball" "$work/host/debian.tar"
    tarball=$work/host/debian.tar
    chmod 644 "$tarball"
fi

status=0
for mode in kernel root rootless masked; do
    start=$SECONDS
    scenario "$mode"
    echo "podman_debian.sh: $mode: $(wc -l <"$work/$mode/out/2-changed") lines listed, $((SECONDS - start)) s"
done
# Modes as their permission bits, without the root directory's line.
plain_modes() {
    sed -E -e 's/^(\S+ .*) [0-7]?([0-7]{3}) ([0-9]+:[0-9]+)/\1 \2 \3/' -e '/^\/ directory /d' "$1"
}
for mode in root rootless masked; do
    for f in "$work"/kernel/out/*; do
        name=$(basename "$f")
        ours=$work/$mode/out/$name
        if [[ $mode == masked ]]; then
            plain_modes "$f" >"$f.plain"
            plain_modes "$ours" >"$ours.plain"
            f=$f.plain
            ours=$ours.plain
        fi
        if ! diff -q "$f" "$ours" >/dev/null; then
            echo "podman_debian.sh: $mode: $name differs from kernel overlayfs (< kernel, > unionmount):"
            diff "$f" "$ours" | head -40
            status=1
        fi
    done
done
[[ $status -eq 0 ]] && echo "podman_debian.sh: unionmount as root, rootless and with force_mask shows what kernel overlayfs shows"
exit $status
