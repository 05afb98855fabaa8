#!/bin/sh
# Installs Debian packages for pacslb's tests and benchmark, leaving no service running.
#
#   tools/apt-install.sh LABEL PACKAGE... [--disable UNIT...] [--require PATH...]
#
# Idempotent: when every PACKAGE is installed it returns at once, without touching apt. Installing needs
# root. Debian starts a daemon on install (orthanc, nginx, haproxy) unless /usr/sbin/policy-rc.d forbids
# it, so for the duration of the install one that forbids everything is put in place (whatever was there
# before is put back afterwards). On a machine running systemd, each --disable UNIT is also stopped and
# disabled. Each --require PATH must exist afterwards, or the script fails saying which is missing.
set -eu

label=$1
shift
packages="" units="" required="" mode=packages
for arg in "$@"; do
    case "$arg" in
        --disable) mode=units ;;
        --require) mode=required ;;
        *)
            case "$mode" in
                packages) packages="$packages $arg" ;;
                units) units="$units $arg" ;;
                required) required="$required $arg" ;;
            esac
            ;;
    esac
done

missing=""
for pkg in $packages; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    case "$status" in
        "install ok installed") ;;
        *) missing="$missing $pkg" ;;
    esac
done

if [ -z "$missing" ]; then
    echo "$label: already installed:$packages"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "$label: missing:$missing; run this as root (it installs them with apt-get)" >&2
    exit 1
fi

policy=/usr/sbin/policy-rc.d
saved="$policy.pacslb-saved"
restore_policy() {
    rm -f "$policy"
    if [ -e "$saved" ]; then mv "$saved" "$policy"; fi
}
if [ -e "$policy" ]; then mv "$policy" "$saved"; fi
trap restore_policy EXIT
trap 'exit 130' INT TERM
printf '#!/bin/sh\n# pacslb tools/apt-install.sh: no service starts while packages are installed\nexit 101\n' >"$policy"
chmod 755 "$policy"

export DEBIAN_FRONTEND=noninteractive
echo "$label: installing:$missing"
apt-get update -q
# shellcheck disable=SC2086  # word splitting of the package list is intended
apt-get install -y -q --no-install-recommends $missing

if [ -n "$units" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    for unit in $units; do
        systemctl disable --now "$unit" >/dev/null 2>&1 || true
    done
fi

for path in $required; do
    if [ ! -e "$path" ]; then
        echo "$label: $path is still missing after the install" >&2
        exit 1
    fi
done
echo "$label: ready"
