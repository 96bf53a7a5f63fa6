#!/usr/bin/env bash
# Starts a real Slurm on this machine for tests: munged, slurmctld and two slurmd "nodes"
# (c1, c2) that both live on 127.0.0.1, in partition "debug". Needs root. Idempotent.
#   scripts/slurm-local.sh start   # installs slurm-wlm + munge if missing, starts daemons
#   scripts/slurm-local.sh stop
# State, logs and slurm.conf live under $SLURM_LOCAL_DIR (default /tmp/llmapi-slurm).
set -euo pipefail
dir=${SLURM_LOCAL_DIR:-/tmp/llmapi-slurm}
conf=$dir/slurm.conf

stop() {
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
}

start() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
  fi
  stop
  mkdir -p "$dir"/{state,spool-c1,spool-c2,log}
  if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
    runuser -u munge -- munged 2>/dev/null || munged --force
  fi
  for _ in $(seq 50); do munge -n | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null

  local host cpus mem
  host=$(hostname -s)
  cpus=4
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 4 / 10 ))
  cat > "$conf" <<CONF
ClusterName=llmapi-test
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmdParameters=config_overrides
MailProg=/bin/true
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
SlurmctldPort=16817
NodeName=c1 NodeHostname=${host} NodeAddr=127.0.0.1 Port=17001 CPUs=${cpus} RealMemory=${mem}
NodeName=c2 NodeHostname=${host} NodeAddr=127.0.0.1 Port=17002 CPUs=${cpus} RealMemory=${mem}
PartitionName=debug Nodes=c1,c2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
  # Node names must resolve for rendezvous addresses derived from the node list.
  for n in c1 c2; do
    grep -qE "^127\.0\.0\.1[[:space:]].*\b$n\b" /etc/hosts || echo "127.0.0.1 $n" >> /etc/hosts
  done
  export SLURM_CONF=$conf
  slurmctld -c -f "$conf"
  slurmd -N c1 -f "$conf"
  slurmd -N c2 -f "$conf"
  for _ in $(seq 100); do
    if scontrol ping 2>/dev/null | grep -q UP && [ "$(sinfo -h -o '%T' -t idle | wc -l)" -ge 1 ] \
       && [ "$(sinfo -h -N -o '%N %T' | grep -c idle)" -eq 2 ]; then
      echo "slurm up: SLURM_CONF=$conf"
      return 0
    fi
    sleep 0.2
  done
  echo "slurm did not come up; logs in $dir/log" >&2
  sinfo -N >&2 || true
  return 1
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
