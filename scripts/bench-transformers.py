#!/usr/bin/env python3
"""The PyTorch + transformers side of scripts/bench-gpu (a reference on the device image, never a
tmkit dependency): eval-perplexity throughput (chunks of --ctx tokens, batch 1, the same protocol
as `tm-eval ppl`: every token after the first of a chunk is scored) and decode speed (a --prompt
token prefill, then --gen greedy steps over the KV cache, one token each), fp16, on cuda:0.
Prints one JSON object."""
import argparse, json, math, time

import numpy as np
import torch
from transformers import AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--tokens", required=True, help="int32 token ids")
ap.add_argument("--ctx", type=int, default=512)
ap.add_argument("--chunks", type=int, default=0, help="0: all")
ap.add_argument("--prompt", type=int, default=512)
ap.add_argument("--gen", type=int, default=128)
a = ap.parse_args()

torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float16).cuda().eval()
ids = np.fromfile(a.tokens, dtype="<i4")
chunks = len(ids) // a.ctx
if a.chunks:
    chunks = min(chunks, a.chunks)
with torch.inference_mode():
    x = torch.tensor(ids[: a.ctx], device="cuda", dtype=torch.long)[None]
    model(x)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    nll = 0.0
    for i in range(chunks):
        x = torch.tensor(ids[i * a.ctx : (i + 1) * a.ctx], device="cuda", dtype=torch.long)[None]
        logits = model(x).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").item()
    torch.cuda.synchronize()
    ppl_s = time.perf_counter() - t0

    prompt = torch.tensor(ids[: a.prompt], device="cuda", dtype=torch.long)[None]
    for rep in range(2):  # the first run warms up
        out = model(prompt, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(a.gen):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        tg_s = time.perf_counter() - t0

print(json.dumps({
    "model": a.model, "torch": torch.__version__, "transformers": __import__("transformers").__version__,
    "ppl": math.exp(nll / (chunks * (a.ctx - 1))), "chunks": chunks, "ctx": a.ctx,
    "ppl_tokens_per_second": chunks * a.ctx / ppl_s, "tg_tokens_per_second": a.gen / tg_s,
}))
