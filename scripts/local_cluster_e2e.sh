#!/usr/bin/env bash
# `ray up` -> `ray job submit` (a short training run) -> `ray down`, end to end on THIS machine, with
# Ray's local (on-premise) node provider reaching 127.0.0.1 over SSH. Not a CI test (it needs root,
# an SSH server on port 22 and stops every Ray process on the machine: the launcher runs `ray stop`).
#
#   sudo bash scripts/local_cluster_e2e.sh        (from the repository root, after `make install`)
#
# The cluster config is derived from cluster.yaml (so the setup and start commands under test are
# the real ones) with these differences only, printed before use:
#   provider  local, head_ip 127.0.0.1, no workers      (the point of the exercise)
#   auth      ssh_user root + a throwaway key            (cluster.yaml: the launcher's AWS key pair)
#   node types dropped                                   (the local provider brings its own)
#   torch     `pip install torch==2.13.0` without the CPU index URL  (no internet here but PyPI)
# Prints the time of each step; leaves the derived YAML and the logs in $WORK. The launcher installs
# into ~/raypipe and ~/raypipe-venv of root (left in place, so a second run's setup is quicker).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
RAY="$(dirname "$PY")/ray"
WORK="${WORK:-$(mktemp -d /tmp/raypipe-local-cluster.XXXX)}"
mkdir -p "$WORK"
SSHD_PORT=22

exec 3>&2  # step timings reach the console even when a step's output goes to a log file
log() { echo "local_cluster_e2e: $*" >&3; }
step() { local name=$1; shift; local t0=$SECONDS; "$@"; log "$name took $((SECONDS - t0)) s"; }

command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || { log "needs openssh-server (apt-get install -y openssh-server rsync)"; exit 1; }
command -v rsync >/dev/null || { log "needs rsync (apt-get install -y rsync)"; exit 1; }

# A throwaway key, authorized for root, and an sshd on 127.0.0.1 only.
ssh-keygen -q -t ed25519 -N "" -f "$WORK/key"
mkdir -p /root/.ssh && chmod 700 /root/.ssh
cat "$WORK/key.pub" >> /root/.ssh/authorized_keys && chmod 600 /root/.ssh/authorized_keys
ssh-keygen -A >/dev/null
mkdir -p /run/sshd
cat > "$WORK/sshd_config" <<EOF
ListenAddress 127.0.0.1
Port $SSHD_PORT
PermitRootLogin prohibit-password
PasswordAuthentication no
PidFile $WORK/sshd.pid
EOF
/usr/sbin/sshd -f "$WORK/sshd_config"
cleanup() {
  kill "$(cat "$WORK/sshd.pid" 2>/dev/null)" 2>/dev/null || true
  sed -i "\#$(cut -d' ' -f2 "$WORK/key.pub")#d" /root/.ssh/authorized_keys || true
}
trap cleanup EXIT

"$PY" - "$WORK" <<'EOF'
import sys, yaml
work = sys.argv[1]
cfg = yaml.safe_load(open("cluster.yaml"))
cfg["cluster_name"] = "raypipe-local"
cfg["provider"] = {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
cfg["auth"] = {"ssh_user": "root", "ssh_private_key": f"{work}/key"}
for key in ("available_node_types", "head_node_type", "max_workers", "head_setup_commands"):
    cfg.pop(key, None)
cfg["setup_commands"] = [c.replace(" --index-url https://download.pytorch.org/whl/cpu", "") for c in cfg["setup_commands"]]
# No apt-get here (Debian's python3-venv may be missing; this machine's python3 has venv).
cfg["setup_commands"] = [c for c in cfg["setup_commands"] if "apt-get" not in c]
yaml.safe_dump(cfg, open(f"{work}/cluster-local.yaml", "w"), sort_keys=False)
EOF
log "derived config: $WORK/cluster-local.yaml"
"$PY" - "$WORK/cluster-local.yaml" <<'EOF' >&3
import sys, yaml
real, local = yaml.safe_load(open("cluster.yaml")), yaml.safe_load(open(sys.argv[1]))
for key in sorted(set(real) | set(local)):
    if real.get(key) != local.get(key):
        print(f"  differs from cluster.yaml: {key}")
EOF

[ -f ~/.ray/auth_token ] || RAY_AUTH_MODE=token "$RAY" get-auth-token --generate >/dev/null
step "ray up" "$RAY" up -y "$WORK/cluster-local.yaml" --no-config-cache > "$WORK/ray_up.log" 2>&1 \
  || { tail -40 "$WORK/ray_up.log"; exit 1; }

export RAY_AUTH_MODE=token
"$PY" -m raypipe.datasets.sample "$WORK/sample" --num-pairs 240 --shard-size 120 --image-size 64x64 > /dev/null
step "ray job submit (train, 1 epoch)" "$RAY" job submit --address http://127.0.0.1:8265 --working-dir . -- \
  python jobs/train.py "data.input=$WORK/sample/webdataset" "run.storage_path=$WORK/runs" run.name=local-cluster \
  optim.epochs=1 model.conv_channels=[8] model.embed_dim=8 model.lstm_hidden=8 > "$WORK/submit.log" 2>&1 \
  || { tail -40 "$WORK/submit.log"; step "ray down" "$RAY" down -y "$WORK/cluster-local.yaml" > "$WORK/ray_down.log" 2>&1; exit 1; }
grep -E "epoch 1/1|succeeded" "$WORK/submit.log" | head -3
step "ray down" "$RAY" down -y "$WORK/cluster-local.yaml" > "$WORK/ray_down.log" 2>&1
log "done; logs in $WORK"
