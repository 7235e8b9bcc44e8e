#!/usr/bin/env bash
# Builds every fuzz target with libFuzzer on the stable toolchain (SanitizerCoverage
# through -C passes / -C llvm-args: coverage-guided, no nightly, no ASan) and runs each
# for SECONDS_PER_TARGET (default 5), then prints the executions per target.
#
#   fuzz/run.sh [SECONDS_PER_TARGET]
#
# Environment: FUZZ_RUNS=N also stops each target after N executions; FUZZ_TARGETS="a b"
# runs only those; FUZZ_JOBS=N build jobs (default 2); FUZZ_ARGS extra libFuzzer flags.
# Needs a C++ compiler (libfuzzer-sys builds libFuzzer). The corpus grows in
# fuzz/corpus/TARGET across runs; a failing input lands in fuzz/artifacts/TARGET/ and is
# replayed with: fuzz/target/<triple>/release/TARGET fuzz/artifacts/TARGET/crash-...
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-5}
runs=${FUZZ_RUNS:--1}
triple=$(rustc -vV | sed -n 's/^host: //p')

# --target keeps these flags off build scripts and proc macros.
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=3 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares"
cargo build --release --quiet -j"${FUZZ_JOBS:-2}" --target "$triple" --bins

bin=target/$triple/release
all=$(sed -n 's/^name = "\([a-z_]*\)"$/\1/p' Cargo.toml | grep -v '^blocksync-fuzz$' || true)
failed=()
summary=()
for t in ${FUZZ_TARGETS:-$all}; do
    rm -rf "seeds/$t"
    # libFuzzer warns about missing sanitizer hooks (no ASan here): not worth showing.
    BLOCKSYNC_FUZZ_SEEDS="seeds/$t" "$bin/$t" 2>/dev/null
    mkdir -p "corpus/$t" "artifacts/$t"
    log=artifacts/$t/last.log
    # -timeout: an input that takes seconds is a hang worth reporting.
    # shellcheck disable=SC2086
    if "$bin/$t" "corpus/$t" "seeds/$t" -max_total_time="$secs" -runs="$runs" \
        -timeout=10 -print_final_stats=1 -artifact_prefix="artifacts/$t/" \
        ${FUZZ_ARGS:-} >"$log" 2>&1; then
        status=ok
    else
        status=FAILED
        failed+=("$t")
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
    line=$(printf '%-18s %12s execs  %-10s %s' "$t" "${execs:-?}" "${cov:-}" "$status")
    echo "$line"
    summary+=("$line")
    if [ "$status" = FAILED ]; then
        grep -E 'panicked at|ERROR|SUMMARY|Test unit written' "$log" | head -20 | sed 's/^/    /'
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: failures in ${failed[*]} (logs in fuzz/artifacts/TARGET/last.log)" >&2
    exit 1
fi
