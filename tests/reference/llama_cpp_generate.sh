#!/usr/bin/env bash
# Greedy answers from llama.cpp itself for a GGUF (tests/reference/llama_cpp_generate.py):
#   bash tests/reference/llama_cpp_generate.sh DIR/merged.gguf "Is Osaka going to be windy today?"
# Installs llama-cpp-cffi (prebuilt llama.cpp, a cp311 wheel) into env/llama-cpp once. Its
# library wants __cxa_call_terminate from GCC 14's libstdc++, which Debian 12's lacks: a
# two-line shim, built here, is preloaded.
set -euo pipefail
cd "$(dirname "$0")/../.."
env=env/llama-cpp
if [ ! -x "$env/bin/python" ]; then
  python3 -m venv "$env"
  "$env/bin/pip" install --quiet llama-cpp-cffi==0.4.42 cffi
fi
if [ ! -f "$env/libcxa_shim.so" ]; then
  printf '%s\n' '#include <exception>' \
    'extern "C" __attribute__((visibility("default"), noreturn)) void __cxa_call_terminate(void *) noexcept { std::terminate(); }' \
    | g++ -O2 -shared -fPIC -x c++ -o "$env/libcxa_shim.so" -
fi
export LD_PRELOAD="$PWD/$env/libcxa_shim.so${LD_PRELOAD:+:$LD_PRELOAD}" LLAMA_CPP_BACKEND=cpu
exec "$env/bin/python" tests/reference/llama_cpp_generate.py "$@"
