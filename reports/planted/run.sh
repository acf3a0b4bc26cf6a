#!/usr/bin/env bash
# Plants each bug of this folder in turn and says what catches it: the named
# and regression scenarios (seeds 1 to 5) and a swarm fuzz campaign stopped
# at its first failure (at most 5 minutes). Run from the repository root on
# a clean tree: `bash reports/planted/run.sh [PATCH...]`. Each patch is
# reverted after its run.
set -uo pipefail
cd "$(dirname "$0")/../.."
export RUSTFLAGS="--cfg madsim" CARGO_TARGET_DIR=target/sim
sim=target/sim/release/foreman-sim
patches=("$@")
[ ${#patches[@]} -eq 0 ] && patches=(reports/planted/*.patch)
for patch in "${patches[@]}"; do
  name=$(basename "$patch" .patch)
  echo "== $name"
  git apply "$patch" || { echo "   does not apply"; continue; }
  if ! cargo build --release -q -p foreman-sim 2>/tmp/planted-build.log; then
    echo "   does not build"; tail -5 /tmp/planted-build.log
    git apply -R "$patch"; continue
  fi
  caught=""
  for seed in 1 2 3 4 5; do
    out=$("$sim" run scenarios/ scenarios/regressions --seed "$seed" 2>&1)
    bad=$(echo "$out" | grep -E "^[a-z0-9-]+: (correctness|liveness|crash|nondeterminism)" | head -3)
    if [ -n "$bad" ]; then
      why=$(echo "$out" | grep -E "^  (\[|crash)" | head -1)
      caught="scenarios, seed $seed: $(echo "$bad" | cut -d' ' -f1 | tr '\n' ' ')— ${why:0:240}"
      break
    fi
  done
  echo "   scenarios: ${caught:-none caught it}"
  fuzz=$("$sim" fuzz --time 5m --first-failure --quiet --out target/planted-failures/"$name" 2>&1)
  first=$(echo "$fuzz" | grep -m1 "first failure")
  why=$(echo "$fuzz" | grep -m1 -E "^  (\[|crash)|^  [a-z]+ failure" )
  line=$(echo "$fuzz" | grep -m1 "^fuzz:")
  echo "   fuzz: ${first:-no failure in 5 minutes} (${line})"
  [ -n "$first" ] && echo "   first: $(echo "$fuzz" | grep -m1 -A1 '^SEED=' | tail -1 | cut -c1-240)"
  git apply -R "$patch"
done
