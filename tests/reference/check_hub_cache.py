"""Check that webtune's Hub cache and Python's huggingface_hub read each other's files.

  python tests/reference/check_hub_cache.py MODEL_DIR

Serves MODEL_DIR as the Hub repo `org/demo` on 127.0.0.1 (file list, tree, resolve with
ETag / X-Repo-Commit, weights through a redirect with X-Linked-Etag / X-Linked-Size),
then: webtune downloads it (`webtune info --model org/demo`) and huggingface_hub reads
that cache offline; huggingface_hub downloads it (`snapshot_download`) and webtune
reads that cache offline (HF_HUB_OFFLINE=1). Prints what only one of the caches holds:
Python's own lock files and `trees/` listing cache.
"""

import hashlib
import http.server
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading

root = pathlib.Path(__file__).resolve().parents[2]
webtune = root / "target/release/webtune"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
files = {f.name: f.read_bytes() for f in pathlib.Path(sys.argv[1]).iterdir() if f.is_file()}


class Hub(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def send(self, code, headers, body=b""):
        self.send_response(code)
        for k, v in {**headers, "Content-Length": str(len(body) if code == 200 else headers.get("Content-Length", 0))}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = lambda self: self.do_GET()

    def do_GET(self):
        p = self.path.split("?")[0]
        js = lambda v: self.send(200, {"Content-Type": "application/json"}, json.dumps(v).encode())
        if p.startswith("/api/models/org/demo/revision/"):
            return js({"id": "org/demo", "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]})
        if p.startswith("/api/models/org/demo/tree/"):
            return js([{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()} for f, d in files.items()])
        if p.startswith("/cdn/"):
            return self.send(200, {}, files[p.split("/")[-1]])
        pre = "/org/demo/resolve/"
        f = p[len(pre):].split("/", 1)[-1] if p.startswith(pre) else None
        if f not in files:
            return self.send(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
        d = files[f]
        if f.endswith(".safetensors"):
            return self.send(302, {"Location": f"http://localhost:{self.server.server_port}/cdn/{f}", "X-Repo-Commit": COMMIT,
                                   "X-Linked-Etag": f'"{hashlib.sha256(d).hexdigest()}"', "X-Linked-Size": str(len(d))})
        return self.send(200, {"ETag": f'"{hashlib.sha1(d).hexdigest()}"', "X-Repo-Commit": COMMIT}, d)


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
threading.Thread(target=server.serve_forever, daemon=True).start()
endpoint = f"http://127.0.0.1:{server.server_port}"
tmp = pathlib.Path(tempfile.mkdtemp())
env = lambda cache, **kw: {**os.environ, "HF_HUB_CACHE": str(tmp / cache), **kw}
run = lambda cmd, e: subprocess.run(cmd, env=e, check=True, capture_output=True, text=True)
py = "from huggingface_hub import snapshot_download as s, hf_hub_download as h; print(s('org/demo'), h('org/demo', 'model.safetensors'))"

run([str(webtune), "info", "--model", "org/demo"], env("ours", HF_ENDPOINT=endpoint))
print("huggingface_hub reads webtune's cache:", run([sys.executable, "-c", py], env("ours", HF_HUB_OFFLINE="1")).stdout.strip())
run([sys.executable, "-c", "from huggingface_hub import snapshot_download; snapshot_download('org/demo')"], env("py", HF_ENDPOINT=endpoint))
out = run([str(webtune), "info", "--model", "org/demo"], env("py", HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:1")).stdout
print("webtune reads huggingface_hub's cache:", out.strip().splitlines()[-1])
listing = lambda c: sorted(str(p.relative_to(tmp / c)) for p in (tmp / c).rglob("*") if "models--" in str(p))
print("only in huggingface_hub's:", sorted(set(listing("py")) - set(listing("ours"))), "only in webtune's:", sorted(set(listing("ours")) - set(listing("py"))))
