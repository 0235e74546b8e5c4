#!/usr/bin/env bash
# Runs test binaries in sequence, as scripts/test.sh's nested level does inside L1 (and its host
# level on the host): one binary per line of PLAN, tab-separated: label, directory, executable,
# then the binary's arguments.
#
# Usage: scripts/lib/nested-tests.sh PLAN RESULTS_DIR
#   Each binary's output goes to stdout (and RESULTS_DIR/<label>.log); its status, libtest
#   counts and time go to RESULTS_DIR/<label>.result: "<status> <passed> <failed> <ignored>
#   <seconds> <tests retried>". With FNVM_TEST_RETRY_FAILED=1 a binary's failed tests run once
#   more (loudly; the count is kept). A binary whose .result exists is skipped, so a run repeated after an L1 crash
#   resumes where it stopped. Exit status: 0 if every binary passed. Each binary gets
#   FNVM_TEST_BINARY_TIMEOUT seconds (default 1800) before it is killed as hung.
set -uo pipefail

plan="$1"
results="$2"
failed=0
# A hang guard per binary, so one stuck binary fails loudly instead of eating the whole run.
binary_timeout="${FNVM_TEST_BINARY_TIMEOUT:-1800}"
while IFS=$'\t' read -r -u 3 -a fields; do
  [ "${#fields[@]}" -ge 3 ] || continue
  label="${fields[0]}" dir="${fields[1]}" exe="${fields[2]}"
  args=("${fields[@]:3}")
  if [ -f "$results/$label.result" ]; then
    printf '=== %s: already ran (%s)\n' "$label" "$(cat "$results/$label.result")"
    read -r status _ <"$results/$label.result"
    [ "$status" -eq 0 ] || failed=1
    continue
  fi
  printf '=== %s: %s %s\n' "$label" "$exe" "${args[*]}"
  started=$SECONDS
  (cd "$dir" && exec timeout -k 10 "$binary_timeout" "$exe" "${args[@]}") </dev/null 2>&1 | tee "$results/$label.log"
  status="${PIPESTATUS[0]}"
  [ "$status" -ne 124 ] || printf '=== %s: HUNG, killed after %s s (FNVM_TEST_BINARY_TIMEOUT)\n' \
    "$label" "$binary_timeout"
  # libtest's summary: "test result: ok. 5 passed; 0 failed; 1 ignored; ..."
  counts="$(sed -n -E 's/^test result: [A-Za-z]+\. ([0-9]+) passed; ([0-9]+) failed; ([0-9]+) ignored.*/\1 \2 \3/p' \
    "$results/$label.log" | tail -n 1)"
  retried=0
  if [ "$status" -ne 0 ] && [ "$status" -ne 124 ] && [ "${FNVM_TEST_RETRY_FAILED:-0}" = 1 ]; then
    # The tests that failed (libtest lists them, indented, after its last "failures:" line)
    # run once more, each loudly named: at the nested level an emulated guest sometimes
    # triple-faults in early boot (under investigation); a second failure fails the level.
    # (No process substitution: L1 has no /dev/fd.)
    awk '/^failures:$/ { list = 1; n = 0; next }
      list && /^    [^ ]/ { names[n++] = $1; next } list && NF == 0 && n { list = 0 }
      END { for (i = 0; i < n; i++) print names[i] }' "$results/$label.log" >"$results/$label.failed"
    again=()
    mapfile -t again <"$results/$label.failed"
    if [ "${#again[@]}" -gt 0 ]; then
      retried="${#again[@]}"
      printf '=== %s: !!! RETRYING %d failed test(s) once: %s\n' "$label" "$retried" "${again[*]}"
      # One --exact for all the names (libtest refuses it twice), unless the plan gave it.
      exact=(--exact)
      for a in "${args[@]}"; do [ "$a" != --exact ] || exact=(); done
      exact+=("${again[@]}")
      (cd "$dir" && exec timeout -k 10 "$binary_timeout" "$exe" "${args[@]}" "${exact[@]}") </dev/null 2>&1 |
        tee "$results/$label.retry.log"
      status="${PIPESTATUS[0]}"
      read -r p1 _ ig1 <<<"${counts:-0 0 0}"
      p2=0 f2="$retried"
      read -r p2 f2 _ <<<"$(sed -n -E 's/^test result: [A-Za-z]+\. ([0-9]+) passed; ([0-9]+) failed; ([0-9]+) ignored.*/\1 \2 \3/p' \
        "$results/$label.retry.log" | tail -n 1)"
      counts="$((p1 + ${p2:-0})) ${f2:-$retried} $ig1"
    fi
  fi
  echo "$status ${counts:-0 0 0} $((SECONDS - started)) $retried" >"$results/$label.result.tmp"
  mv "$results/$label.result.tmp" "$results/$label.result"
  sync
  [ "$status" -eq 0 ] || failed=1
done 3<"$plan"
exit "$failed"
