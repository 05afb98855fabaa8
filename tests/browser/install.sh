#!/bin/sh
# Installs what the browser tests (tests/browser) drive: Debian's Chromium, and a font for its pages.
# Playwright's Python package comes with the test extra (pip); it never downloads a browser of its own:
# the tests launch /usr/bin/chromium.
set -eu
exec sh "$(dirname "$0")/../../tools/apt-install.sh" browser chromium fonts-dejavu-core --require /usr/bin/chromium
