#!/bin/sh
# Installs the real peers that the integration tests drive (tests/integration, marker "peers"):
#   dcmtk    echoscu, storescu, findscu: the DICOM clients a modality or a workstation would be
#   orthanc  the PACS nodes behind pacslb (DICOM + REST), with its worklist plugin
#            (/usr/share/orthanc/plugins/libModalityWorklists.so ships in the orthanc package itself)
# Nothing else: the tests start every peer themselves, on free loopback ports, and stop it after.
#
# Idempotent: when everything is installed it returns at once, without touching apt. Run as root.
# It never leaves a service running: Debian starts a daemon on install unless /usr/sbin/policy-rc.d
# forbids it, so for the duration of the install one that forbids everything is put in place (and
# whatever was there before is put back afterwards).
set -eu

PACKAGES="dcmtk orthanc nginx"

missing=""
for pkg in $PACKAGES; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    case "$status" in
        "install ok installed") ;;
        *) missing="$missing $pkg" ;;
    esac
done

if [ -z "$missing" ]; then
    echo "peers: already installed:$(printf ' %s' $PACKAGES)"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "peers: missing:$missing; run this script as root (it installs them with apt-get)" >&2
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
printf '#!/bin/sh\n# pacslb tests/peers/install.sh: no service starts while peers are installed\nexit 101\n' >"$policy"
chmod 755 "$policy"

export DEBIAN_FRONTEND=noninteractive
echo "peers: installing:$missing"
apt-get update -q
# shellcheck disable=SC2086  # word splitting of the package list is intended
apt-get install -y -q --no-install-recommends $missing

# Belt and braces for a machine that runs systemd: policy-rc.d covers invoke-rc.d, but make sure the
# packaged Orthanc neither runs nor starts at boot (it would hold port 4242/8042 and a storage folder).
case "$missing" in
    *orthanc*)
        if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
            systemctl disable --now orthanc.service >/dev/null 2>&1 || true
        fi
        ;;
esac

for tool in /usr/bin/echoscu /usr/bin/storescu /usr/bin/findscu /usr/sbin/Orthanc \
    /usr/share/orthanc/plugins/libModalityWorklists.so; do
    if [ ! -e "$tool" ]; then
        echo "peers: $tool is still missing after the install" >&2
        exit 1
    fi
done
echo "peers: ready"
