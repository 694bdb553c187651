"""Layer 4: method-agnostic access to a Hugging Face causal LM — its parts (the architecture registry
applied), hooks, tokenisation, batching, context templates, teacher-forced scoring, fingerprints, tensor
files and the device policy. Knows nothing of editing methods or metrics."""
