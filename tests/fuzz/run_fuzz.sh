#!/usr/bin/env bash
# run_fuzz.sh FUZZER SEED_DIR WORK_DIR SECONDS SUMMARY [libFuzzer args...]
#
# Runs one libFuzzer target for SECONDS from WORK_DIR (its growing corpus, kept
# in the build tree) plus the checked-in SEED_DIR (read only). Exit status 0
# only when libFuzzer found nothing: no crash, leak, sanitizer report, timeout
# or out-of-memory. Prints "fuzz_<name>: N executions in S s (...)" and
# appends the same line to SUMMARY. On failure the log's tail and the
# reproducer's path are printed; rerun it with `FUZZER <crash file>`.
set -uo pipefail
fuzzer=$1 seeds=$2 work=$3 secs=$4 summary=$5
shift 5
name=$(basename "$fuzzer")
mkdir -p "$work" "$work.artifacts"
log="$work.log"

# The fuzzers' scratch files (fuzz_rpc's LMDB store, fuzz_config's file) go to a
# private directory on tmpfs when there is one, removed whatever happens.
tmp=$(mktemp -d "$( [ -w /dev/shm ] && echo /dev/shm || echo "${TMPDIR:-/tmp}" )/msa-fuzz.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
export TMPDIR="$tmp"
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:allocator_may_return_null=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
start=$(date +%s)
"$fuzzer" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=16384 \
  -print_final_stats=1 -artifact_prefix="$work.artifacts/" "$@" "$work" "$seeds" >"$log" 2>&1
rc=$?
took=$(( $(date +%s) - start ))
execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
cov=$(grep -Eo 'cov: [0-9]+' "$log" | tail -1 | tr -d 'cov: ')
corpus=$(find "$work" -type f | wc -l)
line="$name: ${execs:-?} executions in ${took} s (coverage ${cov:-?} edges, corpus ${corpus} inputs)"
if [ $rc -ne 0 ]; then
  line="$line FAILED (exit $rc)"
  echo "$line" >>"$summary"
  echo "== $name failed; last lines of $log:"
  tail -n 80 "$log"
  ls "$work.artifacts"/* 2>/dev/null | sed 's/^/reproducer: /'
  exit 1
fi
echo "$line" >>"$summary"
echo "$line"
