#!/bin/sh
# Runs every fuzz target (fuzz/fuzz_targets/) for a fixed number of
# executions and records, per target, the executions made, the time, the
# corpus and what was found, in bench/results/fuzz.md.
#
#   bench/fuzz.sh [RUNS [SECONDS [TARGET...]]]
#
# RUNS: executions per target (default 10000000). SECONDS: a cap on each
# target's time (default 0: none), for the targets that write files and run
# a few thousand times a second. Each run starts from fuzz/corpus/TARGET (in
# git, minimised with `cargo fuzz cmin` at the end, so a rerun starts where
# this one ended). A crash or a broken invariant leaves its input in
# fuzz/artifacts/TARGET/ and makes the script exit 1: turn it into a
# regression test, fix it, rerun.
#
# FUZZ_RESULTS=FILE writes the table there instead (relative to fuzz/).
#
# Needs nightly Rust and cargo-fuzz (`cargo +nightly install cargo-fuzz
# --locked`: installed when missing). Built without a sanitizer (`-s
# none`): the code under test is safe Rust, and libFuzzer runs 2–5 times
# faster without ASan. One core per target, one target at a time.
#
# Run beside other work under `nice -n 19`, it stays out of that work's way:
# with autogroup scheduling (Linux's default, on this VM too) a niceness only
# ranks processes within one session, and two fuzzers at nice 19 took 1.25 of
# 2 cores from a CI run in another session. So the script runs in a session of
# its own and gives that session's group its own niceness.
set -eu
if [ -w /proc/self/autogroup ] && [ -z "${BRIDGE_FUZZ_SESSION:-}" ]; then
  BRIDGE_FUZZ_SESSION=1 exec setsid -w "$0" "$@"
fi
[ -w /proc/self/autogroup ] && { echo "$(nice)" >/proc/self/autogroup || true; }
cd "$(dirname "$0")/../fuzz"
RUNS=${1:-10000000}
SECS=${2:-0}
shift 2 2>/dev/null || shift $#
command -v cargo-fuzz >/dev/null || cargo +nightly install cargo-fuzz --locked
TARGETS=${*:-$(cargo +nightly fuzz list)}
cargo +nightly fuzz build -O -s none
OUT=${FUZZ_RESULTS:-../bench/results/fuzz.md}
LOGS=../target/fuzz-logs
mkdir -p "$LOGS"
{
  echo "# Fuzzing: \`bench/fuzz.sh $RUNS $SECS\`, $(date -u +%Y-%m-%d), $(nproc) cores"
  echo
  echo "| target | executions | seconds | exec/s | corpus (files) | found |"
  echo "|---|---:|---:|---:|---:|---|"
} >"$OUT"
failed=0
for t in $TARGETS; do
  mkdir -p "corpus/$t" "artifacts/$t"
  log="$LOGS/$t.log"
  start=$(date +%s)
  if cargo +nightly fuzz run -O -s none "$t" -- -runs="$RUNS" \
      -max_total_time="$SECS" -print_final_stats=1 >"$log" 2>&1; then
    found=none
  else
    found="crash: $(ls -t "artifacts/$t" | head -1) (log: target/fuzz-logs/$t.log)"
    failed=1
  fi
  secs=$(( $(date +%s) - start ))
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  cargo +nightly fuzz cmin -O -s none "$t" >"$LOGS/$t.cmin.log" 2>&1 || true
  files=$(ls "corpus/$t" | wc -l)
  echo "| $t | ${execs:-?} | $secs | ${rate:-?} | $files | $found |" >>"$OUT"
  echo "$t: ${execs:-?} executions in ${secs}s, $found"
done
exit $failed
