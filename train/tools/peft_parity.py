#!/usr/bin/env python3
"""PEFT parity: nanofleet's logits with a PEFT adapter against transformers + PEFT's.

Usage: peft_parity.py --gguf MODEL.gguf --logits LOGITS.json --adapter PEFT_DIR
                      [--tolerance-cosine 0.9] [--json OUT.json]

LOGITS.json is what nanofleet's `peft_logits` example wrote: per prompt the token ids and the
last-position logits without (`base`) and with (`adapted`) the adapter. This loads the same
GGUF with transformers (dequantized to float32), runs the same token ids (no tokenizer on this
side), then applies the adapter with PeftModel.from_pretrained and runs them again.

Three comparisons per prompt:
  base     nanofleet base vs transformers base: the base-model numerics alone (nanofleet runs
           the quantized weights with 8-bit-quantized activations; transformers dequantizes
           the same weights to f32 and keeps f32 activations);
  adapted  the same with the adapter on both sides;
  effect   the adapter's effect, logits_with − logits_without, on each side: the real test of
           the adapter's layout (names, A/B orientation, scaling, the q/k row permutation
           between HF and GGUF order).
A control shows the test's sensitivity: the adapter's q_proj part with its lora_B rows put in
GGUF (interleaved) order, i.e. the HF↔GGUF permutation forgotten, run through PEFT the same way;
the whole adapter's effect is dominated by v_proj (which needs no permutation), so the q_proj
and v_proj parts are also compared on their own.

Pass criterion: the effect cosine is at least --tolerance-cosine for the whole adapter and for
its q_proj and v_proj parts on every prompt, and the argmax agrees with and without the adapter
except on near-ties (top-2 gap within the base comparison's worst max|Δ|).

Tolerance (default 0.9), from the no-adapter baseline. On the quantized reference model
(Q4_1), nanofleet's 8-bit activations put its base logits at rel L2 0.01–0.10 (cosine ≥ 0.9986,
max|Δ| up to 1.35) from transformers' f32; an adapter part whose effect norm is only ~5× that
error keeps effect cosines of 0.95–0.98 even when its layout is right, while the control (q
permutation forgotten) falls to 0.25–0.78. 0.9 sits between the two. On an F32 GGUF requantized
from the same Q4_1 (same weights, f32 activations on both sides) the base error is numerical
noise and 0.999 is the right bar (peft-parity.sh: TOLERANCE_COSINE=0.999).
"""
import argparse
import os
os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF de-quantization progress bar
import json
import os
import shutil
import sys
import tempfile


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--logits", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--tolerance-cosine", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    data = json.load(open(args.logits))
    prompts = data["prompts"]
    path = os.path.abspath(args.gguf)

    def load_base():
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
        model.eval()
        return model

    def last_logits(model):
        out = []
        with torch.no_grad():
            for pr in prompts:
                ids = torch.tensor([pr["tokens"]], dtype=torch.long)
                out.append(model(input_ids=ids).logits[0, -1].double())
        return out

    base_model = load_base()
    hf_base = last_logits(base_model)
    config = base_model.config
    model = PeftModel.from_pretrained(base_model, args.adapter, adapter_name="full")
    hf = {"full": last_logits(model)}
    for module, subset in data["subsets"].items():
        model.load_adapter(subset, adapter_name=module)
        model.set_adapter(module)
        hf[module] = last_logits(model)

    # Control: the q_proj part with its B rows in GGUF (interleaved) order, i.e. the HF↔GGUF
    # permutation left out, run through PEFT the same way.
    heads = config.num_attention_heads
    q_dir = data["subsets"]["q_proj"]
    wrong = {}
    for name, t in load_file(os.path.join(q_dir, "adapter_model.safetensors")).items():
        if "lora_B" in name:
            out, rank = t.shape
            hd = out // heads
            t = t.reshape(heads, 2, hd // 2, rank).transpose(1, 2).reshape(out, rank).contiguous()
        wrong[name] = t
    control_dir = tempfile.mkdtemp(prefix="peft-control-")
    shutil.copy(os.path.join(q_dir, "adapter_config.json"), control_dir)
    save_file(wrong, os.path.join(control_dir, "adapter_model.safetensors"))
    model.load_adapter(control_dir, adapter_name="control")
    model.set_adapter("control")
    hf_control = last_logits(model)
    shutil.rmtree(control_dir)
    hf_adapted = hf["full"]

    def cos(a, b):
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0))

    def compare(a, b):
        return {
            "max_abs": float((a - b).abs().max()),
            "rel_l2": float((a - b).norm() / b.norm()),
            "cosine": cos(a, b),
            "argmax_nf": int(a.argmax()),
            "argmax_hf": int(b.argmax()),
            "argmax_agree": bool(a.argmax() == b.argmax()),
            "top5_overlap": len(set(a.topk(5).indices.tolist()) & set(b.topk(5).indices.tolist())),
        }

    rows = []
    for i, pr in enumerate(prompts):
        nf_base = torch.tensor(pr["base"], dtype=torch.float64)
        nf_adapted = torch.tensor(pr["adapted"], dtype=torch.float64)
        nf_effect = nf_adapted - nf_base
        hf_effect = hf_adapted[i] - hf_base[i]
        control_effect = hf_control[i] - hf_base[i]  # vs nanofleet's q_proj-only effect
        rows.append({
            "prompt": pr["messages"][-1]["content"],
            "tokens": len(pr["tokens"]),
            "base": compare(nf_base, hf_base[i]),
            "adapted": compare(nf_adapted, hf_adapted[i]),
            "effect": {
                "cosine": cos(nf_effect, hf_effect),
                "rel_l2": float((nf_effect - hf_effect).norm() / hf_effect.norm()),
                "max_abs": float((nf_effect - hf_effect).abs().max()),
                "norm_nf": float(nf_effect.norm()),
                "norm_hf": float(hf_effect.norm()),
                "max_abs_hf": float(hf_effect.abs().max()),
            },
            "control_effect_cosine": None,
        })
        for module in data["subsets"]:
            nf_e = torch.tensor(pr[f"adapted_{module}"], dtype=torch.float64) - nf_base
            hf_e = hf[module][i] - hf_base[i]
            rows[-1][f"effect_{module}"] = {
                "cosine": cos(nf_e, hf_e),
                "rel_l2": float((nf_e - hf_e).norm() / hf_e.norm()),
                "max_abs": float((nf_e - hf_e).abs().max()),
                "norm_nf": float(nf_e.norm()),
                "norm_hf": float(hf_e.norm()),
            }
            if module == "q_proj":
                rows[-1]["control_effect_cosine"] = cos(nf_e, control_effect)

    print(f"adapter: {args.adapter}")
    print(f"model:   {args.gguf}  (vocab {len(prompts[0]['base'])})")
    print()
    h = ("prompt", "tok", "cmp", "max|Δ|", "rel L2", "cosine", "argmax nf/hf", "top5∩")
    fmt = "{:<34} {:>4} {:<8} {:>8} {:>8} {:>9} {:>14} {:>5}"
    print(fmt.format(*h))
    for r in rows:
        label = (r["prompt"][:31] + "...") if len(r["prompt"]) > 34 else r["prompt"]
        for kind in ("base", "adapted"):
            c = r[kind]
            print(fmt.format(label if kind == "base" else "", r["tokens"] if kind == "base" else "",
                             kind, f"{c['max_abs']:.4f}", f"{c['rel_l2']:.5f}",
                             f"{c['cosine']:.6f}",
                             f"{c['argmax_nf']}/{c['argmax_hf']}{'' if c['argmax_agree'] else ' ✗'}",
                             c["top5_overlap"]))
        for kind, label in (("effect", "effect"), ("effect_q_proj", "effect q"),
                            ("effect_v_proj", "effect v")):
            e = r[kind]
            print(fmt.format("", "", label, f"{e['max_abs']:.4f}", f"{e['rel_l2']:.5f}",
                             f"{e['cosine']:.6f}", f"|e| {e['norm_nf']:.1f}/{e['norm_hf']:.1f}", ""))
        print(fmt.format("", "", "control", "", "", f"{r['control_effect_cosine']:.6f}",
                         "q, perm. off", ""))
    print()

    effects = ("effect", "effect_q_proj", "effect_v_proj")
    worst_base_rel = max(r["base"]["rel_l2"] for r in rows)
    worst_base_abs = max(r["base"]["max_abs"] for r in rows)
    worst_effect_cos = min(r[k]["cosine"] for r in rows for k in effects)
    best_control = max(r["control_effect_cosine"] for r in rows)

    # An argmax disagreement counts only where transformers' top two logits are further apart
    # than the base models' own worst max|Δ| (a near tie flips with base numerics alone).
    def argmax_ok(kind, i, r):
        if r[kind]["argmax_agree"]:
            return True
        logits = (hf_base if kind == "base" else hf_adapted)[i]
        top2 = logits.topk(2).values
        return float(top2[0] - top2[1]) <= worst_base_abs

    argmax_fine = all(argmax_ok(k, i, r) for i, r in enumerate(rows) for k in ("base", "adapted"))
    print(f"base-model numerics (no adapter): worst rel L2 {worst_base_rel:.5f}, "
          f"worst cosine {min(r['base']['cosine'] for r in rows):.6f}, "
          f"worst max|Δ| {worst_base_abs:.4f}")
    for k in effects:
        print(f"{k.replace('_', ' ')}: worst cosine {min(r[k]['cosine'] for r in rows):.6f}, "
              f"worst rel L2 {max(r[k]['rel_l2'] for r in rows):.5f}")
    print(f"control (q_proj part with the q permutation left out) vs nanofleet's q effect: "
          f"best cosine {best_control:.6f}")
    passed = argmax_fine and worst_effect_cos >= args.tolerance_cosine
    print(f"tolerance: effect cosine ≥ {args.tolerance_cosine} for the whole adapter, its q and its v "
          f"part on every prompt, and argmax agreement except near-ties (top-2 gap ≤ base max|Δ| "
          f"{worst_base_abs:.3f}) → {'PASS' if passed else 'FAIL'}")
    if args.json:
        json.dump({"rows": rows, "passed": passed}, open(args.json, "w"), indent=1)
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
