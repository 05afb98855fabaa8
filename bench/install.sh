#!/bin/sh
# Installs what the benchmark (bench/run.py) drives, from Debian:
#   haproxy  the side-by-side anchor (2.6 on Debian 12)
#   iperf3   bulk TCP throughput (case a)
#   wrk      HTTP keep-alive load (case d)
#   nginx    the HTTP nodes (cases c, d, e)
#   dcmtk    storescu, storescp, echoscu (cases b, c)
#   keepalived, redis-server  the clustered pairs (case f, bench/ha.py: keepalived only in network namespaces)
# The bench starts each of them itself on loopback ports and stops it by PID; none may run as a service.
set -eu
exec sh "$(dirname "$0")/../tools/apt-install.sh" bench haproxy iperf3 wrk nginx dcmtk keepalived redis-server \
    --disable haproxy.service nginx.service keepalived.service redis-server.service \
    --require /usr/sbin/haproxy /usr/bin/iperf3 /usr/bin/wrk /usr/sbin/nginx /usr/bin/storescu /usr/bin/storescp \
    /usr/bin/echoscu /usr/sbin/keepalived /usr/bin/redis-server
