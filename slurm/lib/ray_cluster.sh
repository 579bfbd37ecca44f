# Ray cluster inside a Slurm allocation, for the sbatch scripts (sourced, not run).
#
# Inputs (globals): RAY_FLEET_HOSTS (array: nodes whose GPUs serve the vLLM fleet; the first is the head),
# RAY_CLIENT_HOSTS (array: trainer/driver nodes that join with 0 GPUs so their processes have a local raylet),
# FLEET_GPUS_PER_NODE, RAY_HEAD_VISIBLE_GPUS (optional "4,5,6,7": with no fleet hosts, the head runs on the
# first client host and offers only these GPUs -- a fleet sharing the trainer's node), CONTAINER_ARGS (array),
# RAY_CMD, PYTHON, RAY_HEAD_PORT, RAY_PORT_BASE (either may be "auto"). Output: RAY_ADDRESS (exported), RAY_BG_PIDS.
# Each node runs `ray start --block` as a background srun step (--overlap: it shares the node with the trainer).

# Slurm's NodeAddr is what the nodes reach each other by (an IP or a resolvable name); Ray wants an IP.
node_ip() {
  local addr
  addr="$(scontrol show node "$1" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')"
  getent ahostsv4 "$addr" | awk 'NR==1 {print $1}'
}

RAY_BG_PIDS=()
ray_cluster_down() { for p in "${RAY_BG_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }

_ray_ports() {  # distinct ports per node index, so several Slurm "nodes" on one host (test clusters) coexist
  local b=$((RAY_PORT_BASE + 100 * $1))
  echo "--node-manager-port=$b --object-manager-port=$((b + 1)) --dashboard-agent-listen-port=$((b + 2))" \
       "--dashboard-agent-grpc-port=$((b + 3)) --metrics-export-port=$((b + 4)) --runtime-env-agent-port=$((b + 5))" \
       "--min-worker-port=$((b + 10)) --max-worker-port=$((b + 99))"
}

_ray_node() {  # index host visible-gpus-or-empty ray-start-args...
  local i="$1" host="$2" visible="$3"; shift 3
  local envs=()
  [ -n "$visible" ] && envs=(env "CUDA_VISIBLE_DEVICES=$visible")
  # shellcheck disable=SC2046
  srun --overlap --nodes=1 --ntasks=1 --nodelist="$host" "${CONTAINER_ARGS[@]}" ${envs[@]+"${envs[@]}"} \
    "$RAY_CMD" start --block --disable-usage-stats --node-ip-address="$(node_ip "$host")" $(_ray_ports "$i") "$@" \
    > "logs/ray-$SLURM_JOB_ID-$host.log" 2>&1 &
  RAY_BG_PIDS+=("$!")
}

_ray_wait() {  # host nodes timeout: until that many nodes joined; fails fast when a `ray start` step died
  srun --overlap --nodes=1 --ntasks=1 --nodelist="$1" "${CONTAINER_ARGS[@]}" \
    "$PYTHON" -m megatron_apo.launch.ray_wait --address="$RAY_ADDRESS" --nodes="$2" --timeout="$3" &
  local waiter=$! p
  while kill -0 "$waiter" 2>/dev/null; do
    for p in "${RAY_BG_PIDS[@]}"; do
      if ! kill -0 "$p" 2>/dev/null; then
        kill "$waiter" 2>/dev/null || true
        echo "ray_cluster: a node's 'ray start' exited; see logs/ray-$SLURM_JOB_ID-*.log" >&2
        return 1
      fi
    done
    sleep 2
  done
  wait "$waiter"
}

ray_cluster_up() {
  mkdir -p logs
  # "auto": ports derived from the job id, so jobs sharing one host (a test cluster) never collide
  [ "$RAY_HEAD_PORT" = auto ] && RAY_HEAD_PORT=$((22000 + SLURM_JOB_ID % 1000))
  # below the kernel's ephemeral range (32768-60999 on Linux), where any outgoing connection could hold a port
  # when Ray binds it, and below megatron_apo's own picks (20000-32000): 10000-18999, 300 ports (3 nodes) a job
  [ "$RAY_PORT_BASE" = auto ] && RAY_PORT_BASE=$((10000 + SLURM_JOB_ID % 30 * 300))
  local head head_gpus head_visible="" head_res clients=("${RAY_CLIENT_HOSTS[@]}")
  if [ "${#RAY_FLEET_HOSTS[@]}" -gt 0 ]; then
    head="${RAY_FLEET_HOSTS[0]}"; head_gpus="$FLEET_GPUS_PER_NODE"; head_res='{"apo_rollout_node": 1}'
  else  # the fleet shares the first client (trainer) node, on the GPUs the trainer does not use
    head="${RAY_CLIENT_HOSTS[0]}"; head_visible="${RAY_HEAD_VISIBLE_GPUS:?}"; clients=("${RAY_CLIENT_HOSTS[@]:1}")
    head_gpus="$(tr ',' '\n' <<< "$head_visible" | grep -c .)"
    head_res='{"apo_rollout_node": 1, "apo_trainer_node": 1}'
  fi
  RAY_ADDRESS="$(node_ip "$head"):$RAY_HEAD_PORT"; export RAY_ADDRESS
  # Ray >= 2.50 authenticates with a token; one per job, handed to every step (and so every node) by srun.
  export RAY_AUTH_MODE=token
  # a raylet on a busy node may need more than Ray's default 30 s to register with the head
  export RAY_raylet_start_wait_time_s="${RAY_raylet_start_wait_time_s:-120}"
  RAY_AUTH_TOKEN="$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')"; export RAY_AUTH_TOKEN
  local i=0
  _ray_node $i "$head" "$head_visible" --head --port="$RAY_HEAD_PORT" --include-dashboard=false \
    --ray-client-server-port=$((RAY_PORT_BASE + 7)) \
    --num-gpus="$head_gpus" --resources="$head_res"
  _ray_wait "$head" 1 180 > /dev/null  # the head's GCS must answer before workers register
  local h
  for h in "${RAY_FLEET_HOSTS[@]:1}"; do
    i=$((i + 1)); _ray_node $i "$h" "" --address="$RAY_ADDRESS" --num-gpus="$FLEET_GPUS_PER_NODE" \
      --resources='{"apo_rollout_node": 1}'
  done
  for h in ${clients[@]+"${clients[@]}"}; do
    i=$((i + 1)); _ray_node $i "$h" "" --address="$RAY_ADDRESS" --num-gpus=0 --resources='{"apo_trainer_node": 1}'
  done
  # every node must have joined before a driver builds the fleet
  _ray_wait "$head" $((i + 1)) 300
}
