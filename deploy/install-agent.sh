#!/usr/bin/env bash
# Install the fedprune edge agent as a systemd service on Raspberry Pi OS 64-bit (bookworm) or
# Ubuntu on NVIDIA Jetson (JetPack 5/6). Run as root on the device; --dry-run prints every step
# without changing anything (no root needed). Re-running upgrades in place.
#
#   deploy/install-agent.sh --bundle device.json --config agent.toml [options]
#
# Steps: service user "fedprune" -> /opt/fedprune/venv -> torch (first, so pip never resolves a
# CUDA build) -> fedprune -> /etc/fedprune/{bundle.json (0600, owned by fedprune), agent.toml} ->
# unit (+ Jetson drop-in, + data drop-in) -> systemctl enable --now.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: install-agent.sh --bundle FILE --config FILE [options]

required:
  --bundle FILE        enrollment bundle from `fedprune-coordinator enroll` (holds this device's keys)
  --config FILE        agent configuration (TOML), installed as /etc/fedprune/agent.toml

options:
  --data-dir DIR       local training data; the service gets read-only access to it
  --torch-spec SPEC    what pip installs for torch: a requirement ("torch==2.13.0"), a wheel path or
                       URL. Required on Jetson: NVIDIA's wheel for your JetPack (see
                       firmware_notes/jetson.md). Default: torch==2.13.0, CPU wheel (aarch64: 2.10.0)
  --package SPEC       what pip installs for fedprune (default: the source tree this script is in)
  --requirement SPEC   also install this (repeatable): the package of your model's factory or data
                       factory, e.g. "mypkg==1.2.0", a wheel path or a directory; the same version
                       as on the coordinator (a different layout is declined as layout_mismatch)
  --platform NAME      auto (default), pi, jetson or generic
  --python PATH        interpreter for the venv (default: python3; JetPack 5 needs >= 3.10, see notes)
  --no-start           enable the unit but do not start it
  --force              replace an existing, different /etc/fedprune/bundle.json (re-enrollment)
  --dry-run            print what would be done; change nothing
  -h, --help           this text
EOF
}

die() { echo "install-agent: $*" >&2; exit 2; }

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source_tree=$(dirname "$script_dir")

bundle="" config="" data_dir="" torch_spec="" package="$source_tree" platform="auto" requirements=()
python="python3" start=1 force=0 dry_run=0
torch_version="2.13.0"
# From 2.11 on PyPI's aarch64 torch is a CUDA build that pulls 2-3 GB of NVIDIA libraries a Pi
# cannot use; 2.10.0 is the newest CPU-only aarch64 wheel (checked by scripts/arm64.sh).
torch_version_aarch64="2.10.0"
torch_cpu_index="https://download.pytorch.org/whl/cpu"

while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) bundle="${2:?--bundle needs a file}"; shift 2 ;;
    --config) config="${2:?--config needs a file}"; shift 2 ;;
    --data-dir) data_dir="${2:?--data-dir needs a directory}"; shift 2 ;;
    --torch-spec) torch_spec="${2:?--torch-spec needs a value}"; shift 2 ;;
    --package) package="${2:?--package needs a value}"; shift 2 ;;
    --requirement) requirements+=("${2:?--requirement needs a value}"); shift 2 ;;
    --platform) platform="${2:?--platform needs a value}"; shift 2 ;;
    --python) python="${2:?--python needs a path}"; shift 2 ;;
    --no-start) start=0; shift ;;
    --force) force=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

user=fedprune
prefix=/opt/fedprune
venv=$prefix/venv
etc=/etc/fedprune
unit_dir=/etc/systemd/system
dropin_dir=$unit_dir/fedprune-agent.service.d

# Every change to the host goes through run: printed always, executed unless --dry-run.
run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [ "$dry_run" -eq 0 ]; then "$@"; fi
}

# Write stdin to a root-owned 0644 file (systemd units and drop-ins).
write_file() {
  local target=$1 content
  content=$(cat)
  printf '+ write %q:\n%s\n' "$target" "$content" | sed 's/^/  /; 1s/^  //'
  if [ "$dry_run" -eq 0 ]; then
    printf '%s\n' "$content" > "$target.tmp"
    chmod 0644 "$target.tmp"
    mv "$target.tmp" "$target"
  fi
}

# --- check the inputs before touching anything --------------------------------------------------
[ -n "$bundle" ] || { usage >&2; die "--bundle is required"; }
[ -n "$config" ] || { usage >&2; die "--config is required"; }
if [ ! -f "$bundle" ] || [ ! -r "$bundle" ]; then die "bundle $bundle: not a readable file"; fi
grep -q '"fedprune-bundle/1"' "$bundle" || die "bundle $bundle: not a fedprune enrollment bundle (format fedprune-bundle/1)"
if [ ! -f "$config" ] || [ ! -r "$config" ]; then die "config $config: not a readable file"; fi
if [ -n "$data_dir" ]; then
  [ -d "$data_dir" ] || die "data dir $data_dir: not a directory"
  data_dir=$(cd "$data_dir" && pwd -P)
  case "$data_dir" in
    /tmp|/tmp/*|/var/tmp|/var/tmp/*) die "data dir $data_dir: the service has a private /tmp (PrivateTmp=yes); use e.g. /srv/fedprune-data" ;;
  esac
fi
command -v "$python" >/dev/null 2>&1 || die "python $python: not found (apt-get install python3 python3-venv)"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || die "$python is $("$python" -V 2>&1); fedprune needs Python >= 3.10"
"$python" -c 'import venv, ensurepip' 2>/dev/null || die "$python cannot create a venv: apt-get install python3-venv"

if [ "$platform" = auto ]; then
  if [ -e /etc/nv_tegra_release ] || grep -qs 'nvidia,tegra' /proc/device-tree/compatible; then
    platform=jetson
  elif grep -qs 'Raspberry Pi' /proc/device-tree/model; then
    platform=pi
  else
    platform=generic
  fi
fi
case "$platform" in pi|jetson|generic) ;; *) die "--platform $platform: expected auto, pi, jetson or generic" ;; esac

arch=$(uname -m)
torch_args=()
if [ -z "$torch_spec" ]; then
  [ "$platform" != jetson ] || die "on Jetson pass --torch-spec with NVIDIA's torch wheel for your JetPack \
(a file path or URL; see firmware_notes/jetson.md): PyPI's aarch64 wheels have no CUDA support for Jetson"
  torch_spec="torch==$torch_version"
  # On x86_64 PyPI would resolve a multi-GB CUDA build: the CPU index instead.
  if [ "$arch" = x86_64 ]; then torch_args=(--index-url "$torch_cpu_index"); fi
  if [ "$arch" = aarch64 ]; then torch_spec="torch==$torch_version_aarch64"; fi
fi

if [ "$dry_run" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
  die "run as root (or pass --dry-run to see the steps)"
fi
if [ -f "$etc/bundle.json" ] && ! cmp -s "$bundle" "$etc/bundle.json" && [ "$force" -eq 0 ]; then
  die "$etc/bundle.json exists and differs from $bundle: pass --force to replace this device's identity"
fi

echo "install-agent: platform=$platform arch=$arch python=$("$python" -V 2>&1) torch=$torch_spec dry_run=$dry_run"

# --- service user: static, no login, no home (see the unit for why not DynamicUser) -------------
if ! id -u "$user" >/dev/null 2>&1; then
  run useradd --system --user-group --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin "$user"
fi

# --- virtualenv: torch first and pinned, then fedprune ------------------------------------------
run install -d -m 0755 -o root -g root "$prefix"
if [ ! -x "$venv/bin/python" ]; then
  run "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check --no-input)
run "${pip[@]}" ${torch_args[@]+"${torch_args[@]}"} "$torch_spec"
if [ "$dry_run" -eq 0 ]; then
  installed_torch=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))')
else
  installed_torch="<installed version>"
fi
# Naming the installed torch pins it: pip must not replace NVIDIA's or the CPU build.
run "${pip[@]}" "$package" ${requirements[@]+"${requirements[@]}"} "torch==$installed_torch"
run install -d -m 0755 "$prefix/share/deploy"
run install -m 0644 "$script_dir/README.md" "$prefix/share/deploy/README.md"

# --- identity and configuration: readable by the service user only ----------------------------
run install -d -m 0755 -o root -g root "$etc"
run install -m 0600 -o "$user" -g "$user" "$bundle" "$etc/bundle.json"
run install -m 0640 -o root -g "$user" "$config" "$etc/agent.toml"

# --- the unit and its drop-ins ------------------------------------------------------------------
run install -m 0644 -o root -g root "$script_dir/systemd/fedprune-agent.service" "$unit_dir/fedprune-agent.service"
run install -d -m 0755 "$dropin_dir"
if [ "$platform" = jetson ]; then
  run install -m 0644 "$script_dir/systemd/jetson-cuda.conf" "$dropin_dir/jetson-cuda.conf"
fi
if [ -n "$data_dir" ]; then
  # ProtectHome=yes hides /home, /root and /run/user entirely; data there needs read-only instead.
  protect_home="ProtectHome=yes"
  case "$data_dir" in /home/*|/root/*|/run/user/*) protect_home="ProtectHome=read-only" ;; esac
  write_file "$dropin_dir/data.conf" <<EOF
# Written by install-agent.sh: the agent reads its local training data here, never writes it.
[Service]
$protect_home
ReadOnlyPaths=$data_dir
EOF
  if [ "$dry_run" -eq 0 ] && ! runuser -u "$user" -- test -r "$data_dir"; then
    echo "install-agent: warning: user $user cannot read $data_dir; grant it (e.g. chgrp -R $user, chmod -R g+rX)" >&2
  fi
fi

run systemctl daemon-reload
if [ "$start" -eq 1 ]; then
  run systemctl enable --now fedprune-agent.service
else
  run systemctl enable fedprune-agent.service
fi

cat <<EOF
install-agent: done. Check that $etc/agent.toml names the bundle $etc/bundle.json and the
state directory /var/lib/fedprune-agent, then follow the agent with: journalctl -u fedprune-agent -f
EOF
