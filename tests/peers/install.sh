#!/bin/sh
# Installs the real peers that the integration tests drive (tests/integration, marker "peers"):
#   dcmtk    echoscu, storescu, findscu, storescp: the DICOM clients a modality or a workstation would be
#   orthanc  the PACS nodes behind pacslb (DICOM + REST), with its worklist plugin
#            (/usr/share/orthanc/plugins/libModalityWorklists.so ships in the orthanc package itself)
#   nginx    the web nodes behind mode http
# The tests start every peer themselves, on free loopback ports, and stop it after; none runs as a service.
set -eu
exec sh "$(dirname "$0")/../../tools/apt-install.sh" peers dcmtk orthanc nginx \
    --disable orthanc.service nginx.service \
    --require /usr/bin/echoscu /usr/bin/storescu /usr/bin/findscu /usr/sbin/Orthanc \
    /usr/share/orthanc/plugins/libModalityWorklists.so /usr/sbin/nginx
