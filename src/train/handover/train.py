#!/usr/bin/env python3
"""A webtune run handed over to TRL + accelerate (written by `webtune export-run`).

It trains exactly the tokens webtune trains. `train.jsonl` holds the sequences of every
optimizer step in webtune's order, as webtune trains them: nothing is re-tokenized and
nothing is shuffled. `run.json` holds the rest: the base model, the LoRA config (the
starting adapter is in `initial-adapter/`), the optimizer, the schedule, the batch and
DPO's settings. See README.md for the launch commands.

    python train.py [--out DIR] [--per-device-batch N] [--cpu]
    accelerate launch --config_file accelerate/ddp.yaml --num_processes 8 train.py
    accelerate launch --multi_gpu --num_processes 2 train.py --cpu    # DDP over gloo, no GPU
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def per_device_split(rows_per_step, processes, cap):
    """(per-device batch, accumulation) with batch × accumulation × processes equal to
    the effective batch, the per-device batch as large as `cap` allows."""
    if rows_per_step % processes:
        sys.exit(
            f"the effective batch is {rows_per_step} rows a step, which {processes} processes cannot share "
            f"evenly: launch a number of processes that divides {rows_per_step}"
        )
    local = rows_per_step // processes
    per = max(1, min(cap, local))
    while local % per:
        per -= 1
    return per, local // per


def read_rows(name):
    import datasets

    return datasets.load_dataset("json", data_files=os.path.join(HERE, name), split="train")


def sft_collate(pad_token_id):
    """Right-pad a micro-batch as webtune does: padding is a segment of its own (its
    positions restart at 0) and never a target. No attention mask is passed, so
    transformers finds the packed examples from the positions and keeps attention
    within each."""
    import torch

    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids, labels, pos = [], [], []
        for r in rows:
            pad = width - len(r["input_ids"])
            ids.append(r["input_ids"] + [pad_token_id] * pad)
            labels.append(r["labels"] + [-100] * pad)
            pos.append(r["position_ids"] + list(range(pad)))
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(pos)}

    return collate


class MetricsFile:
    """`out/metrics.jsonl` under webtune's names, so the two runs' curves line up."""

    NAMES = {"loss": "loss", "grad_norm": "grad_norm", "eval_loss": "valid_loss"}

    def __init__(self, path):
        self.path = path
        self.lr = {}
        self.rows = {}

    def callback(self):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
                # The learning rate this step uses (the logged one is the next step's).
                if optimizer is not None:
                    outer.lr[state.global_step + 1] = optimizer.param_groups[0]["lr"]

            def on_log(self, args, state, control, logs=None, **kwargs):
                if not state.is_world_process_zero or not logs:
                    return
                row = outer.rows.setdefault(state.global_step, {"step": state.global_step})
                for key, value in logs.items():
                    if key in outer.NAMES:
                        row[outer.NAMES[key]] = value
                    elif key.startswith(("rewards/", "logps/")):
                        row[key] = value
                    elif key.startswith("eval_rewards/") or key.startswith("eval_logps/"):
                        row["valid_" + key[len("eval_"):]] = value
                if state.global_step in outer.lr:
                    row["lr"] = outer.lr[state.global_step]
                outer.write()

        return Callback()

    def write(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "w") as f:
            for step in sorted(self.rows):
                f.write(json.dumps(self.rows[step]) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(HERE, "out"), help="where the adapter (or model), checkpoints and metrics go")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU (with several processes: DDP over gloo)")
    parser.add_argument("--per-device-batch", type=int, default=None, help="the most rows a device takes at once (default: webtune's --batch-size)")
    args = parser.parse_args()

    with open(os.path.join(HERE, "run.json")) as f:
        run = json.load(f)

    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    per_device, accumulation = per_device_split(run["rows_per_step"], processes, args.per_device_batch or run["batch_size"])

    load = {"dtype": torch.float32}
    if run["gguf_file"]:
        load["gguf_file"] = run["gguf_file"]
    if run["quantization"] == "nf4":
        load["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=False,
            bnb_4bit_compute_dtype=torch.float32,
        )
    model = AutoModelForCausalLM.from_pretrained(run["model"], **load)
    tokenizer = transformers.AutoTokenizer.from_pretrained(run["model"], **({"gguf_file": run["gguf_file"]} if run["gguf_file"] else {}))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = run["pad_token_id"]
    if run["tuning"] == "lora":
        import peft

        if run["quantization"]:
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=run["gradient_checkpointing"])
        # webtune's starting adapter: its config is webtune's LoRA config (r, alpha,
        # dropout, targets, rsLoRA), its A's the ones webtune drew from the seed.
        model = peft.PeftModel.from_pretrained(model, os.path.join(HERE, run["initial_adapter"]), is_trainable=True)

    train = read_rows(run["train_file"])
    valid = read_rows(run["valid_file"]) if run["valid_file"] else None
    every = run["eval_every"]
    common = dict(
        output_dir=args.out,
        max_steps=run["steps"],
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        # All the validation rows in one batch per process, up to 64: the loss is then
        # the mean over their tokens, as webtune's valid_loss.
        per_device_eval_batch_size=min(64, -(-len(valid) // processes)) if valid is not None else per_device,
        learning_rate=run["lr"],
        lr_scheduler_type=run["lr_scheduler_type"],
        warmup_steps=run["warmup_steps"],
        weight_decay=run["weight_decay"],
        adam_beta1=run["adam_beta1"],
        adam_beta2=run["adam_beta2"],
        adam_epsilon=run["adam_epsilon"],
        max_grad_norm=run["max_grad_norm"],
        seed=run["seed"],
        data_seed=run["seed"],
        # webtune's order: each step takes the next rows_per_step rows.
        train_sampling_strategy="sequential",
        dataloader_drop_last=False,
        logging_steps=1,
        eval_strategy="steps" if every else "no",
        eval_steps=every,
        save_strategy="steps" if run["save_every"] else "no",
        save_steps=run["save_every"],
        gradient_checkpointing=run["gradient_checkpointing"],
        bf16=False,
        fp16=False,
        use_cpu=args.cpu,
        report_to=[],
    )

    class SameOptimizer:
        """AdamW over every trained tensor, weight decay on all of them, as webtune
        (transformers' default leaves biases and norms undecayed)."""

        def create_optimizer(self, *a, **k):
            if self.optimizer is None:
                params = [p for p in self.model.parameters() if p.requires_grad]
                self.optimizer = torch.optim.AdamW(
                    params,
                    lr=run["lr"],
                    betas=(run["adam_beta1"], run["adam_beta2"]),
                    eps=run["adam_epsilon"],
                    weight_decay=run["weight_decay"],
                )
            return self.optimizer

    metrics = MetricsFile(os.path.join(args.out, "metrics.jsonl"))
    if run["method"] == "sft":

        class Trainer(SameOptimizer, trl.SFTTrainer):
            pass

        config = trl.SFTConfig(
            **common,
            dataset_kwargs={"skip_prepare_dataset": True},
            remove_unused_columns=False,
            max_length=None,
            packing=False,
        )
        extra = {"data_collator": sft_collate(run["pad_token_id"])}
    else:
        dpo = run["dpo"]

        class Trainer(SameOptimizer, trl.DPOTrainer):
            def _prepare_dataset(self, dataset, *a, **k):
                # Already tokenized by webtune: prompt_ids, chosen_ids, rejected_ids.
                return dataset

        loss_type, weights = [dpo["loss_type"]], None
        if dpo["rpo_alpha"]:
            loss_type, weights = [dpo["loss_type"], "sft"], [1.0, dpo["rpo_alpha"]]
        config = trl.DPOConfig(
            **common,
            beta=dpo["beta"],
            loss_type=loss_type,
            loss_weights=weights,
            label_smoothing=dpo["label_smoothing"],
            disable_dropout=dpo["disable_dropout"],
            max_length=run["max_seq_len"],
        )
        extra = {}
    trainer = Trainer(
        model=model,
        args=config,
        train_dataset=train,
        eval_dataset=valid,
        processing_class=tokenizer,
        callbacks=[metrics.callback()],
        **extra,
    )
    if trainer.is_world_process_zero():
        print(f"{processes} process(es) x {per_device} rows x {accumulation} accumulation = {run['rows_per_step']} rows a step, {run['steps']} steps")
    trainer.train()
    trainer.save_model(args.out)
    if trainer.is_world_process_zero():
        print(f"trained {run['steps']} steps; the result is in {args.out}")


if __name__ == "__main__":
    main()
