#!/usr/bin/env bash
# The full profile on a GPU machine, with its logs: doctor, the measured ceilings, SmolLM2's bf16 perplexity on the
# whole evaluation split, then `make test`. Usage: scripts/full_profile.sh LOG_DIR [extra pytest args]
set -uo pipefail
log=${1:?usage: full_profile.sh LOG_DIR [pytest args]}; shift
mkdir -p "$log"
py=$(bash scripts/bootstrap.sh) || exit 1
$py -m labkit doctor 2>&1 | tee "$log/doctor.txt"
$py -m labkit bench ceilings --out "$log/ceilings.json" 2>&1 | tail -3
$py - <<'PY' 2>&1 | tee "$log/perplexity.txt"
import torch
from labkit import data, env, evaluate, models
model, tok = models.load("smollm2-135m", dtype=torch.bfloat16)
s = data.load_splits(tok, "pydoc")
for ctx, stride in ((2048, 1024), (512, 384)):
    ppl = evaluate.perplexity(model, s.eval, ctx_len=ctx, stride=stride, batch_size=8)
    print(f"SmolLM2-135M bf16 perplexity, {s.eval.numel():,} eval tokens (pydoc), ctx {ctx} stride {stride}, "
          f"{env.device_name()}: {ppl:.3f}")
PY
start=$(date +%s)
make test PYTEST_ARGS="$*" 2>&1 | tee "$log/test.log"
rc=${PIPESTATUS[0]}
echo "make test: exit $rc, $(( $(date +%s) - start )) s wall" | tee -a "$log/test.log"
exit $rc
