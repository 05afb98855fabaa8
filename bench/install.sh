#!/bin/sh
# Installs what the benchmark (bench/run.py) drives, from Debian:
#   haproxy  the side-by-side anchor (2.6 on Debian 12)
#   iperf3   bulk TCP throughput (case a)
#   wrk      HTTP keep-alive load (case d)
#   nginx    the HTTP nodes (cases c, d, e)
#   dcmtk    storescu, storescp, echoscu (cases b, c)
# The bench starts each of them itself on loopback ports and stops it by PID; none may run as a service.
#
# Idempotent: when everything is installed it returns at once, without touching apt. Run as root.
# Debian starts a daemon on install (haproxy, nginx) unless /usr/sbin/policy-rc.d forbids it, so for the
# duration of the install one that forbids everything is put in place (and whatever was there before is
# put back afterwards).
set -eu

PACKAGES="haproxy iperf3 wrk nginx dcmtk"

missing=""
for pkg in $PACKAGES; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    case "$status" in
        "install ok installed") ;;
        *) missing="$missing $pkg" ;;
    esac
done

if [ -z "$missing" ]; then
    echo "bench: already installed:$(printf ' %s' $PACKAGES)"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "bench: missing:$missing; run this script as root (it installs them with apt-get)" >&2
    exit 1
fi

policy=/usr/sbin/policy-rc.d
saved="$policy.pacslb-bench-saved"
restore_policy() {
    rm -f "$policy"
    if [ -e "$saved" ]; then mv "$saved" "$policy"; fi
}
if [ -e "$policy" ]; then mv "$policy" "$saved"; fi
trap restore_policy EXIT
trap 'exit 130' INT TERM
printf '#!/bin/sh\n# pacslb bench/install.sh: no service starts while the bench peers are installed\nexit 101\n' >"$policy"
chmod 755 "$policy"

export DEBIAN_FRONTEND=noninteractive
echo "bench: installing:$missing"
apt-get update -q
# shellcheck disable=SC2086  # word splitting of the package list is intended
apt-get install -y -q --no-install-recommends $missing

# On a machine that runs systemd, policy-rc.d covers invoke-rc.d; also make sure the packaged services
# neither run now nor start at boot (they would hold ports 80 and the default HAProxy config's).
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    for unit in haproxy.service nginx.service; do
        systemctl disable --now "$unit" >/dev/null 2>&1 || true
    done
fi

for tool in /usr/sbin/haproxy /usr/bin/iperf3 /usr/bin/wrk /usr/sbin/nginx /usr/bin/storescu /usr/bin/storescp \
    /usr/bin/echoscu; do
    if [ ! -e "$tool" ]; then
        echo "bench: $tool is still missing after the install" >&2
        exit 1
    fi
done
echo "bench: ready"
