#!/usr/bin/env python3
"""The train-step benchmark's reference side: one LoRA training step with PyTorch +
transformers + PEFT on CPU, on the same token ids as nanofleet's train_step example.

Usage: train_step.py --gguf MODEL.gguf --tokens TOKENS.jsonl [--steps 5] [--threads 2]
                     [--rank 8] [--alpha 16]

TOKENS.jsonl is what `train_step --tokens-out` wrote: per example {"tokens", "prompt_len"},
each `seq + 1` tokens. The base model is loaded from the GGUF by transformers (dequantized to
float32); LoraConfig(r, lora_alpha, q_proj/v_proj, lora_dropout=0); AdamW (lr 1e-4, no weight
decay). The loss is nanofleet's: mean cross-entropy over the response tokens (positions from
prompt_len on), the logits computed at every position as transformers does. One warm-up step,
then --steps timed steps; prints one JSON line like the Rust side.
"""
import argparse
import os
os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF de-quantization progress bar
import json
import os
import statistics
import sys
import time


def peak_rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--tokens", required=True)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    args = p.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    from peft import LoraConfig, get_peft_model
    hf_logging.disable_progress_bar()

    rows = [json.loads(line) for line in open(args.tokens) if line.strip()]
    tokens = torch.tensor([r["tokens"] for r in rows], dtype=torch.long)
    batch, seq = tokens.shape[0], tokens.shape[1] - 1
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    # Input position c predicts token c + 1: a target when c + 1 >= prompt_len.
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    for i, r in enumerate(rows):
        mask[i, max(r["prompt_len"], 1) - 1:] = True

    started = time.time()
    path = os.path.abspath(args.gguf)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    model.config.use_cache = False
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=["q_proj", "v_proj"],
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.train()
    load_seconds = time.time() - started
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

    def step():
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    times, losses = [], []
    for i in range(args.steps + 1):
        t = time.time()
        loss = step()
        seconds = time.time() - t
        print(f"pytorch step {i}{' (warm-up)' if i == 0 else ''}: {seconds:.3f} s, loss {loss:.4f}",
              file=sys.stderr)
        losses.append(loss)
        if i > 0:
            times.append(seconds)
    median = statistics.median(times)
    print(json.dumps({
        "impl": "pytorch",
        "seconds_per_step": median,
        "tokens_per_s": batch * seq / median,
        "peak_rss_mib": peak_rss_mib(),
        "steps": args.steps,
        "step_seconds": times,
        "batch": batch,
        "seq": seq,
        "rank": args.rank,
        "alpha": args.alpha,
        "threads": args.threads,
        "load_seconds": load_seconds,
        "loss_first_step": losses[0],
        "loss_last_step": losses[-1],
        "versions": {"torch": torch.__version__,
                     "transformers": __import__("transformers").__version__,
                     "peft": __import__("peft").__version__},
    }))


if __name__ == "__main__":
    main()
