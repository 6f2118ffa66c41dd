#!/usr/bin/env bash
# Load benchmark of `kubetoken standalone`: release build, durable state on disk, server pinned to one core,
# wrk (keep-alive) on the other core, loopback only.
#
#   bash bench/run.sh            # full run: ES256, RS256, EdDSA client_credentials at 1/32/128 connections,
#                                # ES256 password grant; prints a Markdown table (what BENCHMARKS.md holds)
#   bash bench/run.sh --smoke    # CI: a one-second run per case on the debug build, no timing assertions
#   DURATION=20 bash bench/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=false
[[ ${1:-} == --smoke ]] && smoke=true
duration=${DURATION:-10}
conns=(1 32 128)
algs=(ES256 RS256 EdDSA)
if $smoke; then
  duration=1
  conns=(8)
fi

if ! command -v wrk >/dev/null; then
  echo "installing wrk (Debian package)" >&2
  (apt-get update -qq && apt-get install -y -qq wrk) >/dev/null
fi

if $smoke; then
  [[ -x target/debug/kubetoken ]] || cargo build --locked --quiet
  bin=target/debug/kubetoken
else
  cargo build --locked --release --quiet
  bin=target/release/kubetoken
fi

ncpu=$(nproc)
server_cpu=0
client_cpu=$((ncpu > 1 ? 1 : 0))
work=$(mktemp -d)
server_pid=""
cleanup() {
  [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

# Manifests: one client_credentials application per algorithm, and a password-grant application.
hash=$(printf 'bench-password' | "$bin" hash-password)
mkdir -p "$work/manifests"
for alg in "${algs[@]}"; do
  lower=$(echo "$alg" | tr 'A-Z' 'a-z')
  cat >"$work/manifests/$lower.yaml" <<YAML
apiVersion: kubetoken.io/v1alpha1
kind: OAuthApplication
metadata: {name: bench-$lower}
spec:
  grantTypes: [password, client_credentials, refresh_token]
  signing: {algorithm: $alg}
  scopes: [{name: "orders:read"}]
  users: {secretRef: {name: bench-users}}
  credentials: {secretName: bench-$lower-credentials}
---
apiVersion: v1
kind: Secret
metadata: {name: bench-$lower-credentials}
stringData: {client_id: bench-$lower, client_secret: bench-secret}
YAML
done
cat >"$work/manifests/users.yaml" <<YAML
apiVersion: v1
kind: Secret
metadata: {name: bench-users}
stringData:
  users.yaml: |
    - {username: alice, passwordHash: "$hash", roles: []}
YAML

lua() { # lua FILE CLIENT_ID BODY
  local auth
  auth=$(printf '%s:bench-secret' "$2" | base64 -w0)
  cat >"$1" <<LUA
wrk.method = "POST"
wrk.body = "$3"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Authorization"] = "Basic $auth"
LUA
}

start_server() {
  rm -rf "$work/state"
  taskset -c "$server_cpu" "$bin" standalone --manifests "$work/manifests" --state-dir "$work/state" \
    --listen 127.0.0.1:0 --worker-threads 1 >"$work/server.out" 2>"$work/server.err" &
  server_pid=$!
  for _ in $(seq 100); do
    grep -q 'listening on' "$work/server.out" 2>/dev/null && break
    sleep 0.1
  done
  base=$(sed -n 's/^kubetoken listening on //p' "$work/server.out")
  [[ -n $base ]] || { cat "$work/server.err" >&2; exit 1; }
}

stop_server() {
  kill "$server_pid" && wait "$server_pid" 2>/dev/null || true
  server_pid=""
}

to_ms() { # wrk latency (e.g. 812.00us, 1.77ms, 1.02s) to milliseconds
  awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n = n; else if (v ~ /s$/) n *= 1000; printf "%.2f", n }'
}

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$server_pid/stat"; }

failures=0
run_case() { # run_case LABEL LUA CONNS
  local label=$1 script=$2 c=$3 out t0 t1 rps p50 p99 non2xx cpu
  t0=$(cpu_ticks)
  out=$(taskset -c "$client_cpu" wrk -t1 -c"$c" -d"${duration}s" --latency -s "$script" "$base/oauth2/token")
  t1=$(cpu_ticks)
  rps=$(awk '/Requests\/sec/ { printf "%.0f", $2 }' <<<"$out")
  p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' <<<"$out")")
  p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' <<<"$out")")
  non2xx=$(awk '/Non-2xx/ { print $NF }' <<<"$out")
  cpu=$(awk -v d=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v s="$duration" 'BEGIN { printf "%.0f%%", 100 * d / hz / s }')
  local rss
  rss=$(awk '/VmHWM/ { printf "%.1f MB", $2 / 1024 }' "/proc/$server_pid/status")
  echo "| $label | $c | $rps | $p50 | $p99 | $cpu | $rss | ${non2xx:-0} |"
  if [[ -n $non2xx || ${rps:-0} == 0 ]]; then
    failures=$((failures + 1))
    echo "unexpected: $label at $c connections: ${non2xx:-0} non-2xx responses, $rps req/s" >&2
    tail -5 "$work/server.err" >&2
  fi
}

echo "kubetoken load benchmark: $(date -u +%Y-%m-%d), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores"
echo "server pinned to CPU $server_cpu (1 worker thread), wrk on CPU $client_cpu, ${duration}s per case, state fsynced to $(df -T "$work" | awk 'NR==2 { print $2 }')"
echo
echo "| case | connections | tokens/s | p50 ms | p99 ms | server CPU | peak RSS | non-2xx |"
echo "|---|---|---|---|---|---|---|---|"
for alg in "${algs[@]}"; do
  lower=$(echo "$alg" | tr 'A-Z' 'a-z')
  start_server
  idle=$(awk '/VmRSS/ { printf "%.1f MB", $2 / 1024 }' "/proc/$server_pid/status")
  lua "$work/cc.lua" "bench-$lower" "grant_type=client_credentials&scope=orders:read"
  for c in "${conns[@]}"; do
    run_case "client_credentials $alg (idle RSS $idle)" "$work/cc.lua" "$c"
  done
  if [[ $alg == ES256 ]]; then
    lua "$work/pw.lua" "bench-$lower" "grant_type=password&username=alice&password=bench-password&scope=device_ipad"
    run_case "password $alg (argon2id m=19456 t=2 p=1)" "$work/pw.lua" "${conns[-1]}"
  fi
  stop_server
done
[[ $failures == 0 ]] || { echo "$failures benchmark case(s) had errors" >&2; exit 1; }
$smoke && echo "smoke: 1 passed, 0 failed"
exit 0
