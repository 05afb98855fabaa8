#!/bin/sh
# Installs what the tests of a clustered pair drive (tests/integration/test_cluster_*.py, tests/ha):
#   keepalived    `keepalived --config-test` judges what `pacslb keepalived` writes; the failover tests run it
#                 in network namespaces, never on the host's own network
#   redis-server  the store two balancers share (cluster.store: redis://...)
# The tests start every daemon themselves and stop it after; none runs as a service.
set -eu
exec sh "$(dirname "$0")/../../tools/apt-install.sh" ha keepalived redis-server \
    --disable keepalived.service redis-server.service \
    --require /usr/sbin/keepalived /usr/bin/redis-server
