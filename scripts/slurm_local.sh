#!/usr/bin/env bash
# A real, local Slurm 22.05 cluster for tests: munge + mariadb + slurmdbd + slurmctld + two slurmd
# (nodes apo-n1, apo-n2 on this one host, so `--nodes=2` scripts run for real). Debian packages, root only.
#
#   bash scripts/slurm_local.sh up       # install (first time, ~15 s), configure, start; idempotent
#   bash scripts/slurm_local.sh status   # exit 0 when both nodes answer and accounting works
#   bash scripts/slurm_local.sh down     # stop every daemon this script started (config and packages stay)
#
# No cgroups here (containers/VMs without a delegated cgroup tree), so: proctrack/linuxproc, task/none.
# Accounting (slurmdbd on mariadb) is on because NeMo-Run reads job state only from `sacct`.
# State (pid files, logs, spool) lives in $SLURM_LOCAL_DIR (default /var/tmp/megatron-apo-slurm).
#
# A second, independent cluster can run beside the default one (the fresh-machine test does this): point
# SLURM_LOCAL_ETC at another config folder (default /etc/slurm; exported as SLURM_CONF for every Slurm command),
# SLURM_LOCAL_DIR at another state folder, and shift every port with SLURM_LOCAL_PORT_OFFSET. The cluster and node
# names come from SLURM_LOCAL_CLUSTER (default apo-local) and SLURM_LOCAL_NODE_PREFIX (default apo-n).
set -Eeuo pipefail

ACTION="${1:-up}"
STATE="${SLURM_LOCAL_DIR:-/var/tmp/megatron-apo-slurm}"
ETC="${SLURM_LOCAL_ETC:-/etc/slurm}"
export SLURM_CONF="$ETC/slurm.conf"   # sinfo/sacctmgr/slurmctld/slurmd read it; slurmdbd.conf sits beside it
PORT_OFFSET="${SLURM_LOCAL_PORT_OFFSET:-0}"
CTLD_PORT=$((16817 + PORT_OFFSET))
DBD_PORT=$((16819 + PORT_OFFSET))
NODE_PORT_BASE=$((17000 + PORT_OFFSET))
MYSQL_PORT=$((3306 + PORT_OFFSET))
CLUSTER="${SLURM_LOCAL_CLUSTER:-apo-local}"
NODES=("${SLURM_LOCAL_NODE_PREFIX:-apo-n}1" "${SLURM_LOCAL_NODE_PREFIX:-apo-n}2")
CPUS_PER_NODE="${SLURM_LOCAL_CPUS:-2}"     # declared, not enforced (no cgroups); 2 = this machine's cores
MEM_PER_NODE_MB="${SLURM_LOCAL_MEM_MB:-8000}"
MARKER="# written by megatron-apo scripts/slurm_local.sh"
HOST="$(hostname -s)"

log() { echo "slurm_local: $*" >&2; }
die() { log "error: $*"; exit 1; }
# any failing command names itself and its line (set -E carries the trap into functions and subshells)
# (only the script's own shell reports: a command substitution that fails inside a test, e.g. a `grep -c` counting
# zero while polling, is not an error)
on_error() {  # $1 = exit status, $2 = line, $3 = the command
  [ "$BASHPID" = "$$" ] || exit "$1"
  log "error: line $2: \`$3\` exited with status $1 (logs: $STATE/log)"
  exit "$1"
}
trap 'on_error $? $LINENO "$BASH_COMMAND"' ERR

[ "$(id -u)" = 0 ] || die "must run as root (it installs Debian packages and starts system daemons)"

# alive and not a zombie (a killed daemon nobody reaped still answers kill -0)
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null && [ "$(ps -o stat= -p "$(cat "$1")" | cut -c1)" != Z ]; }

install_packages() {
  local need=()
  for bin in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge slurmdbd:slurmdbd mariadbd:mariadb-server; do
    command -v "${bin%%:*}" >/dev/null 2>&1 || need+=("${bin##*:}")
  done
  [ ${#need[@]} -eq 0 ] && return 0
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q "${need[@]}" >"$STATE/apt.log" 2>&1; then
    apt-get update -q >>"$STATE/apt.log" 2>&1
    apt-get install -y -q "${need[@]}" >>"$STATE/apt.log" 2>&1 || { tail -20 "$STATE/apt.log" >&2; die "apt-get install failed (log: $STATE/apt.log)"; }
  fi
}

write_configs() {
  mkdir -p "$ETC" "$STATE"/{spool/ctld,log,run,mysql}
  if [ -f "$ETC/slurm.conf" ] && ! grep -qF "$MARKER" "$ETC/slurm.conf"; then
    die "$ETC/slurm.conf exists and was not written by this script; refusing to overwrite a real cluster's config"
  fi
  local nodelines="" i=0
  for n in "${NODES[@]}"; do
    i=$((i + 1))
    nodelines+="NodeName=$n NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((NODE_PORT_BASE + i)) CPUs=$CPUS_PER_NODE RealMemory=$MEM_PER_NODE_MB State=UNKNOWN"$'\n'
  done
  cat > "$ETC/slurm.conf" <<EOF
$MARKER
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
AuthType=auth/munge
# a requeued job may start again once its old credential expired (default 120 s); tests requeue, so keep it short
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
MessageTimeout=30
SlurmdTimeout=300
ReturnToService=2
SlurmdParameters=config_overrides
MpiDefault=none
JobRequeue=1
KillWait=10
MinJobAge=300
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
JobCompType=jobcomp/none
$nodelines
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  cat > "$ETC/slurmdbd.conf" <<EOF
$MARKER
AuthType=auth/munge
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$STATE/log/slurmdbd.log
PidFile=$STATE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=megatron-apo-local
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$ETC/slurmdbd.conf"
}

# digest of the two config files; a missing file (a fresh machine) digests as empty instead of failing
config_digest() { cat "$ETC/slurm.conf" "$ETC/slurmdbd.conf" 2>/dev/null | sha256sum || true; }

start_munge() {
  if pgrep -x munged >/dev/null 2>&1; then return 0; fi
  [ -f /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
  chown munge:munge /etc/munge/munge.key 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  if id munge >/dev/null 2>&1; then runuser -u munge -- /usr/sbin/munged; else /usr/sbin/munged --force; fi
}

start_mariadb() {
  if running "$STATE/run/mariadb.pid"; then return 0; fi
  local datadir="$STATE/mysql"
  if [ ! -d "$datadir/mysql" ]; then
    mariadb-install-db --user=root --datadir="$datadir" --auth-root-authentication-method=socket >"$STATE/log/mariadb-install.log" 2>&1 \
      || { tail -20 "$STATE/log/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
  fi
  rm -f "$STATE/run/mysql.sock"  # a socket left by a killed server would look ready before the new one listens
  (mariadbd --user=root --datadir="$datadir" --socket="$STATE/run/mysql.sock" --port="$MYSQL_PORT" --bind-address=127.0.0.1 \
     --pid-file="$STATE/run/mariadb.pid" --skip-log-error --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 \
     >"$STATE/log/mariadb.log" 2>&1 &)
  # ready = answers a ping on its socket (the socket file appears before the server accepts connections)
  for _ in $(seq 1 120); do
    mariadb-admin --socket="$STATE/run/mysql.sock" -u root ping >/dev/null 2>&1 && break
    sleep 0.5
  done
  mariadb-admin --socket="$STATE/run/mysql.sock" -u root ping >/dev/null 2>&1 \
    || { tail -20 "$STATE/log/mariadb.log" >&2; die "mariadb did not start"; }
  mariadb --socket="$STATE/run/mysql.sock" -u root <<'SQL'
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'megatron-apo-local';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'megatron-apo-local';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
SQL
}

start_slurm() {
  if ! running "$STATE/run/slurmdbd.pid"; then
    slurmdbd
    for _ in $(seq 1 60); do sacctmgr -i -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done
  fi
  # register the cluster once (slurmctld also does it on first contact; doing it here makes `up` deterministic)
  sacctmgr -i -n list cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
  running "$STATE/run/slurmctld.pid" || slurmctld
  for n in "${NODES[@]}"; do
    mkdir -p "$STATE/spool/$n"
    running "$STATE/run/slurmd-$n.pid" || slurmd -N "$n"
  done
}

wait_ready() {
  for _ in $(seq 1 120); do
    if [ "$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -cE ' (idle|mix|alloc)$')" = "${#NODES[@]}" ]; then
      log "up: cluster $CLUSTER, nodes ${NODES[*]} (${CPUS_PER_NODE} CPUs each), partition debug"
      return 0
    fi
    # a node left down/drained by an earlier run of this script comes back
    for n in "${NODES[@]}"; do
      sinfo -h -n "$n" -o '%t' 2>/dev/null | grep -qE 'down|drain' && scontrol update nodename="$n" state=resume 2>/dev/null || true
    done
    sleep 0.5
  done
  sinfo -N >&2 || true
  die "nodes did not become idle in 60 s (logs: $STATE/log)"
}

status() {
  sinfo -h -N -o '%N %t' 2>/dev/null | grep -cE ' (idle|mix|alloc)$' | grep -qx "${#NODES[@]}" || { log "not up"; return 1; }
  sacct -n -X -S now-1minutes >/dev/null 2>&1 || { log "accounting (sacct) not answering"; return 1; }
  log "up: $(sinfo -h -N -o '%N=%t' | tr '\n' ' ')"
}

stop_pidfile() {
  local f="$1"
  if running "$f"; then
    local pid; pid="$(cat "$f")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  fi
  rm -f "$f"
}

down() {
  for n in "${NODES[@]}"; do stop_pidfile "$STATE/run/slurmd-$n.pid"; done
  stop_pidfile "$STATE/run/slurmctld.pid"
  stop_pidfile "$STATE/run/slurmdbd.pid"
  stop_pidfile "$STATE/run/mariadb.pid"
  # munged is shared with anything else on the host that uses munge; stop it only if we are the only user
  if [ -f "$STATE/run/munged.ours" ]; then
    stop_pidfile /run/munge/munged.pid
    rm -f "$STATE/run/munged.ours"
  fi
  log "down"
}

case "$ACTION" in
  up)
    mkdir -p "$STATE"
    install_packages
    before="$(config_digest)"
    write_configs
    # daemons started with an older config (e.g. an earlier version of this script) restart with the new one
    if [ "$before" != "$(config_digest)" ] && running "$STATE/run/slurmctld.pid"; then
      log "config changed: restarting the daemons"
      for n in "${NODES[@]}"; do stop_pidfile "$STATE/run/slurmd-$n.pid"; done
      stop_pidfile "$STATE/run/slurmctld.pid"
      stop_pidfile "$STATE/run/slurmdbd.pid"
    fi
    if ! pgrep -x munged >/dev/null 2>&1; then start_munge; touch "$STATE/run/munged.ours"; fi
    # a slurmdbd that outlived its database keeps a dead connection: restart it with the database
    if ! running "$STATE/run/mariadb.pid"; then stop_pidfile "$STATE/run/slurmdbd.pid"; fi
    start_mariadb
    start_slurm
    wait_ready
    ;;
  status) status ;;
  down) down ;;
  *) die "usage: $0 up|down|status" ;;
esac
