#!/usr/bin/env bash
# Best-effort installer for the benchmark's optional native tools.
#
# proxy_bench.py prefers `wrk` (load generator) and `nginx` (upstream) because
# they are far cheaper per request than the Python fallbacks, which leaves more
# of the 2 cores to the proxy under test.  Neither is required: the bench falls
# back to bench/loadgen.py and bench/upstream.py.  bench_instructions.py needs
# valgrind (callgrind), which nothing replaces.  So this script never fails.
set -u

missing=()
for tool in wrk nginx valgrind; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "setup: wrk, nginx and valgrind already installed"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing ${missing[*]}; not root, skipping install (Python fallbacks will be used)"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: missing ${missing[*]}; apt-get unavailable (Python fallbacks will be used)"
    exit 0
fi

echo "setup: installing ${missing[*]} from Debian packages"
export DEBIAN_FRONTEND=noninteractive
if apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; then
    # The Debian nginx package may start a system daemon on :80; the bench
    # runs its own instance, so stop the system one if it came up.
    if command -v service >/dev/null 2>&1; then
        service nginx stop >/dev/null 2>&1 || true
    fi
    echo "setup: installed ${missing[*]}"
else
    echo "setup: apt-get install failed (Python fallbacks will be used)"
fi
exit 0
