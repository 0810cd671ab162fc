#!/usr/bin/env bash
# Build every TensorRT precision of one model and evaluate it beside Keras and ONNX Runtime on an ImageNet
# folder. Run on a machine with an NVIDIA GPU and TensorRT (e.g. inside docker/Dockerfile.gpu).
#
#   scripts/trt_smoke.sh IMAGENET_DIR [MODEL] [LIMIT] [OUT]
#   scripts/trt_smoke.sh /data/imagenet/val efficientnet_lite0 1000 runs/trt-smoke
#   CUDA_GRAPH=1 scripts/trt_smoke.sh /data/imagenet/val
set -euo pipefail
DATA=${1:?usage: scripts/trt_smoke.sh IMAGENET_DIR [MODEL] [LIMIT] [OUT]}
MODEL=${2:-efficientnet_lite0}
LIMIT=${3:-1000}
OUT=${4:-runs/trt-smoke-$MODEL}

python3 -c "import tensorrt; print('TensorRT', tensorrt.__version__)"
python3 -c "from quantship.cuda import device_info; print(device_info())"

MAJOR=$(python3 -c "import tensorrt; print(tensorrt.__version__.split('.')[0])")
if [ "$MAJOR" -ge 11 ]; then
    # TensorRT 11 is strongly typed: no implicit int8 calibration.
    TRT_TARGETS=trt-fp32,trt-fp16,trt-int8-qdq
else
    TRT_TARGETS=trt-fp32,trt-fp16,trt-int8-entropy,trt-int8-max,trt-int8-qdq
fi

# CUDA_GRAPH=1 runs the engines through captured CUDA graphs.
quantship eval --model "$MODEL" --data "imagenet:$DATA" --limit "$LIMIT" --calib-images 500 \
    --targets "keras-fp32,onnx-fp32,qdq-int8-entropy,$TRT_TARGETS" \
    --trt-timing-cache "$OUT/timing.cache" ${CUDA_GRAPH:+--trt-cuda-graph} --out "$OUT"
echo "results: $OUT/results.md"
