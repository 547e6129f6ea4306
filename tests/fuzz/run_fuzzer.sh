#!/bin/sh
# run_fuzzer.sh BINARY SEED_DIR WORK_DIR SECONDS
# Runs a libFuzzer target for SECONDS over a copy of the checked-in seeds (the source tree is
# never written). A crash leaves its input in WORK_DIR/artifacts and fails the test; add it
# to the seed directory once fixed, so that the replay test keeps it.
set -eu
bin=$1 seeds=$2 work=$3 secs=$4
rm -rf "$work/corpus"
mkdir -p "$work/corpus" "$work/artifacts"
cp "$seeds"/* "$work/corpus/"
exec "$bin" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$work/artifacts/" "$work/corpus"
