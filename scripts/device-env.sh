# On the GPU machine, sourced: the CUDA 13.0 runtime libraries there (never the link-time stub)
# and the assets device-setup.sh assembled. Then: /tmp/potptq quantize --device cuda ...
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export POTPTQ_ASSETS=/tmp/assets
