"""GPU benchmark (run by bench/gpu.sh): ceilings, then GPT-2 small with the trainer vs bare.

    python -m bench.gpu [--batch 16] [--attention auto] [--out perf.jsonl]
    python -m bench.gpu --tiny          # the same code path at toy sizes, on any backend

1. Ceilings: a bf16 matmul (8192^3) and a streaming elementwise kernel (GB/s).
2. GPT-2 small (`trainer/configs/gpt2_small.py`: 124M parameters, T = 1024, bf16 compute,
   f32 parameters, AdamW): the trainer's `Loop` against a bare loop around the same
   compiled step, in paired rounds with an A/A control (bench.harness). Tokens/s and

     MFU_causal = tokens/s x (6 N + 6 L d T) / peak      (llm.c; MaxText since 2025)
     MFU_palm   = tokens/s x (6 N + 12 L d T) / peak     (PaLM, nanoGPT, nanochat)
     HFU_xla    = XLA's FLOP count of the lowered step / step time / peak

   with N every parameter once (tied head), and the peak the dense bf16 figure of the
   detected part: H100 SXM / H200 989.4 TFLOP/s, H100 PCIe 756 TFLOP/s. Each MFU is also
   given against the matmul ceiling measured in the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp

from bench import harness
from bench.harness import emit
from bench.job import Job, Trainer
from trainer.models import transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Dense bf16 peaks, most specific name first (llm.c and nanochat key on the same names).
PEAKS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.4e12), ("H200", 989.4e12),
         ("H800", 989.4e12), ("A100", 312e12))


def peak_flops(device_kind: str) -> float | None:
  for name, peak in PEAKS:
    if name.lower() in device_kind.lower():
      return peak
  return None


def _wall(fn, iters: int) -> float:
  jax.block_until_ready(fn())
  start = time.perf_counter()
  for _ in range(iters):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / iters


def ceilings(n: int, stream_mib: int, iters: int = 20) -> dict:
  """Achieved bf16 matmul FLOP/s and elementwise streaming bytes/s on this device."""
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (n, n), jnp.bfloat16)
  b = jax.random.normal(kb, (n, n), jnp.bfloat16)
  matmul = jax.jit(lambda a, b: a @ b)
  flops = 2 * n**3 / _wall(lambda: matmul(a, b), iters)
  x = jnp.ones((stream_mib * 2**20 // 4,), jnp.float32)
  stream = jax.jit(lambda x: x * 1.0001 + 1.0)
  bytes_per_s = 2 * x.nbytes / _wall(lambda: stream(x), iters)
  return {"matmul_bf16_flops": flops, "matmul_n": n, "stream_bytes_per_s": bytes_per_s}


def pick_attention(choice: str) -> str:
  """`cudnn` when asked, or for `auto` when cuDNN's fused attention compiles here."""
  if choice != "auto":
    return choice
  q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
  try:
    fn = jax.jit(lambda q: jax.nn.dot_product_attention(q, q, q, is_causal=True,
                                                         implementation="cudnn"))
    jax.block_until_ready(fn(q))
    return "cudnn"
  except Exception:  # pylint: disable=broad-except
    return "xla"


def load_config(args):
  spec = importlib.util.spec_from_file_location(
      "gpt2_small", os.path.join(ROOT, "trainer", "configs", "gpt2_small.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.train.batch_size = args.batch
  config.model.attention = args.attention
  if args.tiny:  # Same code path, toy sizes: for a CPU check of this script.
    config.model.update(vocab_size=512, seq_len=64, d_model=64, num_layers=2, num_heads=4)
    config.data.num_tokens = 100_000
  return config


def xla_flops(job: Job) -> float | None:
  """FLOPs XLA counts in the lowered (not yet optimised) step; no second compilation."""
  try:
    cost = job.step_fn.lower(job.strategy.to_device(job.state), job.batches[0]).cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) if cost and "flops" in cost else None


def _measure(job: Job, trainer: Trainer, prefetching: Trainer, args):
  """Warm-up, the transfer-guard check, then the paired rounds: (times, k, caught).

  `prefetching` is the same trainer with `train.prefetch=2` (batches built and
  transferred on a background thread): whether it gains here decides its default.
  """
  job.bare(2)
  step_s = job.bare(3).wall / 3
  trainer.warm_up(step_s)  # the loop's auto choices, made and compiled
  prefetching.warm_up(step_s)
  k = harness.steps_for(args.block, job.bare(3).wall / 3, lo=5, hi=200)
  caught = trainer.transfers_caught(k)
  harness.COMPILES.count = 0
  times = harness.paired_rounds({"bare": lambda: job.bare(k), "bare_again": lambda: job.bare(k),
                                 "trainer": lambda: trainer.run(k),
                                 "trainer_prefetch": lambda: prefetching.run(k)}, args.rounds)
  return times, k, caught


def _throughput(variant: str, times, k: int, job: Job, ceiling: dict | None,
                hlo: float | None) -> dict:
  """Tokens/s, MFU (causal and PaLM conventions) and HFU of one variant's median step."""
  m = job.config.model
  tokens = job.config.train.batch_size * m.seq_len
  n = transformer.num_params(job.state.params)
  peak = peak_flops(jax.devices()[0].device_kind)
  step = statistics.median(t.wall for t in times[variant]) / k
  record = {"bench": "gpt2", "metric": f"throughput ({variant})", "step_ms": step * 1e3,
            "tokens_per_s": tokens / step}
  for name, causal in (("mfu_causal", True), ("mfu_palm", False)):
    per_token = transformer.flops_per_token(num_params=n, num_layers=m.num_layers,
                                            d_model=m.d_model, seq_len=m.seq_len, causal=causal)
    achieved = tokens / step * per_token
    record[name] = achieved / peak if peak else None
    record[f"{name}_vs_ceiling"] = achieved / ceiling["matmul_bf16_flops"] if ceiling else None
  record["xla_flops_per_step"] = hlo
  record["hfu_xla"] = hlo / step / peak if hlo and peak else None
  return {key: round(v, 4) if isinstance(v, float) else v for key, v in record.items()}


def gpt2(args, ceiling: dict | None, workdir: str) -> None:
  config = load_config(args)
  start = time.perf_counter()
  job = Job(config)
  built = time.perf_counter()
  job.bare(1)
  compiled = time.perf_counter()
  trainer = Trainer(job, os.path.join(workdir, "trainer"))
  prefetching = Trainer(job, os.path.join(workdir, "trainer-prefetch"), prefetch=2)
  times, k, caught = _measure(job, trainer, prefetching, args)
  trainer.close()
  prefetching.close()
  m = config.model
  kind = jax.devices()[0].device_kind
  emit(harness.ratio_record(
      "gpt2", "trainer/bare", times, "trainer", "bare", target=1.02, device_kind=kind,
      peak_flops=peak_flops(kind), params=transformer.num_params(job.state.params),
      batch=config.train.batch_size, seq_len=m.seq_len, dtype=m.dtype, attention=m.attention,
      steps_per_block=k, steps_per_dispatch=trainer.loop.steps_per_dispatch,
      data_on_device=trainer.loop.data_on_device, build_s=round(built - start, 1),
      first_step_s=round(compiled - built, 1)))
  emit(harness.ratio_record("gpt2", "trainer with prefetch=2 / trainer", times,
                            "trainer_prefetch", "trainer", target=None,
                            steps_per_dispatch=prefetching.loop.steps_per_dispatch))
  hlo = xla_flops(job)
  emit(_throughput("bare", times, k, job, ceiling, hlo))
  record = _throughput("trainer", times, k, job, ceiling, hlo)
  record["target"] = "mfu_causal >= 0.40"
  mfu = record["mfu_causal"]
  record["verdict"] = "no peak known" if mfu is None else "pass" if mfu >= 0.40 else "fail"
  emit(record)
  emit({"bench": "gpt2", "metric": "implicit transfers (transfer_guard disallow)",
        "value": caught, "target": "none", "verdict": "pass" if caught == "none" else "fail"})
  emit({"bench": "gpt2", "metric": "recompiles during timed steps",
        "value": harness.COMPILES.count, "target": "0",
        "verdict": "pass" if harness.COMPILES.count == 0 else "fail"})


def main() -> None:
  parser = argparse.ArgumentParser(prog="python -m bench.gpu")
  parser.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
  parser.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"))
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--block", type=float, default=0.8, help="seconds per timed block")
  parser.add_argument("--tiny", action="store_true", help="toy sizes (CPU check)")
  parser.add_argument("--skip-ceilings", action="store_true")
  args = parser.parse_args()
  emit({"bench": "gpu", "metric": "machine", "value": harness.machine()})
  ceiling = None
  if not args.skip_ceilings:
    ceiling = ceilings(256 if args.tiny else 8192, 16 if args.tiny else 2048)
    kind = jax.devices()[0].device_kind
    peak = peak_flops(kind)
    emit({"bench": "gpu", "metric": "ceilings", "device_kind": kind,
          "matmul_bf16_tflops": round(ceiling["matmul_bf16_flops"] / 1e12, 2),
          "matmul_vs_peak": round(ceiling["matmul_bf16_flops"] / peak, 3) if peak else None,
          "stream_gb_per_s": round(ceiling["stream_bytes_per_s"] / 1e9, 1),
          "peak_bf16_tflops": peak / 1e12 if peak else None})
  args.attention = pick_attention(args.attention)
  with tempfile.TemporaryDirectory(prefix="jaxjob-gpu-bench-") as workdir:
    try:
      gpt2(args, ceiling, workdir)
    except Exception as e:  # pylint: disable=broad-except
      if args.attention != "cudnn":
        raise
      emit({"bench": "gpt2", "metric": "cudnn attention failed; retrying with xla",
            "value": f"{type(e).__name__}: {str(e)[:200]}"})
      args.attention = "xla"
      gpt2(args, ceiling, workdir)


if __name__ == "__main__":
  main()
