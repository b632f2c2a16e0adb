#!/usr/bin/env bash
# The live demo: a real Mosquitto, the daemon with the bundled model, and the 3103 ECG5000 test
# beats (data/ecg5000/splits/test.txt.xz, in the repository) replayed through it as 20 live sensors. Alerts print as they arrive;
# the end is a summary with precision and recall against the beats' labels.
# Run as root on a fresh Debian machine: it installs what it needs first (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== setting up (Mosquitto and the Python environment; the first run takes a few minutes)"
scripts/setup.sh
VENV=${VENV:-.venv}
MONITOR="$VENV/bin/monitor"
DATA=${DATA:-data/ecg5000/splits/test.txt.xz}
SPEED=${DEMO_SPEED:-10}
SENSORS=${DEMO_SENSORS:-20}
[[ -f $DATA ]] || { echo "demo: $DATA not found (set DATA=path/to/labelled-ucr-file)" >&2; exit 1; }

free_port() { "$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() {  # wait_for SECONDS PYTHON-EXPRESSION
  "$VENV/bin/python" - "$@" <<'PY'
import sys, time, socket, urllib.request
deadline = time.monotonic() + float(sys.argv[1])
while time.monotonic() < deadline:
    try:
        if eval(sys.argv[2]):
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.1)
sys.exit(f"demo: timed out waiting for {sys.argv[2]}")
PY
}

BROKER_PORT=$(free_port)
METRICS_PORT=$(free_port)
PIDS=()
WORK=$(mktemp -d "${TMPDIR:-/tmp}/monitor-demo.XXXXXX")
cleanup() {
  local code=$?
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if ((code == 0)); then
    rm -rf "$WORK"
  else
    echo "demo: failed; the logs are kept in $WORK" >&2
  fi
}
trap cleanup EXIT

echo "== Mosquitto on 127.0.0.1:$BROKER_PORT (work dir $WORK)"
printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n' "$BROKER_PORT" > "$WORK/mosquitto.conf"
mosquitto -c "$WORK/mosquitto.conf" > "$WORK/mosquitto.log" 2>&1 &
PIDS+=($!)
wait_for 10 "socket.create_connection(('127.0.0.1', $BROKER_PORT), 1)"

# The shipped config, pointed at this broker through environment overrides.
export MONITOR_MQTT__PORT=$BROKER_PORT MONITOR_METRICS__PORT=$METRICS_PORT MONITOR_MQTT__CLIENT_ID=monitor-demo
CONFIG=configs/monitor.yaml
"$MONITOR" check-config "$CONFIG"

echo "== the daemon (log: $WORK/daemon.log)"
"$MONITOR" run --config "$CONFIG" > "$WORK/daemon.log" 2>&1 &
DAEMON=$!
PIDS+=($DAEMON)
wait_for 120 "b'monitor_broker_connected 1.0' in urllib.request.urlopen('http://127.0.0.1:$METRICS_PORT/metrics').read()"
echo "== ready: metrics at http://127.0.0.1:$METRICS_PORT/metrics"

# The watcher prints each alert as it arrives; the replay starts once it is subscribed.
"$MONITOR" watch --config "$CONFIG" --labels "$WORK/labels.jsonl" --metrics-url "http://127.0.0.1:$METRICS_PORT/metrics" \
  | tee "$WORK/watch.log" &
WATCH=$!
PIDS+=($WATCH)
wait_for 60 "b'watching' in open('$WORK/watch.log', 'rb').read()"

echo "== replaying $DATA as $SENSORS sensors at 250 Hz x $SPEED"
"$MONITOR" replay --config "$CONFIG" --data "$DATA" --sensors "$SENSORS" --chunk 35 --speed "$SPEED" --labels-out "$WORK/labels.jsonl"
wait "$WATCH"
read -r load1 load5 _ < /proc/loadavg
echo "  load average $load1 (1 min), $load5 (5 min) on $(nproc) cores: the latency above grows with the machine's load"

echo "== stopping the daemon (SIGTERM: drain, then exit 0)"
kill -TERM "$DAEMON"
wait "$DAEMON" && echo "daemon exited 0"
