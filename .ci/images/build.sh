#!/usr/bin/env bash
# Build the images CI needs without any image registry, reusing those that already exist:
#   1. payment-ci/debian:bookworm  - `debootstrap` a minimal Debian from the mirror apt already
#      uses (`build.sh --print-mirror` shows which; DEBIAN_MIRROR overrides), add the CA
#      certificates this host trusts locally, and `docker import` it;
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

# The mirror this machine's apt uses for $SUITE, read in apt's order: /etc/apt/sources.list, then
# sources.list.d/ by name, one-line `.list` and deb822 `.sources` files alike (APT_ETC overrides
# /etc/apt, for tests). DEBIAN_MIRROR wins over both. No host is built in: none found is an error.
debian_mirror() {
    if [ -n "${DEBIAN_MIRROR:-}" ]; then
        echo "$DEBIAN_MIRROR"
        return
    fi
    local etc=${APT_ETC:-/etc/apt} file found=""
    local -a files=()
    [ -f "$etc/sources.list" ] && files+=("$etc/sources.list")
    for file in "$etc"/sources.list.d/*; do
        case $file in *.list | *.sources) [ -f "$file" ] && files+=("$file") ;; esac
    done
    for file in "${files[@]}"; do
        case $file in
            *.sources) found=$(deb822_mirror < "$file") ;;
            *) found=$(one_line_mirror < "$file") ;;
        esac
        if [ -n "$found" ]; then
            echo "$found"
            return
        fi
    done
    printf 'images: no apt source for Debian %s (a "deb" entry with an http(s):// or file:// URI)\n' \
        "$SUITE" >&2
    printf '  in %s/sources.list or %s/sources.list.d/*.{list,sources};\n' "$etc" "$etc" >&2
    printf '  add one, or set DEBIAN_MIRROR to the Debian mirror to debootstrap from\n' >&2
    return 1
}

# `deb [options] URI SUITE COMPONENT...`: the URI of the first enabled line for $SUITE.
one_line_mirror() {
    awk -v suite="$SUITE" '
        $1 == "deb" {
            for (i = 2; i < NF; i++)
                if ($i ~ /^(https?|file):\/\//) { if ($(i + 1) == suite) { print $i; exit } break }
        }'
}

# deb822 stanzas (Types/URIs/Suites/Enabled, blank-line separated): the first URI of the first
# enabled `deb` stanza whose Suites include $SUITE.
deb822_mirror() {
    awk -v suite="$SUITE" '
        function stanza_end() {
            if (deb && wanted && enabled && uri != "") { print uri; done = 1; exit }
            deb = 0; wanted = 0; enabled = 1; uri = ""
        }
        BEGIN { enabled = 1 }
        /^[[:space:]]*#/ { next }
        /^[[:space:]]*$/ { stanza_end(); next }
        tolower($1) == "types:"   { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
        tolower($1) == "uris:"    { for (i = 2; i <= NF; i++)
                                        if (uri == "" && $i ~ /^(https?|file):\/\//) uri = $i }
        tolower($1) == "suites:"  { for (i = 2; i <= NF; i++) if ($i == suite) wanted = 1 }
        tolower($1) == "enabled:" { enabled = tolower($2) != "no" }
        END { if (!done) stanza_end() }'
}

build_debian() {
    if docker image inspect "$CI_DEBIAN_IMAGE" > /dev/null 2>&1; then
        log "$CI_DEBIAN_IMAGE exists, reused"
        return
    fi
    local mirror work
    mirror=$(debian_mirror) || return 1
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

if [ "${1:-}" = "--print-mirror" ]; then  # what build_debian would use, and nothing else
    debian_mirror
    exit
fi
build_debian
build_from_recipe "$POSTGRES_IMAGE" "$here/postgres"
build_from_recipe "$PYTHON_IMAGE" "$here/python"
