#!/usr/bin/env bash
# Builds every fuzz target and runs each for SECONDS (default 20); fails if any target finds a crash (a panic, a
# sanitizer report, a 10 s hang or more than 2 GiB of memory). Needs the nightly toolchain and cargo-fuzz
# (`cargo install cargo-fuzz --locked`). Usage: bash fuzz/run.sh [SECONDS]
#
# The seed inputs in fuzz/corpus/<target>/ are read only; what the fuzzer finds goes to fuzz/target/corpus/<target>/
# (kept between local runs), a crashing input to fuzz/artifacts/<target>/ (reproduce with
# `cargo +nightly fuzz run <target> <file>`).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}

cargo +nightly fuzz build
# The binaries are run directly: `cargo fuzz run` would check the build again for each target (and in a git
# worktree, where .git/HEAD is no file, build.rs makes cargo rebuild the crate every time).
bin_dir=fuzz/target/$(rustc +nightly -vV | sed -n 's/^host: //p')/release
failed=()
for target in $(cargo +nightly fuzz list); do
  work=fuzz/target/corpus/$target
  log=fuzz/target/logs/$target.log
  mkdir -p "$work" "$(dirname "$log")" "fuzz/artifacts/$target"
  echo "== fuzz $target (${secs}s)"
  if "$bin_dir/$target" -artifact_prefix="fuzz/artifacts/$target/" -max_total_time="$secs" -timeout=10 \
      -rss_limit_mb=2048 -print_final_stats=1 "$work" "fuzz/corpus/$target" >"$log" 2>&1; then
    grep -E '^stat::number_of_executed_units|^Done ' "$log" || tail -n 2 "$log"
  else
    tail -n 60 "$log"
    failed+=("$target")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz targets that found a crash: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzz: no crash in $(cargo +nightly fuzz list | wc -l) targets, ${secs}s each"
