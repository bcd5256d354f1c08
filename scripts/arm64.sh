#!/usr/bin/env bash
# An emulated Raspberry Pi user space for `make test-arm64`: an arm64 Debian bookworm root file
# system (what Raspberry Pi OS 64-bit is built on; Python 3.11) run with qemu-aarch64-static, and
# the agent installed into it from aarch64 wheels the way deploy/install-agent.sh installs it on a
# Pi. No binfmt handler is registered (the kernel is shared): programs run as
# `qemu-aarch64-static -L <rootfs> ...`, through the launcher <dir>/bin/python3, which qemu also
# names as sys.executable so that the agent's child processes start emulated too.
#
# Usage: scripts/arm64.sh [DIR]   (default .cache/arm64; every step is cached, a re-run is seconds)
# Writes DIR/report.json (each step's seconds, installed sizes) and DIR/ready when done.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
dir=$(realpath -m "${1:-.cache/arm64}")
rootfs=$dir/rootfs
site=$dir/site          # the agent and its dependencies, aarch64 (what a Pi's venv holds)
test_site=$dir/test-site  # pytest and hypothesis, to run the unit tests under emulation
wheels=$dir/wheels
stamps=$dir/stamps
mirror=${FEDPRUNE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
qemu=/usr/bin/qemu-aarch64-static
python=$repo/.venv/bin/python
mkdir -p "$stamps" "$wheels"
: > "$dir/times.tsv.new"
[ -f "$dir/times.tsv" ] && cat "$dir/times.tsv" >> "$dir/times.tsv.new"
mv "$dir/times.tsv.new" "$dir/times.tsv"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

step() {  # step NAME FUNCTION: runs once, records its wall time
  local name=$1 started
  if [ -e "$stamps/$name" ]; then echo "arm64: $name (cached)"; return 0; fi
  echo "arm64: $name"
  started=$(date +%s.%N)
  "$2"
  printf '%s\t%.1f\n' "$name" "$(echo "$(date +%s.%N) - $started" | bc)" >> "$dir/times.tsv"
  touch "$stamps/$name"
}

host_packages() {
  local missing=()
  [ -x "$qemu" ] || missing+=(qemu-user-static)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v bc >/dev/null || missing+=(bc)
  if [ "${#missing[@]}" -gt 0 ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -qq
    # --no-install-recommends keeps binfmt-support (which would register handlers) out.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
      --no-install-recommends "${missing[@]}" >/dev/null
  fi
}
command -v bc >/dev/null || host_packages
step host_packages host_packages

first_stage() {  # downloads the packages and unpacks the essential ones: needs no emulation
  rm -rf "$rootfs"
  as_root debootstrap --foreign --arch=arm64 --variant=minbase --include=python3,ca-certificates \
    bookworm "$rootfs" "$mirror" > "$dir/debootstrap.log" 2>&1
}
step first_stage first_stage

unpack() {
  # The second stage would run the packages' maintainer scripts as arm64 children, which need
  # binfmt. Unpacking with the host's dpkg-deb and doing their few relevant jobs by hand needs none.
  local deb
  for deb in "$rootfs"/var/cache/apt/archives/*.deb; do
    dpkg-deb --fsys-tarfile "$deb" | as_root tar -C "$rootfs" -xf - --keep-directory-symlink
  done
  # The host's CA bundle: it is the one that knows this machine's TLS setup.
  as_root cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  as_root cp /etc/hosts "$rootfs/etc/hosts"
  # qemu -L looks every absolute path up under the rootfs first, then on the host. qemu 7.2 shows
  # the host's x86 /proc/cpuinfo, on which torch's CPU detection crashes: shadow it with a
  # Neoverse-N1's (QEMU_CPU below), and give oneDNN the MIDR_EL1 registers it reads from sysfs.
  as_root rm -f "$rootfs/proc"
  as_root mkdir -p "$rootfs/proc"
  local cpu
  for cpu in $(seq 0 $(($(nproc) - 1))); do
    printf 'processor\t: %d\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n' "$cpu"
    as_root mkdir -p "$rootfs/sys/devices/system/cpu/cpu$cpu/regs/identification"
    echo 0x00000000413fd0c1 | as_root tee "$rootfs/sys/devices/system/cpu/cpu$cpu/regs/identification/midr_el1" >/dev/null
  done | as_root tee "$rootfs/proc/cpuinfo" >/dev/null
}
step unpack unpack

launcher() {
  mkdir -p "$dir/bin"
  cat > "$dir/bin/python3" <<EOF
#!/bin/sh
# Python 3.11 of the arm64 rootfs, under qemu. -0 makes this script sys.executable, so a child
# started with sys.executable (the agent's training and model-check children) is emulated too.
export QEMU_CPU=\${QEMU_CPU:-neoverse-n1}
export PYTHONPATH=$site\${FEDPRUNE_ARM64_TEST:+:$test_site}\${PYTHONPATH:+:\$PYTHONPATH}
exec $qemu -0 "\$0" -L "$rootfs" "$rootfs/usr/bin/python3.11" "\$@"
EOF
  chmod +x "$dir/bin/python3"
  "$dir/bin/python3" -c 'import platform, sys; assert platform.machine() == "aarch64", platform.machine(); print(platform.machine(), sys.version.split()[0])'
}
step launcher launcher

# What a Pi's pip resolves: aarch64 manylinux wheels for CPython 3.11. pip does not widen
# --platform to older manylinux tags by itself, so every tag is listed.
pip_platform=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311)
for minor in 28 27 26 25 24 23 22 21 20 19 18 17; do pip_platform+=(--platform "manylinux_2_${minor}_aarch64"); done
pip_platform+=(--platform manylinux2014_aarch64)
# The installer's torch for a Pi (deploy/install-agent.sh: from 2.11 on, PyPI's aarch64 torch is a
# CUDA build that pulls 2-3 GB of NVIDIA libraries; 2.10.0 is its newest CPU-only aarch64 wheel).
torch_spec=$(sed -n 's/^torch_version_aarch64="\(.*\)"$/torch==\1/p' deploy/install-agent.sh)
[ -n "$torch_spec" ] || { echo "arm64: deploy/install-agent.sh names no torch_version_aarch64" >&2; exit 1; }

agent_dependencies() {
  # pip evaluates environment markers for the host (x86_64), whatever --platform says, so it
  # would add torch's x86_64-only NVIDIA requirements: torch goes in without them, and the
  # agent's other requirements (pyproject's dependencies, no extras) and torch's own after it.
  rm -rf "$site"
  "$python" -m pip install -q --target "$site" "${pip_platform[@]}" --no-deps "$torch_spec" \
    2>&1 | grep -v "is ignored" || true
  "$python" -m pip install -q --target "$site" "${pip_platform[@]}" "${requirements[@]}" 2>&1 | grep -v "is ignored" || true
}
mapfile -t requirements < <("$python" -c 'import tomllib; print("\n".join(r for r in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"] if not r.startswith(("torch", "tomli"))))')
requirements+=(filelock "typing-extensions>=4.10.0" "sympy>=1.13.3" "networkx>=2.5.1" jinja2 "fsspec>=0.8.5")
# Named by what it installs: a changed dependency list installs them again.
step "agent-dependencies-$(printf '%s\n' "$torch_spec" "${requirements[@]}" | sha256sum | cut -c1-12)" agent_dependencies

# fedprune itself, every run (seconds): the cached root must test this tree, not an older one.
rm -rf "$dir/dist"
"$python" -m pip wheel -q --no-deps -w "$dir/dist" "$repo" 2>&1 | grep -v "is ignored" || true
rm -rf "$site"/fedprune "$site"/fedprune-*.dist-info
"$python" -m pip install -q --target "$site" "${pip_platform[@]}" --no-deps "$dir"/dist/fedprune-*.whl 2>&1 \
  | grep -v "is ignored" || true
"$dir/bin/python3" -c 'import fedprune.edge_agent.daemon, torch, onnxruntime; print("arm64: agent imports, torch", torch.__version__)'

test_tools() {
  rm -rf "$test_site"
  "$python" -m pip install -q --target "$test_site" "${pip_platform[@]}" pytest hypothesis pytest-timeout scikit-learn mnist1d \
    2>&1 | grep -v "is ignored" || true
}
step test_tools test_tools

"$python" - "$dir" <<'EOF'
import json, subprocess, sys
from pathlib import Path
root = Path(sys.argv[1])
size = lambda p: int(subprocess.run(["du", "-sb", str(p)], capture_output=True, text=True).stdout.split()[0])
steps = {}
for line in (root / "times.tsv").read_text().splitlines():
    name, seconds = line.split("\t")
    steps[name] = float(seconds)
report = {"steps_s": steps, "rootfs_bytes": size(root / "rootfs"), "agent_install_bytes": size(root / "site"),
          "largest_packages": sorted(((p.name, size(p)) for p in (root / "site").iterdir() if p.is_dir()),
                                     key=lambda x: -x[1])[:6]}
(root / "report.json").write_text(json.dumps(report, indent=1) + "\n")
print(f"arm64: rootfs {report['rootfs_bytes'] / 1e6:.0f} MB, agent installed {report['agent_install_bytes'] / 1e6:.0f} MB; "
      f"{root / 'report.json'}")
EOF
touch "$dir/ready"
