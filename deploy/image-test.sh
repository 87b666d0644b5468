#!/usr/bin/env bash
# Build the exposrd container image and smoke-test it, without a Docker engine.
#
#   deploy/image-test.sh            (as root; run from anywhere)
#
# 1. A Debian bookworm base (python3, python3-venv, python3-pip) made with
#    debootstrap from the mirror apt already uses, cached as a tarball under
#    $EXPOSR_IMAGE_BASE_CACHE (default /var/cache/exposr-image-base) and as the
#    local image localhost/exposr-debian-base:bookworm; rebuilt when its recipe
#    changes. No registry image is pulled.
# 2. `buildah bud --isolation chroot --pull=never` of the top-level Dockerfile on
#    that base (--build-arg BASE=...).
# 3. `buildah run` of the image with the environment the original's Helm chart
#    renders for its default values (ports moved to free ones on 127.0.0.1: a
#    chroot container shares the host's network), plus registration switched on
#    for the test's account. Checks: the container runs as a non-root user, the
#    /entrypoint-initdb.d hook runs, the image's HEALTHCHECK command passes,
#    /ping and /health answer 200 on the admin port, the API answers, and the
#    project's own `exposr` client (host Python) serves one HTTP request through a
#    tunnel to a target on the host. Then it stops the container (SIGTERM) and
#    prints the image size.
#
# Environment: PYTHON (host Python with exposr installed; default python3),
# EXPOSR_IMAGE (tag, default localhost/exposrd:test-<pid>), EXPOSR_IMAGE_BASE_CACHE,
# EXPOSR_IMAGE_KEEP=1 (keep the built image; it is removed otherwise). Runs side by
# side: the base is made under a lock, each run builds its own tag. Exits non-zero with an
# "image-test: FAILED: ..." line on any failure; every step is time-bounded.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SUITE=bookworm
BASE_PACKAGES=python3,python3-venv,python3-pip,ca-certificates
BASE_IMAGE=localhost/exposr-debian-base:$SUITE
IMAGE=${EXPOSR_IMAGE:-localhost/exposrd:test-$$}
CACHE=${EXPOSR_IMAGE_BASE_CACHE:-/var/cache/exposr-image-base}
PY=${PYTHON:-python3}

T0=$(date +%s)
say() { echo "image-test: [$(( $(date +%s) - T0 ))s] $*"; }
fail() { echo "image-test: FAILED: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "must run as root (debootstrap and buildah's chroot isolation)"
"$PY" -c 'import exposr.client.cli' 2>/dev/null || fail "$PY cannot import exposr (set PYTHON to the project's venv python)"

# --- tools ---------------------------------------------------------------------------
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v buildah >/dev/null || need+=(buildah)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -qq >/dev/null || fail "apt-get update failed"
    timeout 600 apt-get install -y -qq "${need[@]}" >/dev/null || fail "apt-get install ${need[*]} failed"
fi

WORK=$(mktemp -d /tmp/exposr-image-test.XXXXXX)
CTR= RUN_PID= TARGET_PID= CLIENT_PID= MNT=
cleanup() {
    set +e
    [ -n "$CLIENT_PID" ] && kill "$CLIENT_PID" 2>/dev/null
    [ -n "$TARGET_PID" ] && kill "$TARGET_PID" 2>/dev/null
    if [ -n "$RUN_PID" ] && kill -0 "$RUN_PID" 2>/dev/null; then
        stop_container
    fi
    [ -n "$CTR" ] && buildah rm "$CTR" >/dev/null 2>&1
    [ "${EXPOSR_IMAGE_KEEP:-}" = 1 ] || buildah rmi "$IMAGE" >/dev/null 2>&1
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'fail "interrupted"' INT TERM

# --- 1. the Debian base ------------------------------------------------------------
# The mirror apt uses on this machine (deb822 or one-line sources), else Debian's.
mirror() {
    local m
    m=$(grep -hs -E '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '{print $2}' | grep -E '/debian/?$' | head -1)
    [ -n "$m" ] || m=$(grep -hs -E '^deb +(\[[^]]*\] +)?https?://[^ ]+/debian/? +'"$SUITE"' ' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | sed -E 's/^deb +(\[[^]]*\] +)?//' | awk '{print $1}' | head -1)
    echo "${m:-http://deb.debian.org/debian}"
}
MIRROR=$(mirror)
# Extra CA certificates of this machine (e.g. a TLS-intercepting egress proxy) go into
# the local base so that pip inside the build can reach PyPI; the official base image
# needs none.
EXTRA_CAS=$(ls /usr/local/share/ca-certificates/*.crt 2>/dev/null || true)
RECIPE=$( { echo "$SUITE $BASE_PACKAGES $MIRROR v1"; [ -z "$EXTRA_CAS" ] || cat $EXTRA_CAS; } | sha256sum | cut -c1-16)
TARBALL=$CACHE/debian-$SUITE-$RECIPE.tar

base_image_recipe() {
    buildah inspect --type image --format '{{index .ImageAnnotations "org.exposr.base-recipe"}}' \
        "$BASE_IMAGE" 2>/dev/null || true
}

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock -w 1200 9 || fail "another run held $CACHE/.lock for 20 minutes"
if [ "$(base_image_recipe)" = "$RECIPE" ]; then
    say "base image $BASE_IMAGE is current (recipe $RECIPE)"
else
    if [ -s "$TARBALL" ]; then
        say "base rootfs from cache $TARBALL"
    else
        say "debootstrap $SUITE from $MIRROR (cold: a few minutes)"
        ROOTFS=$WORK/rootfs
        timeout 900 debootstrap --variant=minbase --include="$BASE_PACKAGES" \
            "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
            || { tail -20 "$WORK/debootstrap.log" >&2; fail "debootstrap failed (log above)"; }
        if [ -n "$EXTRA_CAS" ]; then
            cp $EXTRA_CAS "$ROOTFS/usr/local/share/ca-certificates/"
            chroot "$ROOTFS" update-ca-certificates >/dev/null 2>&1 || fail "update-ca-certificates failed in the base"
            printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$ROOTFS/etc/pip.conf"
        fi
        # what a container base does not need
        rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
            "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
            "$ROOTFS"/var/log/* "$ROOTFS"/var/cache/debconf/*-old
        find "$ROOTFS/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
        : >"$ROOTFS/etc/resolv.conf"; echo exposr-base >"$ROOTFS/etc/hostname"
        tar -C "$ROOTFS" --numeric-owner -cf "$TARBALL.part" . || fail "cannot write $TARBALL"
        mv "$TARBALL.part" "$TARBALL"
        find "$CACHE" -name 'debian-*.tar' ! -name "$(basename "$TARBALL")" -delete
        rm -rf "$ROOTFS"
    fi
    say "importing the base as $BASE_IMAGE"
    bctr=$(buildah from --pull=never scratch) || fail "buildah from scratch failed"
    bmnt=$(buildah mount "$bctr") || fail "buildah mount failed"
    tar -C "$bmnt" --numeric-owner -xpf "$TARBALL" || fail "cannot unpack $TARBALL"
    buildah umount "$bctr" >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 --cmd /bin/bash --annotation "org.exposr.base-recipe=$RECIPE" \
        --os linux --arch amd64 "$bctr"
    buildah commit --rm -q "$bctr" "$BASE_IMAGE" >/dev/null || fail "buildah commit of the base failed"
fi
flock -u 9

# --- 2. the image ----------------------------------------------------------------------
say "building $IMAGE from $ROOT/Dockerfile"
timeout 900 buildah bud --isolation chroot --pull=never --format docker --layers=false \
    --build-arg BASE="$BASE_IMAGE" -t "$IMAGE" -f "$ROOT/Dockerfile" "$ROOT" \
    >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log" >&2; fail "buildah bud failed (log above)"; }
say "built $IMAGE"

# --- 3. run it with the Helm chart's default environment ------------------------------
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
API=$(free_port); ADMIN=$(free_port); UDP=$(free_port); TPORT=$(free_port)
DOMAIN=tunnel.example.com
# What the chart's ConfigMap and Deployment give the pod for its default values;
# ports (8080, 9000, 4430, 1025) moved to free ones on this host.
CHART_ENV=(
    EXPOSR_LOG_LEVEL=info
    EXPOSR_ADMIN_ENABLE=true
    EXPOSR_ADMIN_PORT="$ADMIN"
    EXPOSR_ALLOW_REGISTRATION=false
    EXPOSR_API_PORT="$API"
    EXPOSR_CLUSTER=udp
    EXPOSR_CLUSTER_KEY=cluster-signing-key-change-me
    EXPOSR_CLUSTER_UDP_DISCOVERY=kubernetes
    EXPOSR_CLUSTER_UDP_PORT="$UDP"
    EXPOSR_STORAGE_URL=memory://
    EXPOSR_INGRESS=http
    EXPOSR_INGRESS_HTTP_DOMAIN="http://$DOMAIN"
    EXPOSR_INGRESS_HTTP_PORT="$API"
    EXPOSR_TRANSPORT=ws
    EXPOSR_TRANSPORT_MAX_CONNECTIONS=2
    POD_NAME=exposr-0
    POD_NAMESPACE=default
    SERVICE_NAME=exposr-headless
)
# what this test needs on top: an account without the admin API, and a stand-in for
# the service-account namespace file Kubernetes mounts in every pod (Kubernetes peer
# discovery is refused without it)
TEST_ENV=(EXPOSR_ALLOW_REGISTRATION=true
          EXPOSR_CLUSTER_UDP_DISCOVERY_KUBERNETES_NAMESPACE_FILE=/data/k8s-namespace)

CTR=$(buildah from --pull=never "$IMAGE") || fail "buildah from $IMAGE failed"
# the /entrypoint-initdb.d contract: a hook script runs before the server
MNT=$(buildah mount "$CTR")
printf '#!/bin/sh\necho "initdb hook ran as $(id -u)" >/data/initdb-ran\n' >"$MNT/entrypoint-initdb.d/10-mark.sh"
chmod 0755 "$MNT/entrypoint-initdb.d/10-mark.sh"
echo default >"$MNT/data/k8s-namespace"

run_args=()
for kv in "${CHART_ENV[@]}" "${TEST_ENV[@]}"; do run_args+=(--env "$kv"); done
say "starting the container (API 127.0.0.1:$API, admin :$ADMIN)"
buildah run --isolation chroot "${run_args[@]}" "$CTR" -- /usr/local/bin/exposrd-entrypoint \
    >"$WORK/server.log" 2>&1 &
RUN_PID=$!

# the container's own processes: descendants of `buildah run` that live in its
# chroot, less buildah's chroot helper (buildah answers SIGTERM with SIGKILL to its
# child, so the server is signalled directly to see a graceful stop)
container_pids() {
    local pids=" $RUN_PID " more p
    while :; do
        more=$(ps -e -o pid=,ppid= | awk -v known="$pids" \
            'BEGIN { n = split(known, a, " "); for (i = 1; i <= n; i++) k[a[i]] = 1 }
             ($2 in k) && !($1 in k) { printf " %s", $1 }')
        [ -n "$more" ] || break
        pids="$pids$more "
    done
    for p in $pids; do
        [ "$(readlink "/proc/$p/root" 2>/dev/null)" != / ] || continue
        case "$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null)" in buildah*|"") continue;; esac
        echo "$p"
    done
}
stop_container() {
    local pids
    pids=$(container_pids)
    [ -z "$pids" ] || kill -TERM $pids 2>/dev/null
    for _ in $(seq 1 300); do kill -0 "$RUN_PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$RUN_PID" 2>/dev/null; then
        pids=$(container_pids); [ -z "$pids" ] || kill -KILL $pids 2>/dev/null
        kill -KILL "$RUN_PID" 2>/dev/null
        return 1
    fi
}
server_fail() { echo "--- container output (last 40 lines)" >&2; tail -40 "$WORK/server.log" >&2; fail "$*"; }

ready=
for _ in $(seq 1 600); do   # 60 s (the chart's start-up probe allows 30 s + 10 x 5 s)
    kill -0 "$RUN_PID" 2>/dev/null || server_fail "the container exited during start-up"
    code=$(curl -s -o /dev/null -w '%{http_code}' -m 2 "http://127.0.0.1:$ADMIN/ping" || true)
    [ "$code" = 200 ] && { ready=1; break; }
    sleep 0.1
done
[ -n "$ready" ] || server_fail "/ping on the admin port did not answer 200 within 60 s"
say "/ping 200"

user=$(grep -m1 'initdb hook ran as' "$MNT/data/initdb-ran" 2>/dev/null | awk '{print $NF}')
[ "$user" = 10001 ] || server_fail "the /entrypoint-initdb.d hook did not run as uid 10001 (got '${user:-nothing}')"
pids=$(container_pids)
[ -n "$pids" ] || server_fail "no container process found under buildah run ($RUN_PID)"
for p in $pids; do
    uid=$(awk '/^Uid:/{print $2}' "/proc/$p/status")
    [ "$uid" = 10001 ] || server_fail "container process $p runs as uid $uid, not 10001"
done
say "runs as uid 10001, initdb hook ran"

# ready: a cluster node first waits for its peers (20 s by default)
ready=
for _ in $(seq 1 600); do   # 60 s
    kill -0 "$RUN_PID" 2>/dev/null || server_fail "the container exited before it was ready"
    code=$(curl -s -o /dev/null -w '%{http_code}' -m 2 "http://127.0.0.1:$ADMIN/health" || true)
    [ "$code" = 200 ] && { ready=1; break; }
    sleep 0.1
done
[ -n "$ready" ] || server_fail "/health on the admin port did not answer 200 within 60 s (last: $code)"
timeout 20 buildah run --isolation chroot --env EXPOSR_ADMIN_PORT="$ADMIN" "$CTR" -- \
    /usr/local/bin/exposrd-healthcheck || server_fail "the image's HEALTHCHECK command failed"
hc=$(buildah inspect --type image --format '{{.Docker.Config.Healthcheck.Test}}' "$IMAGE" 2>/dev/null || true)
case "$hc" in *exposrd-healthcheck*) ;; *) server_fail "the image carries no HEALTHCHECK ($hc)";; esac
say "/health 200, HEALTHCHECK passes"

code=$(curl -s -o "$WORK/api.json" -w '%{http_code}' -m 5 -X POST "http://127.0.0.1:$API/v1/account" || true)
[ "$code" = 201 ] || [ "$code" = 200 ] || server_fail "POST /v1/account answered $code"

# --- one request through a tunnel ------------------------------------------------------
TOKEN=smoke-$RANDOM$RANDOM
mkdir -p "$WORK/www"; echo "$TOKEN" >"$WORK/www/index.html"
"$PY" -m http.server --bind 127.0.0.1 --directory "$WORK/www" "$TPORT" >"$WORK/target.log" 2>&1 &
TARGET_PID=$!
TUNNEL=smoke$RANDOM
"$PY" -c 'from exposr.client.cli import main; main()' -s "http://127.0.0.1:$API" --non-interactive \
    tunnel connect "$TUNNEL" "http://127.0.0.1:$TPORT/" >"$WORK/client.log" 2>&1 &
CLIENT_PID=$!
up=
for _ in $(seq 1 200); do   # 20 s
    grep -q "Tunnel $TUNNEL connected" "$WORK/client.log" && { up=1; break; }
    kill -0 "$CLIENT_PID" 2>/dev/null || break
    sleep 0.1
done
[ -n "$up" ] || { echo "--- client output" >&2; cat "$WORK/client.log" >&2; server_fail "the exposr client did not connect the tunnel"; }
body=$(curl -s -m 10 -H "Host: $TUNNEL.$DOMAIN" "http://127.0.0.1:$API/" || true)
[ "$body" = "$TOKEN" ] || { echo "--- client output" >&2; cat "$WORK/client.log" >&2; server_fail "the request through tunnel $TUNNEL got '${body:0:200}', not the target's page"; }
say "tunnel $TUNNEL served a request from the host target through the container"
kill "$CLIENT_PID" 2>/dev/null; wait "$CLIENT_PID" 2>/dev/null || true; CLIENT_PID=

# --- stop ------------------------------------------------------------------------------
stop_container || server_fail "the container did not stop within 30 s of SIGTERM"
status=0; wait "$RUN_PID" 2>/dev/null || status=$?
RUN_PID=
[ "$status" -eq 0 ] || [ "$status" -eq 143 ] || server_fail "the container exited $status after SIGTERM"
grep -q '"level": *"ERROR"\|Traceback' "$WORK/server.log" && server_fail "errors in the container's log"
say "stopped (exit $status)"

size=$(buildah images --format '{{.Size}}' "$IMAGE" | head -1)
say "image $IMAGE: $size"
echo "image-test: OK: $IMAGE ($size) built and served a tunnel in $(( $(date +%s) - T0 ))s"
