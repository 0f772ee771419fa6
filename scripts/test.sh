#!/usr/bin/env bash
# Install what the tests need and run the whole suite. This is the README's test command;
# .ci/run calls exactly this. Safe to run again: installs are idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

# System parts the integration tests use for real: OpenSSH sshd/ssh for the
# network-namespace hosts, iproute2 for the namespaces themselves, Chromium to
# render `orch report` pages headless.
if [ "$(uname -s)" = Linux ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  need=()
  [ -x /usr/sbin/sshd ] || need+=(openssh-server)
  command -v ssh >/dev/null || need+=(openssh-client)
  command -v ip >/dev/null || need+=(iproute2)
  command -v taskset >/dev/null || need+=(util-linux)
  command -v lsof >/dev/null || need+=(lsof)
  command -v tc >/dev/null || need+=(iproute2)
  command -v chromium >/dev/null || need+=(chromium)
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi

python3 -m pip install -q --disable-pip-version-check -e ".[test]"
exec python3 -m pytest -q "$@"
