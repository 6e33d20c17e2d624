#!/usr/bin/env bash
# Build a CUDA-enabled `mlops` (cargo feature `cuda`, candle 0.11.1) on a machine with no GPU
# and no CUDA toolkit (Debian 12 / glibc >= 2.34, x86_64), from PyPI CUDA 13.0.x wheels and a
# generated libcuda link stub. The result runs on an sm_90 GPU (H100/H200) with an NVIDIA
# driver >= 580 (CUDA 13.0). Not part of CI (.ci/run never calls it).
#
# Usage (from anywhere; paths are relative to the repository root):
#   nice -n 19 bash scripts/build-cuda.sh          # -> target/cuda/{mlops,cuda-env.sh,mlops-cuda}
#   OUT_DIR=/some/dir bash scripts/build-cuda.sh
#
# Environment (all optional):
#   OUT_DIR          where the binary and its run-time notes go       (default target/cuda)
#   CUDA_TARGET_DIR  the cargo target dir of this build only          (default target/cuda-build)
#   CUDA_TOOLCHAIN   where the CUDA wheels, the libcuda stub live     (default ~/.cache/mlops-cuda13.0)
#   JOBS             cargo/nvcc parallelism                           (default nproc)
#   PYTHON           a python3 to make the wheel venv with            (default python3)
#   FEATURES         cargo features                                   (default cuda,nccl: NCCL for
#                    multi-GPU `train --devices`; `cuda` alone drops the libnccl.so.2 need)
#   STRIP            1: strip the copied binary's symbols (about 2 MiB smaller, but
#                    backtraces lose their names); 0: as cargo built it (default 0)
#
# Idempotent: the wheels are installed once (a stamp file records the pinned versions), the
# stub is generated once, and cargo rebuilds only what changed (its own target dir, so the
# normal `cargo build` is never disturbed). Clean build on 2 cores: see README "CUDA build
# and GPU check"; about 6-7 minutes of it is nvcc compiling candle-kernels.
#
# Run time: the binary needs the CUDA runtime libraries below on the loader path (the
# GPU machine's PyTorch venv has exactly these versions: torch 2.11.0+cu130 pins them) and
# libcuda.so.1 from the driver. `source $OUT_DIR/cuda-env.sh` finds them and sets
# LD_LIBRARY_PATH; `$OUT_DIR/mlops-cuda ARGS` does that and runs the binary.
set -euo pipefail

T0=$(date +%s)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

OUT_DIR=${OUT_DIR:-target/cuda}
CUDA_TARGET_DIR=${CUDA_TARGET_DIR:-$REPO/target/cuda-build}
CUDA_TOOLCHAIN=${CUDA_TOOLCHAIN:-${XDG_CACHE_HOME:-$HOME/.cache}/mlops-cuda13.0}
JOBS=${JOBS:-$(nproc)}
PYTHON=${PYTHON:-python3}
STRIP=${STRIP:-0}
FEATURES=${FEATURES:-cuda,nccl}

# Versions = what torch 2.11.0 (cu130) pins, so build-time and run-time libraries match.
# nvcc MUST stay 13.0.x: nvcc 13.1+ emits PTX ISA 9.1+, which a 580 (CUDA 13.0) driver
# refuses with CUDA_ERROR_UNSUPPORTED_PTX_VERSION.
WHEELS=(
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
  nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
)
# NCCL (the `nccl` feature: cudarc links -lnccl): the version torch 2.11.0 (cu130) pins.
case ",$FEATURES," in
  *,nccl,*) WHEELS+=(nvidia-nccl-cu13==2.28.9) ;;
esac

say() { printf '[build-cuda] %s\n' "$*" >&2; }

# ---------------------------------------------------------------------------------------
# 1. CUDA 13.0 toolchain + link-time libraries from PyPI (once).
# ---------------------------------------------------------------------------------------
T_TC=$(date +%s)
mkdir -p "$CUDA_TOOLCHAIN"
CU=$CUDA_TOOLCHAIN/cu/nvidia/cu13
STAMP=$CUDA_TOOLCHAIN/wheels.stamp
if [ ! -x "$CU/bin/nvcc" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "${WHEELS[*]}" ]; then
  say "installing CUDA 13.0 wheels into $CUDA_TOOLCHAIN/cu"
  if [ ! -x "$CUDA_TOOLCHAIN/venv/bin/pip" ]; then
    "$PYTHON" -m venv "$CUDA_TOOLCHAIN/venv"
  fi
  rm -rf "$CUDA_TOOLCHAIN/cu.tmp"
  "$CUDA_TOOLCHAIN/venv/bin/pip" install -q --disable-pip-version-check --no-deps \
    --target "$CUDA_TOOLCHAIN/cu.tmp" "${WHEELS[@]}"
  rm -rf "$CUDA_TOOLCHAIN/cu"
  mv "$CUDA_TOOLCHAIN/cu.tmp" "$CUDA_TOOLCHAIN/cu"
  printf '%s' "${WHEELS[*]}" >"$STAMP"
fi
NVCC_VERSION=$("$CU/bin/nvcc" --version | grep -oE 'release [0-9.]+' | head -1)
case "$NVCC_VERSION" in
  "release 13.0") ;;
  *) say "nvcc is '$NVCC_VERSION', must be 13.0 (the GPU machine's 580 driver refuses newer PTX)"; exit 1 ;;
esac

# ---------------------------------------------------------------------------------------
# 2. Link fix-ups.
#  a) the wheels ship only versioned sonames; -lcublas needs libcublas.so.
#  b) no wheel ships libcuda.so (it belongs to the driver), and cudarc's dynamic linking
#     emits -lcuda: build a link STUB with one dummy function per driver-API name in the
#     13.0 cuda.h and SONAME libcuda.so.1. At run time the driver's libcuda.so.1 is used.
# ---------------------------------------------------------------------------------------
( cd "$CU/lib"
  for f in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
    ln -sfn "$f" "${f%.so.*}.so"
  done
  # The NCCL wheel has its own directory: link its library (and header) in beside the rest.
  for f in ../../nccl/lib/libnccl.so.2 ../../cu13/lib/libnccl.so.2; do
    if [ -e "$f" ] && [ ! -e libnccl.so.2 ]; then ln -sfn "$f" libnccl.so.2; fi
  done
  if [ -e libnccl.so.2 ]; then ln -sfn libnccl.so.2 libnccl.so; fi )
if [ ! -f "$CU/lib/stubs/libcuda.so" ]; then
  say "generating the libcuda.so link stub"
  mkdir -p "$CUDA_TOOLCHAIN/stubgen" "$CU/lib/stubs"
  { gcc -E -P -I"$CU/include" "$CU/include/cuda.h"
    gcc -E -P -D__CUDA_API_VERSION_INTERNAL -I"$CU/include" "$CU/include/cuda.h"
  } | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d ' (' >"$CUDA_TOOLCHAIN/stubgen/n1.txt"
  grep -oE '^#define[[:space:]]+cu[A-Z][A-Za-z0-9_]*[[:space:]]+cu[A-Z][A-Za-z0-9_]*' "$CU/include/cuda.h" \
    | awk '{print $2; print $3}' >"$CUDA_TOOLCHAIN/stubgen/n2.txt"
  sort -u "$CUDA_TOOLCHAIN/stubgen/n1.txt" "$CUDA_TOOLCHAIN/stubgen/n2.txt" \
    | awk '{printf "int %s(void){return 999;}\n",$1}' >"$CUDA_TOOLCHAIN/stubgen/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CU/lib/stubs/libcuda.so.tmp" \
    "$CUDA_TOOLCHAIN/stubgen/libcuda_stub.c"
  mv "$CU/lib/stubs/libcuda.so.tmp" "$CU/lib/stubs/libcuda.so"
fi
# A loader needs the soname as a file name: for local checks only (never on a GPU machine).
mkdir -p "$CUDA_TOOLCHAIN/stubrun"
ln -sfn "$CU/lib/stubs/libcuda.so" "$CUDA_TOOLCHAIN/stubrun/libcuda.so.1"
T_TC_DONE=$(date +%s)

# ---------------------------------------------------------------------------------------
# 3. Build (own target dir).
#  - nvcc on PATH: cudaforge (candle-kernels' build.rs) runs it, finds the headers from its
#    location and needs a host g++.
#  - CUDA_COMPUTE_CAP=90 replaces the nvidia-smi query (sm_90a PTX + SASS: H100/H200 only).
#  - CUDARC_CUDA_VERSION=13000 pins cudarc's driver-API bindings to CUDA 13.0.
#  - CUDA_HOME/PATH/ROOT: cudarc adds $X/lib and $X/lib/stubs as link-search dirs.
# ---------------------------------------------------------------------------------------
export PATH="$CU/bin:$PATH"
export CUDA_HOME="$CU" CUDA_PATH="$CU" CUDA_ROOT="$CU"
export CUDA_COMPUTE_CAP=90
export CUDARC_CUDA_VERSION=13000
export CUDAFORGE_THREADS=$JOBS
export CARGO_TARGET_DIR=$CUDA_TARGET_DIR
say "cargo build --release --features $FEATURES (CARGO_TARGET_DIR=$CARGO_TARGET_DIR, -j$JOBS, $NVCC_VERSION)"
T_CARGO=$(date +%s)
cargo build --release --features "$FEATURES" --bin mlops -j"$JOBS"
T_CARGO_DONE=$(date +%s)

# ---------------------------------------------------------------------------------------
# 4. Copy the binary, write its run-time notes: cuda-env.sh (source it) and mlops-cuda.
# ---------------------------------------------------------------------------------------
mkdir -p "$OUT_DIR"
OUT_ABS=$(cd "$OUT_DIR" && pwd)
cp -f "$CARGO_TARGET_DIR/release/mlops" "$OUT_ABS/mlops.tmp"
if [ "$STRIP" = 1 ]; then strip "$OUT_ABS/mlops.tmp"; fi
mv -f "$OUT_ABS/mlops.tmp" "$OUT_ABS/mlops"

# The CUDA libraries the binary needs: its own NEEDED entries, and what those load in turn
# (libcublas loads libcublasLt), as the loader resolves them from the wheels and the stub.
mapfile -t NEEDED < <(readelf -d "$OUT_ABS/mlops" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p')
mapfile -t LOADED < <(LD_LIBRARY_PATH="$CU/lib:$CUDA_TOOLCHAIN/stubrun" ldd "$OUT_ABS/mlops" \
  | awk -v a="$CU/lib/" -v b="$CUDA_TOOLCHAIN/stubrun/" 'index($3, a) == 1 || index($3, b) == 1 { print $1 }')
wheel_of() {
  case "$1" in
    libcudart.so.*) echo "nvidia-cuda-runtime==13.0.96" ;;
    libcublas.so.* | libcublasLt.so.*) echo "nvidia-cublas==13.1.0.3" ;;
    libcurand.so.*) echo "nvidia-curand==10.4.0.35" ;;
    libnvrtc.so.*) echo "nvidia-cuda-nvrtc==13.0.88" ;;
    libcudnn*) echo "nvidia-cudnn-cu13==9.19.0.56" ;;
    libnccl*) echo "nvidia-nccl-cu13==2.28.9" ;;
    libcuda.so.*) echo "the NVIDIA driver (>= 580, CUDA 13.0)" ;;
    *) echo "" ;;
  esac
}
CUDA_LIBS=()
NOTES=""
for lib in "${LOADED[@]}"; do
  w=$(wheel_of "$lib")
  [ -n "$w" ] || continue
  CUDA_LIBS+=("$lib")
  NOTES+=$(printf '#   %-22s %s' "$lib" "$w")$'\n'
done

cat >"$OUT_ABS/cuda-env.sh" <<EOF
# shellcheck shell=bash
# Source this before running ./mlops, a CUDA build (scripts/build-cuda.sh, $NVCC_VERSION,
# sm_90, built $(date -u +%Y-%m-%dT%H:%M:%SZ)): it puts the directories holding the CUDA
# libraries the binary needs on LD_LIBRARY_PATH. The binary needs (ldd, CUDA only):
${NOTES}#
# It looks in \$MLOPS_CUDA_LIB_DIRS (':'-separated) first, then in the python3's nvidia
# wheels (the GPU machine's PyTorch venv: nvidia/cu13/lib), then /usr/local/cuda, then the
# build machine's wheel dir. libcuda.so.1 comes from the driver (ldconfig or
# /usr/local/nvidia/lib64); MLOPS_CUDA_STUB=1 allows the build's link stub instead, which
# loads but fails at cuInit (for checking the loader on a machine without a GPU only).
# Prints "missing ..." on stderr for a library it cannot find; MLOPS_CUDA_LIBS_MISSING
# holds their names (empty when all were found).
MLOPS_CUDA_LIBS="${CUDA_LIBS[*]}"
_mlops_cuda_env() {
  local cands=() dirs=() d lib found sp py wheel_dirs seen
  if [ -n "\${MLOPS_CUDA_LIB_DIRS:-}" ]; then IFS=: read -ra cands <<<"\$MLOPS_CUDA_LIB_DIRS"; fi
  for py in python3 /opt/torch/.venv/bin/python3; do
    sp=\$("\$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null) || continue
    wheel_dirs="\$sp/nvidia/cu13/lib \$sp/nvidia/cuda_runtime/lib \$sp/nvidia/cublas/lib \$sp/nvidia/curand/lib \$sp/nvidia/cuda_nvrtc/lib \$sp/nvidia/nccl/lib"
    for d in \$wheel_dirs; do cands+=("\$d"); done
  done
  cands+=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib "$CU/lib")
  MLOPS_CUDA_LIBS_MISSING=""
  for lib in \$MLOPS_CUDA_LIBS; do
    found=""
    if [ "\$lib" = libcuda.so.1 ]; then
      if ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; then continue; fi
      for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib/wsl/lib; do
        if [ -e "\$d/\$lib" ]; then found=\$d; break; fi
      done
      if [ -z "\$found" ] && [ "\${MLOPS_CUDA_STUB:-0}" = 1 ]; then found="$CUDA_TOOLCHAIN/stubrun"; fi
    else
      for d in "\${cands[@]}"; do
        if [ -e "\$d/\$lib" ]; then found=\$d; break; fi
      done
    fi
    if [ -n "\$found" ]; then
      seen=0
      for d in "\${dirs[@]}"; do if [ "\$d" = "\$found" ]; then seen=1; fi; done
      if [ "\$seen" = 0 ]; then dirs+=("\$found"); fi
    else
      MLOPS_CUDA_LIBS_MISSING+="\$lib "
      echo "cuda-env.sh: missing \$lib (set MLOPS_CUDA_LIB_DIRS to the folder holding it)" >&2
    fi
  done
  local joined
  joined=\$(IFS=:; echo "\${dirs[*]}")
  if [ -n "\$joined" ]; then export LD_LIBRARY_PATH="\$joined\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"; fi
}
_mlops_cuda_env
unset -f _mlops_cuda_env
EOF

cat >"$OUT_ABS/mlops-cuda" <<'EOF'
#!/usr/bin/env bash
# Runs the CUDA build of mlops beside this file with its CUDA libraries on the loader path.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=/dev/null
. "$here/cuda-env.sh"
exec "$here/mlops" "$@"
EOF
chmod +x "$OUT_ABS/mlops-cuda"

# ---------------------------------------------------------------------------------------
# 5. Inspect: ldd as a machine without the libraries sees it, then with the wheels' libs
#    and the stub (every library must resolve), and one run that must stop at cuInit.
# ---------------------------------------------------------------------------------------
echo "== readelf NEEDED"
printf '   %s\n' "${NEEDED[@]}"
echo "== ldd $OUT_DIR/mlops (plain loader path)"
ldd "$OUT_ABS/mlops" || true
echo "== ldd with the wheels' libs + the libcuda stub on LD_LIBRARY_PATH"
LDD_OK=$(LD_LIBRARY_PATH="$CU/lib:$CUDA_TOOLCHAIN/stubrun" ldd "$OUT_ABS/mlops")
echo "$LDD_OK"
if grep -q 'not found' <<<"$LDD_OK"; then
  say "some libraries did not resolve even with the wheels' libs: see above"; exit 1
fi
echo "== local smoke (no GPU: expect a one-line CUDA error, no panic)"
( export MLOPS_CUDA_STUB=1
  # shellcheck source=/dev/null
  . "$OUT_ABS/cuda-env.sh"
  "$OUT_ABS/mlops" --version 2>&1 | head -3 || true
  # (RUST_BACKTRACE=1 would append candle's captured backtrace to the message)
  env -u RUST_BACKTRACE -u RUST_LIB_BACKTRACE "$OUT_ABS/mlops" eval fixtures/golden/model.safetensors \
    --device cuda --data fixtures/mnist-tiny 2>&1 | head -3 || true )

T_END=$(date +%s)
SIZE=$(stat -c %s "$OUT_ABS/mlops")
RAW_SIZE=$(stat -c %s "$CARGO_TARGET_DIR/release/mlops")
echo
echo "== done"
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
printf 'binary        %s: %s bytes (%s MiB)%s\n' "$OUT_DIR/mlops" "$SIZE" "$(mib "$SIZE")" \
  "$([ "$STRIP" = 1 ] && echo ", stripped; $(mib "$RAW_SIZE") MiB as cargo built it")"
printf 'wall time     %ss total: toolchain %ss, cargo build %ss (-j%s)\n' \
  "$((T_END - T0))" "$((T_TC_DONE - T_TC))" "$((T_CARGO_DONE - T_CARGO))" "$JOBS"
echo "run-time libs ${CUDA_LIBS[*]}"
echo "run it with   $OUT_DIR/mlops-cuda ARGS   (or: source $OUT_DIR/cuda-env.sh; $OUT_DIR/mlops ARGS)"
