#!/usr/bin/env bash
# K local CPU processes x D simulated devices each, talking over 127.0.0.1 (a multi-host dry run).
#
#   launch/local_multiprocess.sh [K=2] [D=4] -- --config=configs/pretrain.py:tiny --workdir=/tmp/ms3_mh
#
# Each process gets MS3_COORDINATOR / MS3_NUM_PROCESSES / MS3_PROCESS_ID (read by
# ms3_jax.engine.processes.initialize_distributed in ms3_jax.main); CPU collectives use gloo. Logs of
# process i go to $LOG_DIR/process_i.log (default: a fresh private directory from `mktemp -d`,
# printed; a LOG_DIR you set that is a symbolic link or another user's is refused, exit 2, as
# another user could read or redirect the logs through it). Exit code: 0 when
# every process succeeded, 75 (preempted: relaunch to resume) when the others did too or were
# preempted, else the first other failure's code (2 usage error, 1 error). config.batch_size must divide over K*D devices. Collectives wait up to 600 s
# for a slower process (`--xla_cpu_collective_timeout_seconds`; gloo's default is 30 s).
set -uo pipefail

K=${1:-2}; D=${2:-4}
shift $(( $# >= 2 ? 2 : $# ))
[[ "${1:-}" == "--" ]] && shift
PORT=${PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
PYTHON=${PYTHON:-python}
if [[ -z "${LOG_DIR:-}" ]]; then
  LOG_DIR=$(mktemp -d -t ms3_local_multiprocess.XXXXXX) || exit 1
else
  # Checked before and after mkdir: no write through a planted link or into another user's dir.
  if [[ -L "$LOG_DIR" ]] || { mkdir -p "$LOG_DIR" && [[ -L "$LOG_DIR" ]]; }; then
    echo "error: LOG_DIR $LOG_DIR is a symbolic link; refusing to write logs through it" >&2
    exit 2
  fi
  if [[ ! -d "$LOG_DIR" || ! -O "$LOG_DIR" ]]; then
    echo "error: LOG_DIR $LOG_DIR is not a directory of yours; refusing to write logs there" >&2
    exit 2
  fi
fi

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
