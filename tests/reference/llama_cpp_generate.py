#!/usr/bin/env python3
"""Greedy answers from llama.cpp itself (llama-cpp-cffi's C API) for a ChatML GGUF, such as
the merged model `webtune demo --model smollm2` writes. A maintainer's check, not run by CI.

Usage: bash tests/reference/llama_cpp_generate.sh MODEL.gguf "prompt 1" ["prompt 2" ...]
Env:   MAX_NEW (default 40), SYSTEM (default SmolLM2's system prompt), N_THREADS (default 2)
No transformers and no Hub: llama.cpp's own functions tokenize (parse_special=true), check
the prompt against the GGUF's chat template (llama_chat_apply_template), decode and sample
(greedy), stopping at an end-of-generation token.
"""
import os, sys, ctypes, glob
import llama                      # llama-cpp-cffi; initialises backend, silences logs
from llama import lib, ffi

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SYSTEM = os.environ.get("SYSTEM", DEFAULT_SYSTEM)
MAX_NEW = int(os.environ.get("MAX_NEW", "40"))
N_THREADS = int(os.environ.get("N_THREADS", "2"))

def build_info():
    so = glob.glob(os.path.join(os.path.dirname(llama.__file__), "_llama_cpp_cpu*.so"))[0]
    h = ctypes.CDLL(so)
    return "llama.cpp build %d (%s), %s, %s" % (
        ctypes.c_int.in_dll(h, "LLAMA_BUILD_NUMBER").value,
        ctypes.c_char_p.in_dll(h, "LLAMA_COMMIT").value.decode(),
        ctypes.c_char_p.in_dll(h, "LLAMA_COMPILER").value.decode(),
        ctypes.c_char_p.in_dll(h, "LLAMA_BUILD_TARGET").value.decode())

def chatml(user):
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
            f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")

def template_via_llama(model, user):
    """Format with llama.cpp's llama_chat_apply_template using the GGUF's own template string
    (llama.cpp detects ChatML from it); used only as a cross-check of chatml()."""
    tmpl = lib.llama_model_chat_template(model, ffi.NULL)
    if tmpl == ffi.NULL:
        return None
    keep = [ffi.new("char[]", s.encode()) for s in ("system", SYSTEM, "user", user)]
    msgs = ffi.new("struct llama_chat_message[2]")
    msgs[0].role, msgs[0].content, msgs[1].role, msgs[1].content = keep
    buf = ffi.new("char[]", 8192)
    n = lib.llama_chat_apply_template(tmpl, msgs, 2, True, buf, 8192)
    return ffi.buffer(buf, n)[:].decode() if n > 0 else None

def tokenize(vocab, text):
    b = text.encode()
    toks = ffi.new("llama_token[]", len(b) + 16)
    # add_special=False (GGUF says add_bos_token=false anyway), parse_special=True
    n = lib.llama_tokenize(vocab, b, len(b), toks, len(b) + 16, False, True)
    assert n >= 0, n
    return [toks[i] for i in range(n)]

def piece(vocab, tok, special=True):
    buf = ffi.new("char[]", 256)
    n = lib.llama_token_to_piece(vocab, tok, buf, 256, 0, special)
    return ffi.buffer(buf, n)[:]

def generate(model, vocab, prompt):
    cp = lib.llama_context_default_params()
    cp.n_ctx = 512; cp.n_batch = 512; cp.n_ubatch = 512
    cp.n_threads = N_THREADS; cp.n_threads_batch = N_THREADS
    ctx = lib.llama_init_from_model(model, cp)
    assert ctx != ffi.NULL
    smpl = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    lib.llama_sampler_chain_add(smpl, lib.llama_sampler_init_greedy())
    toks = tokenize(vocab, prompt)
    arr = ffi.new("llama_token[]", toks)
    rc = lib.llama_decode(ctx, lib.llama_batch_get_one(arr, len(toks)))
    assert rc == 0, rc
    out, stop = [], None
    one = ffi.new("llama_token[1]")
    for _ in range(MAX_NEW):
        t = lib.llama_sampler_sample(smpl, ctx, -1)
        if lib.llama_vocab_is_eog(vocab, t):
            stop = "eog token %d %r" % (t, piece(vocab, t).decode(errors="replace"))
            break
        out.append(t)
        one[0] = t
        rc = lib.llama_decode(ctx, lib.llama_batch_get_one(one, 1))
        assert rc == 0, rc
    lib.llama_sampler_free(smpl)
    lib.llama_free(ctx)
    text = b"".join(piece(vocab, t) for t in out).decode(errors="replace")
    return toks, out, text, stop or "max_new=%d reached" % MAX_NEW

def main():
    path, prompts = sys.argv[1], sys.argv[2:]
    print(build_info())
    mp = lib.llama_model_default_params(); mp.n_gpu_layers = 0
    model = lib.llama_model_load_from_file(path.encode(), mp)
    if model == ffi.NULL:
        sys.exit("llama_model_load_from_file failed for %s" % path)
    vocab = lib.llama_model_get_vocab(model)
    buf = ffi.new("char[]", 256); lib.llama_model_desc(model, buf, 256)
    print("model:", path, "|", ffi.string(buf).decode(), "| n_params", lib.llama_model_n_params(model))
    for p in prompts:
        prompt = chatml(p)
        via = template_via_llama(model, p)
        toks, out, text, stop = generate(model, vocab, prompt)
        print("=" * 70)
        print("USER:", p)
        print("chat template check (llama_chat_apply_template == manual ChatML):", via == prompt)
        print("prompt tokens (%d): %s" % (len(toks), toks))
        print("generated ids (%d): %s" % (len(out), out))
        print("stop:", stop)
        print("OUTPUT:", repr(text))
    lib.llama_model_free(model)

if __name__ == "__main__":
    main()
