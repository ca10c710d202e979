#!/usr/bin/env bash
# K local CPU processes x D simulated devices each, talking over 127.0.0.1 (a multi-host dry run).
#
#   launch/local_multiprocess.sh [K=2] [D=4] -- --config=configs/pretrain.py:tiny --workdir=/tmp/ms3_mh
#
# Each process gets MS3_COORDINATOR / MS3_NUM_PROCESSES / MS3_PROCESS_ID (read by
# ms3_jax.engine.processes.initialize_distributed in ms3_jax.main); CPU collectives use gloo. Logs of
# process i go to $LOG_DIR/process_i.log (default: /tmp/ms3_local_multiprocess). Exit code: 0 when
# every process succeeded, 75 (preempted: relaunch to resume) when the others did too or were
# preempted, else the first other failure's code (2 usage error, 1 error). config.batch_size must divide over K*D devices. Collectives wait up to 600 s
# for a slower process (`--xla_cpu_collective_timeout_seconds`; gloo's default is 30 s).
set -uo pipefail

K=${1:-2}; D=${2:-4}
shift $(( $# >= 2 ? 2 : $# ))
[[ "${1:-}" == "--" ]] && shift
PORT=${PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
LOG_DIR=${LOG_DIR:-/tmp/ms3_local_multiprocess}
PYTHON=${PYTHON:-python}
mkdir -p "$LOG_DIR"

pids=()
for ((i = 0; i < K; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$D --xla_cpu_collective_timeout_seconds=600" \
  JAX_PLATFORMS=cpu \
  MS3_COORDINATOR="127.0.0.1:$PORT" MS3_NUM_PROCESSES="$K" MS3_PROCESS_ID="$i" \
    "$PYTHON" -m ms3_jax.main "$@" >"$LOG_DIR/process_$i.log" 2>&1 &
  pids+=($!)
done
echo "started $K processes (${pids[*]}) on 127.0.0.1:$PORT; logs in $LOG_DIR"

status=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"
  rc=$?
  if (( rc != 0 )); then
    echo "process $i exited with $rc; see $LOG_DIR/process_$i.log" >&2
    # A failure outranks a preemption; the first failure's code is kept.
    if (( status == 0 || (status == 75 && rc != 75) )); then status=$rc; fi
  fi
done
exit $status
