#!/usr/bin/env bash
# Install seqstream as a systemd service (run as root from a checkout of the repository).
#
#   scripts/install-service.sh --model har.onnx          # venv, unit, config, start
#
# What it creates (nothing that exists is overwritten, except the unit and the venv's package):
#   PREFIX/venv/                     a virtual environment with seqstream (runtime only: no torch)
#   PREFIX/share/deploy/             the deploy/ examples (Prometheus, Grafana, mosquitto, README)
#   /etc/seqstream/seqstream.toml    from deploy/seqstream.toml: model.onnx next to it,
#                                    checkpoints in /var/lib/seqstream/state.ckpt
#   /etc/seqstream/model.onnx        from --model
#   /etc/seqstream/mqtt-password     from --mqtt-password-file, handed to the service as a
#                                    credential (drop-in seqstream.service.d/credentials.conf)
#   /etc/systemd/system/seqstream.service   systemd/seqstream.service with PREFIX filled in
# The user: none to create. The unit says DynamicUser=yes, so systemd allocates an
# unprivileged user for each run; /var/lib/seqstream (StateDirectory=) is made and owned
# for it by systemd.
#
# Options:
#   --prefix DIR              where the venv and examples go (default /opt/seqstream)
#   --venv DIR                use this existing environment (must have bin/seqstream)
#                             instead of creating PREFIX/venv
#   --extras LIST             pip extras for the venv, e.g. "audio" (default: none)
#   --model FILE              the ONNX step model to serve
#   --mqtt-password-file FILE the broker password (first line)
#   --root DIR                write everything under DIR (staging, tests); implies --no-start
#   --no-start                do not run systemctl (daemon-reload, enable --now)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

prefix=/opt/seqstream
venv=""
extras=""
model=""
password=""
root=""
start=1
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix=$2; shift 2 ;;
    --venv) venv=$2; shift 2 ;;
    --extras) extras=$2; shift 2 ;;
    --model) model=$2; shift 2 ;;
    --mqtt-password-file) password=$2; shift 2 ;;
    --root) root=$2; start=0; shift 2 ;;
    --no-start) start=0; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "install-service: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$prefix" in /*) ;; *) echo "install-service: --prefix must be absolute" >&2; exit 2 ;; esac
if [ -z "$root" ] && [ "$(id -u)" -ne 0 ]; then
  echo "install-service: run as root (or stage with --root DIR)" >&2
  exit 2
fi
if [ "$start" -eq 1 ] && [ ! -d /run/systemd/system ]; then
  echo "install-service: systemd is not running here; use --no-start (or --root DIR)" >&2
  exit 2
fi

etc="$root/etc/seqstream"
unit_dir="$root/etc/systemd/system"

# 1. the virtual environment (runtime dependencies only: numpy, onnxruntime, paho, prometheus)
if [ -z "$venv" ]; then
  venv=$prefix/venv
  python3 -m venv "$root$venv"
  "$root$venv/bin/python" -m pip install -q --upgrade pip
  spec="$repo"
  [ -z "$extras" ] || spec="$repo[$extras]"
  "$root$venv/bin/python" -m pip install -q "$spec"
  "$root$venv/bin/python" -m compileall -q "$root$venv" >/dev/null || true  # read-only at run time
fi
case "$venv" in /*) ;; *) venv="$(cd "$venv" && pwd)" ;; esac
if [ ! -x "$root$venv/bin/seqstream" ] && [ ! -x "$venv/bin/seqstream" ]; then
  echo "install-service: $venv/bin/seqstream not found" >&2
  exit 2
fi

# 2. the examples, next to the venv
install -d "$root$prefix/share"
rm -rf "$root$prefix/share/deploy"
cp -r "$repo/deploy" "$root$prefix/share/deploy"

# 3. config and model in /etc/seqstream (kept if present: it is the operator's now)
install -d -m 0755 "$etc"
if [ ! -e "$etc/seqstream.toml" ]; then
  sed -e 's|^# path = "/var/lib/seqstream/state.ckpt".*|path = "/var/lib/seqstream/state.ckpt"|' \
    "$repo/deploy/seqstream.toml" > "$etc/seqstream.toml"
  chmod 0644 "$etc/seqstream.toml"
fi
if [ -n "$model" ]; then
  install -m 0644 "$model" "$etc/model.onnx.new"
  mv "$etc/model.onnx.new" "$etc/model.onnx"  # atomic: a reload never sees half a file
fi
if [ -n "$password" ]; then
  install -m 0600 "$password" "$etc/mqtt-password"
  install -d "$unit_dir/seqstream.service.d"
  cat > "$unit_dir/seqstream.service.d/credentials.conf" <<'EOF'
# The broker password, readable by the service's dynamic user only. In seqstream.toml:
#   password_file = "/run/credentials/seqstream.service/mqtt-password"
[Service]
LoadCredential=mqtt-password:/etc/seqstream/mqtt-password
EOF
fi

# 4. the unit, with this installation's paths
install -d "$unit_dir"
sed -e "s|/opt/seqstream/venv|$venv|g" -e "s|/opt/seqstream|$prefix|g" \
  "$repo/systemd/seqstream.service" > "$unit_dir/seqstream.service"
chmod 0644 "$unit_dir/seqstream.service"

echo "install-service: unit $unit_dir/seqstream.service, config $etc/seqstream.toml"
[ -e "$etc/model.onnx" ] || echo "install-service: put the model at $etc/model.onnx (or --model FILE)"
if [ "$start" -eq 1 ]; then
  systemctl daemon-reload
  if [ -e "$etc/model.onnx" ]; then
    systemctl enable --now seqstream.service
    systemctl --no-pager status seqstream.service || true
  else
    systemctl enable seqstream.service
  fi
fi
