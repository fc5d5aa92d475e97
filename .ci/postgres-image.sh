#!/usr/bin/env bash
# Makes the container backend of protected-pool-testkit runnable on this machine, idempotently:
#
#  1. a Docker engine: installs Debian's docker.io if no engine answers and no dockerd is
#     installed, and starts dockerd in the background (no systemd; log: /var/log/dockerd.log);
#  2. the image protected-pool/postgres:15-local, built without any registry: `docker import`
#     of a root filesystem holding this machine's PostgreSQL 15 (/usr/lib/postgresql/15,
#     /usr/share/postgresql/15), the shared libraries its programs link, busybox (for /bin/sh),
#     passwd/group entries for `postgres`, .ci/postgres-image-entrypoint.sh, and a cluster made
#     by initdb at build time (which a container's first start only configures). Skipped when
#     the image exists and was built from the same recipe (a label holds its hash).
#
# Prints, on stdout and nothing else, the environment the tests need, for
#   eval "$(.ci/postgres-image.sh)"
# Progress goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_MAJOR=${PG_MAJOR:-15}
IMAGE=${PGTESTKIT_IMAGE:-protected-pool/postgres}
TAG=${PGTESTKIT_IMAGE_TAG:-${PG_MAJOR}-local}

say() { echo "== $*" >&2; }
die() { echo "postgres-image.sh: $*" >&2; exit 1; }

export DOCKER_HOST=${DOCKER_HOST:-unix:///var/run/docker.sock}

# ---- 1. the engine ------------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
  if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
    say "installing docker.io"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
  fi
  if [[ "$DOCKER_HOST" != unix:///var/run/docker.sock ]]; then
    die "no Docker engine answers at DOCKER_HOST=$DOCKER_HOST"
  fi
  pid=$(cat /var/run/docker.pid 2>/dev/null || true)
  if [[ -z "$pid" || ! -d /proc/$pid ]]; then
    say "starting dockerd (log: /var/log/dockerd.log)"
    setsid nohup dockerd >>/var/log/dockerd.log 2>&1 </dev/null &
  fi
  for _ in $(seq 1 120); do
    docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || die "dockerd did not answer within 60 s; see /var/log/dockerd.log"
fi
# testcontainers 0.27 works with old engines too (Debian 12's speaks API 1.41): bollard 0.20
# sends unversioned paths, which an engine serves at its own API version.
say "Docker engine $(docker version --format '{{.Server.Version}} (API {{.Server.APIVersion}})')"

# ---- 2. the image -------------------------------------------------------------------------
pg_lib=/usr/lib/postgresql/$PG_MAJOR
pg_share=/usr/share/postgresql/$PG_MAJOR
[[ -x $pg_lib/bin/postgres ]] || die "no PostgreSQL $PG_MAJOR in $pg_lib (apt-get install postgresql-$PG_MAJOR)"
recipe=$(cat .ci/postgres-image.sh .ci/postgres-image-entrypoint.sh "$pg_lib/bin/postgres" | sha256sum | cut -c1-16)
have=$(docker image inspect --format '{{ index .Config.Labels "pgtestkit.recipe" }}' "$IMAGE:$TAG" 2>/dev/null || true)
if [[ "$have" == "$recipe" ]]; then
  say "image $IMAGE:$TAG is up to date"
else
  started=$(date +%s%N)
  say "building image $IMAGE:$TAG"
  is_static() { [[ -x $1 ]] && ! ldd "$1" >/dev/null 2>&1; }
  if ! is_static /bin/busybox; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >/dev/null
  fi
  is_static /bin/busybox || die "/bin/busybox is not statically linked (apt-get install busybox-static)"

  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  chmod 755 "$work" # initdb runs as postgres in there
  root=$work/rootfs
  mkdir -p "$root"/{bin,etc,tmp,root,run/postgresql,var/lib/postgresql/data,usr/lib64,usr/local/bin}
  chmod 1777 "$root/tmp"
  ln -s usr/lib "$root/lib"
  ln -s usr/lib64 "$root/lib64"
  ln -s ../run "$root/var/run"

  # PostgreSQL, without JIT (llvmjit links LLVM, ~100 MB; PostgreSQL runs without it).
  tar -C / -cf - --exclude='llvmjit*' --exclude=bitcode \
    "${pg_lib#/}" "${pg_share#/}" usr/share/zoneinfo | tar -C "$root" -xf -

  # The shared libraries of every program and module, and the dynamic loader.
  mapfile -t elves < <(find "$root$pg_lib" -type f \( -perm -u+x -o -name '*.so' \))
  libs=$(for f in "${elves[@]}"; do ldd "$f" 2>/dev/null || true; done |
    awk '/not found/ { print "MISSING " $1; next }
         $2 == "=>" && $3 ~ /^\// { print $3 }
         $1 ~ /^\// { print $1 }' | sort -u)
  if grep -q '^MISSING' <<<"$libs"; then die "unresolved libraries: $(grep '^MISSING' <<<"$libs" | tr '\n' ' ')"; fi
  for gcc in /lib/x86_64-linux-gnu/libgcc_s.so.1 /usr/lib/x86_64-linux-gnu/libgcc_s.so.1; do
    [[ -e $gcc ]] && libs+=$'\n'$gcc && break
  done
  while read -r lib; do
    [[ -n $lib ]] || continue
    dest=$lib
    case $dest in /lib/* | /lib64/*) dest=/usr$dest ;; esac
    mkdir -p "$root$(dirname "$dest")"
    cp -L "$lib" "$root$dest"
  done <<<"$libs"

  # busybox for /bin/sh and the rest of the entrypoint's tools.
  cp /bin/busybox "$root/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [[ -e "$root/bin/$applet" ]] || ln -s busybox "$root/bin/$applet"
  done

  cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
postgres:x:999:999:PostgreSQL administrator:/var/lib/postgresql:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
  cat >"$root/etc/group" <<'EOF'
root:x:0:
postgres:x:999:
nogroup:x:65534:
EOF
  echo "/bin/sh" >"$root/etc/shells"

  # A cluster made now by initdb, which the entrypoint only configures at a first start instead
  # of running initdb in every container (about a second each). Needs this machine's postgres
  # user (the PostgreSQL packages make it); without it containers run initdb.
  if id postgres >/dev/null 2>&1; then
    mkdir "$work/cluster"
    chown postgres: "$work/cluster"
    if ! TZ=Etc/UTC runuser -u postgres -- "$pg_lib/bin/initdb" -D "$work/cluster/data" -U postgres \
      --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C --no-sync >"$work/initdb.log" 2>&1; then
      cat "$work/initdb.log" >&2
      die "initdb failed"
    fi
    rmdir "$root/var/lib/postgresql/data"
    mv "$work/cluster/data" "$root/var/lib/postgresql/data"
    touch "$root/var/lib/postgresql/data/.pgtestkit-built-in"
  fi
  install -m 755 .ci/postgres-image-entrypoint.sh "$root/usr/local/bin/docker-entrypoint.sh"
  chown -R 999:999 "$root/var/lib/postgresql" "$root/run/postgresql"
  chmod 700 "$root/var/lib/postgresql/data"

  tar -C "$root" --numeric-owner -cf - . | docker import \
    --change 'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]' \
    --change 'CMD ["postgres"]' \
    --change "ENV PATH=$pg_lib/bin:/bin PGDATA=/var/lib/postgresql/data TZ=Etc/UTC LANG=C" \
    --change 'EXPOSE 5432' \
    --change "LABEL pgtestkit.recipe=$recipe" \
    - "$IMAGE:$TAG" >/dev/null
  size=$(docker image inspect --format '{{.Size}}' "$IMAGE:$TAG")
  say "built $IMAGE:$TAG ($((size / 1024 / 1024)) MB) in $(( ($(date +%s%N) - started) / 1000000 )) ms"
fi

# The network the harness's containers join (it creates it too, but one process at a time).
if ! docker network inspect pgtestkit >/dev/null 2>&1; then
  docker network create --label org.protected-pool.pgtestkit.owner=shared pgtestkit >/dev/null
fi

# ---- the environment for the tests --------------------------------------------------------
echo "export DOCKER_HOST=$DOCKER_HOST"
echo "export PGTESTKIT_IMAGE=$IMAGE"
echo "export PGTESTKIT_IMAGE_TAG=$TAG"
