#!/usr/bin/env bash
# One-step setup on Debian 12: apt packages, `pip install .`, then the guest kernel, agent and initramfs.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  linux-source-6.1 flex bison libelf-dev libssl-dev bc gcc make libc6-dev patch xz-utils  # guest kernel
  liburing-dev libseccomp-dev busybox-static qemu-system-x86                                            # VMM, guest root, baseline
  mmdebstrap e2fsprogs                                                                    # Debian guest image
  passt                                                                                   # guest network backend
  python3 python3-dev python3-pip                                                        # the package
  clang                                                                                  # libFuzzer harnesses (tests/fuzz)
  chromium ffmpeg                                          # browser tests: a host browser for the live view, ffprobe
)

sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: apt-get install ${missing[*]}"
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get update -q
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The nested profile (hosts whose KVM emulates guest ring 0) needs QEMU >= 8.2: bookworm has 7.2,
# bookworm-backports a current one. The backports source reuses the mirror apt already uses.
qemu_ok() { qemu-system-x86_64 --version 2>/dev/null | awk '/version/ {split($4, v, "."); exit !(v[1] > 8 || (v[1] == 8 && v[2] >= 2))}'; }
if ! qemu_ok && grep -qs '^VERSION_CODENAME=bookworm' /etc/os-release; then
  mirror=$( { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}';
              grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}'; } |
            grep -v -e security -e '^$' | grep -m1 debian || true)
  if [ -n "$mirror" ]; then
    echo "setup: QEMU from bookworm-backports ($mirror) for the nested profile"
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$mirror" | sudo_ tee /etc/apt/sources.list.d/smolvm-backports.sources >/dev/null
    sudo_ env DEBIAN_FRONTEND=noninteractive apt-get update -q
    sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86 ||
      echo "setup: no QEMU from backports; the nested profile is unavailable (compat is used)"
  else
    echo "setup: no Debian mirror found in the apt sources; the nested profile needs QEMU >= 8.2"
  fi
fi

# Debian's own python3 refuses pip installs outside a venv (PEP 668) unless told otherwise.
pip_flags=()
if python3 -c 'import os, sys, sysconfig
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
sys.exit(0 if managed and sys.prefix == sys.base_prefix else 1)'; then
  pip_flags+=(--break-system-packages)
fi
echo "setup: pip install .[test] (builds the _smolvm extension and smolvm-vmm)"
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "${pip_flags[@]}" ".[test]"

# `python3 -m smolvm` run from this checkout imports ./smolvm: give it the compiled parts just installed.
installed=$(cd / && python3 -c 'import pathlib, smolvm; print(pathlib.Path(smolvm.__file__).resolve().parent)')
if [ "$installed" != "$PWD/smolvm" ]; then
  cp -f "$installed"/_smolvm*.so "$installed"/smolvm-vmm "$installed"/smolvm-hostd "$installed"/smolvm-vmm-relay smolvm/
fi

# Run from / so that `-m smolvm` imports the installed package.
(cd / && python3 -m smolvm build)
(cd / && python3 -m smolvm doctor) || echo "setup: smolvm doctor reports problems (above); VMs will not start until they are fixed"
