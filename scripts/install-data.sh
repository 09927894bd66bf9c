#!/usr/bin/env bash
# Install the real datasets that ship as Debian packages (Fashion-MNIST, Tux Paint stamps).
# Needs root for apt-get; without it, prints the command to run and carries on: the datasets
# that are missing are then skipped by the tests and refused by the jobs with the same hint.
set -euo pipefail

packages=()
[ -d /usr/share/datasets/fashion-mnist ] || packages+=(dataset-fashion-mnist)
[ -d /usr/share/tuxpaint/stamps ] || packages+=(tuxpaint-stamps-default)
[ ${#packages[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "vitray: datasets missing (${packages[*]}); as root run:" >&2
    echo "    apt-get install -y --no-install-recommends ${packages[*]}" >&2
    exit 0
fi
echo "vitray: installing dataset packages: ${packages[*]}"
install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${packages[@]}"; }
if ! install >/tmp/vitray-apt.log 2>&1; then
    apt-get update -q >>/tmp/vitray-apt.log 2>&1 || true
    install >>/tmp/vitray-apt.log 2>&1 || {
        echo "vitray: apt-get could not install ${packages[*]} (see /tmp/vitray-apt.log);" \
             "the datasets they hold will be unavailable" >&2
    }
fi
