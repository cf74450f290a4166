#!/usr/bin/env bash
# Can this host run the CUDA image? Checked before `make up-gpu` / `make join-gpu` build 5.8 GB.
# The image's torch is PyPI's CUDA 13.0 build (docker/Dockerfile, TORCH_BUILD=cuda), which needs an
# NVIDIA driver of the 580 series or newer; older drivers leave the container without a GPU.
set -uo pipefail
MIN_DRIVER=${MIN_NVIDIA_DRIVER:-580}
failed=0

if ! runtimes=$(docker info --format '{{json .Runtimes}}' 2>&1); then
    echo "FAILED docker   cannot ask the Docker engine for its runtimes: $runtimes" >&2
    exit 1
fi
if [[ $runtimes == *'"nvidia"'* ]]; then
    echo "ok     runtime  Docker has the NVIDIA runtime"
else
    echo "FAILED runtime  Docker has no NVIDIA runtime (it knows: $runtimes). Install the NVIDIA Container" \
         "Toolkit (https://docs.nvidia.com/datacenter/cloud-native/container-toolkit/latest/install-guide.html)," \
         "then: sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl restart docker" >&2
    failed=1
fi

if ! command -v nvidia-smi >/dev/null; then
    echo "FAILED driver   no nvidia-smi on this host: install NVIDIA's driver, $MIN_DRIVER series or newer" \
         "(the CUDA image's torch is built for CUDA 13.0)" >&2
    failed=1
elif ! versions=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>&1) || [ -z "$versions" ]; then
    echo "FAILED driver   nvidia-smi found no GPU or no driver: ${versions:-no output}" >&2
    failed=1
else
    version=$(head -n1 <<<"$versions" | tr -d ' ')
    gpus=$(wc -l <<<"$versions")
    if [ "${version%%.*}" -ge "$MIN_DRIVER" ] 2>/dev/null; then
        echo "ok     driver   NVIDIA driver $version, $gpus GPU(s) (the CUDA image needs $MIN_DRIVER or newer)"
    else
        echo "FAILED driver   NVIDIA driver $version is older than $MIN_DRIVER, which the CUDA image's torch" \
             "(CUDA 13.0) needs: with it the containers see no GPU. Update the driver to the $MIN_DRIVER series or newer." >&2
        failed=1
    fi
fi
[ "$failed" = 0 ] || { echo "gpu-check: this host cannot run the CUDA image yet; fix the lines above (nothing was built)." >&2; exit 1; }
