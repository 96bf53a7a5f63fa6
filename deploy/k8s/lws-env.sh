#!/bin/bash
# llmapi-lws-env COMMAND [ARGS...]: runs COMMAND (llmapi-launch serve ...) as one rank of a
# tensor-parallel group whose ranks are the pods of a LeaderWorkerSet group.
#
# llmapi-launch learns its rank, its group and where the group meets from Slurm's or MPI's
# environment (launcher/src/placement.rs); an MPI world has no node list, so its groups meet on
# 127.0.0.1 and cannot span pods. This script therefore describes the LeaderWorkerSet group as
# a Slurm job step of one task per pod, from the variables LeaderWorkerSet sets in every pod:
#   LWS_LEADER_ADDRESS  the leader pod's DNS name, <lws>-<group>.<lws>.<namespace>
#   LWS_GROUP_SIZE      pods in the group (= --tp_size)
#   LWS_WORKER_INDEX    this pod's index in the group, 0 for the leader
# Worker pod i of the group is <lws>-<group>-<i> under the same headless service, so the node
# list is the leader followed by those names; rank i runs on node i, the group meets at the
# leader on --rendezvous_port, and each pod advertises its own DNS name
# (LLMAPI_ADVERTISE_HOST), which its job-CA certificate carries. `llmapi-lws-env
# llmapi-launch env --tp_size N` prints the resulting placement.
set -euo pipefail

for v in LWS_LEADER_ADDRESS LWS_GROUP_SIZE LWS_WORKER_INDEX; do
  if [ -z "${!v:-}" ]; then
    echo "llmapi-lws-env: $v is unset; run this in a LeaderWorkerSet pod (leaderworkerset.x-k8s.io) or set it" >&2
    exit 2
  fi
done
case "$LWS_GROUP_SIZE$LWS_WORKER_INDEX" in
  *[!0-9]*) echo "llmapi-lws-env: LWS_GROUP_SIZE ($LWS_GROUP_SIZE) and LWS_WORKER_INDEX ($LWS_WORKER_INDEX) must be numbers" >&2; exit 2 ;;
esac
if [ "$LWS_WORKER_INDEX" -ge "$LWS_GROUP_SIZE" ]; then
  echo "llmapi-lws-env: LWS_WORKER_INDEX $LWS_WORKER_INDEX is not below LWS_GROUP_SIZE $LWS_GROUP_SIZE" >&2
  exit 2
fi
leader_pod=${LWS_LEADER_ADDRESS%%.*}
domain=${LWS_LEADER_ADDRESS#*.}
if [ "$domain" = "$LWS_LEADER_ADDRESS" ]; then
  echo "llmapi-lws-env: LWS_LEADER_ADDRESS '$LWS_LEADER_ADDRESS' has no domain (expected <pod>.<service>.<namespace>)" >&2
  exit 2
fi
nodes=$LWS_LEADER_ADDRESS
for ((i = 1; i < LWS_GROUP_SIZE; i++)); do
  nodes+=",${leader_pod}-${i}.${domain}"
done
IFS=, read -r -a node_names <<<"$nodes"

export SLURM_PROCID=$LWS_WORKER_INDEX
export SLURM_NTASKS=$LWS_GROUP_SIZE
export SLURM_LOCALID=0
export SLURM_NODEID=$LWS_WORKER_INDEX
export SLURM_JOB_NODELIST=$nodes
export SLURM_TASKS_PER_NODE="1(x${LWS_GROUP_SIZE})"
# Binds the job's secret exchange to this group; the secret itself comes from
# LLMAPI_JOB_TOKEN_FILE (the Secret), never from here.
export SLURM_JOB_ID=$leader_pod
export LLMAPI_ADVERTISE_HOST=${node_names[$LWS_WORKER_INDEX]}
exec "$@"
