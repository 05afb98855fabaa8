#!/bin/sh
# Installs what the browser tests (tests/browser) drive: Debian's Chromium, and a font for its pages.
# Playwright's Python package comes with the test extra (pip); it never downloads a browser of its own:
# the tests launch /usr/bin/chromium.
#
# Idempotent: when everything is installed it returns at once, without touching apt. Run as root.
set -eu

PACKAGES="chromium fonts-dejavu-core"

missing=""
for pkg in $PACKAGES; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    case "$status" in
        "install ok installed") ;;
        *) missing="$missing $pkg" ;;
    esac
done

if [ -z "$missing" ]; then
    echo "browser: already installed:$(printf ' %s' $PACKAGES)"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "browser: missing:$missing; run this script as root (it installs them with apt-get)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "browser: installing:$missing"
apt-get update -q
# shellcheck disable=SC2086  # word splitting of the package list is intended
apt-get install -y -q --no-install-recommends $missing

if [ ! -x /usr/bin/chromium ]; then
    echo "browser: /usr/bin/chromium is still missing after the install" >&2
    exit 1
fi
echo "browser: ready"
