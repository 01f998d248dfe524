#!/usr/bin/env bash
# Offline wheels for the GPU comparisons of the attention and decode benchmarks: flash-attn-4 (the CuTe-DSL
# FlashAttention) with its CUTLASS DSL for CUDA 13, and torchao, for a runner with Python 3.12, CUDA 13 PyTorch and no
# package index. It complements the bundle of ../shared/gpu-runner/prepare.sh (model, notebook tools), which it does
# not touch.
#
# Usage: scripts/gpu_wheelhouse.sh [REPO_DIR]      (default: the repository this script lives in)
# Writes REPO_DIR/.gpu-flash/ (git-ignored through .git/info/exclude):
#   wheels/            the small wheels (flash-attn-4, quack-kernels, apache-tvm-ffi, torch-c-dlpack-ext, the CUTLASS
#                      DSL front end and its base and core libraries, torchao)
#   cu13-a/ .. cu13-d/ the CUTLASS DSL CUDA 13 library wheel (~92 MB) cut in four parts of ~23 MB, so that no send
#                      to the runner carries more than about 60 MB (each is limited to 64 MiB)
#   bin/install.sh     run on the runner after each send: keeps what arrived in /root/flash-parts and, once everything
#                      is there, joins the parts, checks the sha256 and installs all wheels into /root/site-flash
# The CUTLASS DSL front end asks for its CUDA 12 library too; the runner has CUDA 13, so only the cu13 library is
# shipped and every wheel is installed with --no-deps (what they need besides these, the runner has: cuda-bindings,
# protobuf, einops, typing-extensions).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "${1:-$here/..}" && pwd)
out="$repo/.gpu-flash"
gitdir=$(git -C "$repo" rev-parse --path-format=absolute --git-common-dir)
grep -qx '/.gpu-flash/' "$gitdir/info/exclude" 2>/dev/null || { mkdir -p "$gitdir/info"; echo '/.gpu-flash/' >> "$gitdir/info/exclude"; }
py=${PYTHON:-python3}
FA4=4.0.0b36 CUTE=4.8.1 QUACK=0.6.5 TVMFFI=0.1.15.post2 DLPACK=0.1.5 TORCHAO=0.18.0
rm -rf "$out"; mkdir -p "$out/wheels" "$out/bin"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
plat=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$py" -m pip download -q "${plat[@]}" -d "$out/wheels" "flash-attn-4==$FA4" "quack-kernels==$QUACK" \
  "apache-tvm-ffi==$TVMFFI" "torch-c-dlpack-ext==$DLPACK" "nvidia-cutlass-dsl==$CUTE" \
  "nvidia-cutlass-dsl-libs-base==$CUTE" "nvidia-cutlass-dsl-libs-core==$CUTE" "torchao==$TORCHAO"
"$py" -m pip download -q "${plat[@]}" -d "$tmp" "nvidia-cutlass-dsl-libs-cu13==$CUTE"
big=$(ls "$tmp"/*.whl); base=$(basename "$big"); sha=$(sha256sum "$big" | cut -d' ' -f1)
(cd "$tmp" && split -n 4 -d "$base" part)
for i in 0 1 2 3; do d="$out/cu13-$(echo abcd | cut -c$((i + 1)))"; mkdir -p "$d"; mv "$tmp/part0$i" "$d/"; done
for p in "$out"/cu13-?/part0?; do
  [ "$(stat -c %s "$p")" -lt $((30 * 1000 * 1000)) ] || { echo "part $p is not under 30 MB" >&2; exit 1; }
done
cat > "$out/bin/install.sh" <<S1
#!/usr/bin/env bash
# On the runner, after each send (the machine kept warm in between): keep what arrived in /root/flash-parts; once the
# small wheels and all four parts are there, join the CUDA 13 library, check its sha256 and install every wheel in ONE
# pip call into /root/site-flash (the CUTLASS DSL wheels share one top-level package, which separate --target installs
# would overwrite; a target of its own leaves /root/site of the other bundle untouched). Then source
# /root/site-flash/env.sh (after the other bundle's env.sh).
set -e; mkdir -p /root/flash-parts/wheels /root/site-flash
if ls .gpu-flash/wheels/*.whl >/dev/null 2>&1; then cp .gpu-flash/wheels/*.whl /root/flash-parts/wheels/; fi
for p in .gpu-flash/cu13-?/part0?; do [ -f "\$p" ] && cp "\$p" /root/flash-parts/; done
n=\$(ls /root/flash-parts/part0? 2>/dev/null | wc -l); w=\$(ls /root/flash-parts/wheels/*.whl 2>/dev/null | wc -l)
if [ "\$n" -eq 4 ] && [ "\$w" -gt 0 ]; then
  cat /root/flash-parts/part00 /root/flash-parts/part01 /root/flash-parts/part02 /root/flash-parts/part03 > /root/flash-parts/$base
  echo "$sha  /root/flash-parts/$base" | sha256sum -c --quiet
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/site-flash \\
    /root/flash-parts/wheels/*.whl /root/flash-parts/$base
  # a target directory is no site-packages: Python skips its .pth files, so the one that puts the CUTLASS DSL's
  # packages on sys.path becomes a PYTHONPATH entry
  echo 'export PYTHONPATH=/root/site-flash:/root/site-flash/nvidia_cutlass_dsl/dsl_packages\${PYTHONPATH:+:\$PYTHONPATH}' > /root/site-flash/env.sh
  rm -f /root/flash-parts/part0?; echo "flash-attn-4, the CUTLASS DSL (CUDA 13) and torchao installed into /root/site-flash; . /root/site-flash/env.sh"
else
  echo "on the runner: \$w small wheels, \$n of 4 parts of $base; send the rest"
fi
S1
chmod +x "$out/bin/install.sh"
du -cb "$out"/wheels/*.whl "$out"/cu13-?/part0? | tail -1 | awk '{printf "wheelhouse: %.1f MB in all\n", $1 / 1e6}'
du -sb "$out"/wheels "$out"/cu13-? | awk '{printf "  %-50s %6.1f MB\n", $2, $1 / 1e6}'
echo "send 1: carry .gpu-flash/wheels .gpu-flash/cu13-a .gpu-flash/cu13-b .gpu-flash/bin -> bash .gpu-flash/bin/install.sh"
echo "send 2: carry .gpu-flash/cu13-c .gpu-flash/cu13-d .gpu-flash/bin -> bash .gpu-flash/bin/install.sh && . /root/site-flash/env.sh && <command>"
