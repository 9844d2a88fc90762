"""``make demo``: load the embedded base, attach an SvdA adapter, generate, report its size.

python -m svda.runtime.demo [--base PATH] [--targets all-linear] [--prompt TEXT]
"""

from __future__ import annotations

import argparse
import time

import torch

from .base_model import load_base_model
from .methods import SvdaConfig
from .model import AdapterModel

DEFAULT_PROMPT = "In one sentence, what is a low-rank adapter for a language model?"


def generate(model: AdapterModel, tokenizer, prompt: str, max_new_tokens: int) -> str:
    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    if not isinstance(ids, torch.Tensor):  # newer tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=None, help="HF model folder (default: embedded SmolLM2)")
    parser.add_argument("--targets", default="all-linear", help="layers to adapt")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args()

    start = time.perf_counter()
    base = load_base_model(args.base)
    print(f"base model   {base.name}  ({time.perf_counter() - start:.1f} s, from {base.source})")
    model = AdapterModel(base.model)
    print(
        f"fingerprint  {model.fingerprint.short}…  ({len(model.fingerprint.layers)} target layers)"
    )

    start = time.perf_counter()
    model.add_adapter("demo", SvdaConfig(targets=args.targets))
    cache = model.svd_cache
    print(
        f"SvdA bases   {time.perf_counter() - start:.1f} s  "
        f"({cache.misses} layers computed, {cache.hits} from the cache in {cache.root})"
    )
    trainable = model.trainable_parameter_count("demo")
    total = sum(p.numel() for p in base.model.parameters())
    print(f"trainable    {trainable:,} parameters ({100 * trainable / total:.3f}% of {total:,})")
    print(f"adapter file ≈ {4 * trainable / 1024:.0f} KiB of float32 payload (s and b per layer)")

    model.set_adapter("demo")
    print(f"\nprompt       {args.prompt}")
    print(f"generation   {generate(model, base.tokenizer, args.prompt, args.max_new_tokens)}")
    print("(an untrained SvdA adapter has b = 0, so its output equals the base model's)")


if __name__ == "__main__":
    main()
