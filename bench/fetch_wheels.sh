#!/usr/bin/env bash
# Download (here, where the package registry is reachable) the wheels the GPU machine lacks, into .whl/ (ignored by
# git). The device image has torch, numpy, scipy, onnxruntime, prometheus-client, but not these. Its Python is 3.12.
# Then copy .whl/ to the GPU machine with the repository; bench/gpu_check.sh and bench/gpu_train.sh install them from there.
#   bash bench/fetch_wheels.sh            # all (~25 MB: the resemblyzer wheel carries GE2E's weights)
#   bash bench/fetch_wheels.sh train      # only what training imports (~2 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
train=(julius==0.2.8 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12)
rest=(Resemblyzer==0.1.4 grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 grpcio-status==1.85.3
      protobuf==7.36.2 googleapis-common-protos==1.76.0)
pkgs=("${train[@]}")
[[ "${1:-all}" == train ]] || pkgs+=("${rest[@]}")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${pkgs[@]}"
du -sh .whl
