#!/usr/bin/env bash
# Build the images CI needs without any image registry, reusing those that already exist:
#   1. payment-ci/debian:bookworm  - `debootstrap` a minimal Debian from the mirror apt already
#      uses, add the CA certificates this host trusts locally, and `docker import` it;
#   2. payment-ci/postgres:15-…    - .ci/images/postgres on top of it (official-image-like entrypoint);
#   3. payment-ci/python:3.11-…    - .ci/images/python on top of it (the PYTHON_IMAGE build argument).
# Names live in ci-images.env. An image is rebuilt only when missing or when its recipe changed
# (a hash of its directory and of the base image, kept in a label).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=ci-images.env
. "$here/ci-images.env"

RECIPE_LABEL=org.payment-service.ci.recipe
SUITE=bookworm

log() { printf '== images: %s\n' "$*"; }

# The first mirror apt is configured with for the suite (deb822 .sources or one-line .list).
debian_mirror() {
    local found
    found=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk -v suite="$SUITE" '
        /^[[:space:]]*$/ { if (uri != "" && ok) { print uri; exit } uri = ""; ok = 0; next }
        tolower($1) == "uris:"   { uri = $2 }
        tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == suite) ok = 1 }
        END { if (uri != "" && ok) print uri }' | head -n 1)
    if [ -z "$found" ]; then
        found=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk -v suite="$SUITE" '
            $1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { if ($(i + 1) == suite) { print $i; exit } } }')
    fi
    echo "${DEBIAN_MIRROR:-${found:-http://deb.debian.org/debian}}"
}

build_debian() {
    if docker image inspect "$CI_DEBIAN_IMAGE" > /dev/null 2>&1; then
        log "$CI_DEBIAN_IMAGE exists, reused"
        return
    fi
    local mirror work
    mirror=$(debian_mirror)
    work=$(mktemp -d "${TMPDIR:-/var/tmp}/payment-ci-rootfs.XXXXXX")
    # shellcheck disable=SC2064  # expand now: the trap must remove this very directory
    trap "rm -rf '$work' '$work.log'; trap - RETURN" RETURN
    log "debootstrap $SUITE from $mirror (log: $work.log)"
    if ! debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$work/rootfs" "$mirror" \
            > "$work.log" 2>&1; then
        tail -n 30 "$work.log" >&2
        return 1
    fi
    # Package downloads inside `docker build` go through the same egress as this host's, so the
    # image trusts the same local certificate authorities (none on an ordinary machine).
    if compgen -G "/usr/local/share/ca-certificates/*.crt" > /dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$work/rootfs/usr/local/share/ca-certificates/"
        # (it warns that the bundle itself holds many certificates: expected, so kept quiet)
        chroot "$work/rootfs" update-ca-certificates > "$work.log" 2>&1 \
            || { cat "$work.log" >&2; return 1; }
    fi
    rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
    tar -C "$work/rootfs" --numeric-owner -c . \
        | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' - "$CI_DEBIAN_IMAGE" \
        > /dev/null
    log "$CI_DEBIAN_IMAGE imported"
}

# build_from_recipe IMAGE DIR: `docker build` DIR on the Debian image, unless up to date.
build_from_recipe() {
    local image=$1 dir=$2 recipe current
    recipe=$( { docker image inspect -f '{{.Id}}' "$CI_DEBIAN_IMAGE"
                (cd "$dir" && find . -type f -print0 | sort -z | xargs -0 sha256sum); } \
              | sha256sum | cut -c1-16)
    current=$(docker image inspect -f "{{ index .Config.Labels \"$RECIPE_LABEL\" }}" "$image" \
              2> /dev/null || true)
    if [ "$current" = "$recipe" ]; then
        log "$image exists (recipe $recipe), reused"
        return
    fi
    log "building $image (recipe $recipe)"
    docker build --quiet --label "$RECIPE_LABEL=$recipe" \
        --build-arg "BASE_IMAGE=$CI_DEBIAN_IMAGE" -t "$image" "$dir" > /dev/null
    log "$image built"
}

build_debian
build_from_recipe "$POSTGRES_IMAGE" "$here/postgres"
build_from_recipe "$PYTHON_IMAGE" "$here/python"
