"""Where a profiled step spends its device time: a text summary of a jax.profiler trace.

`python -m semask_jax.bench --profile DIR` (or any `jax.profiler.start_trace(DIR)`) leaves
DIR/plugins/profile/<run>/<host>.trace.json.gz. This reads that file and prints, for the
accelerator's streams (the host's XLA threads on CPU):

  - busy time (union of kernels on all streams) against the traced span,
  - time per kernel category (matmul/conv, attention, transpose/copy, reduce, fusion, ...),
  - the top kernels by total time, with their XLA op names where the trace gives them.

So that a device session with no TensorBoard can bring back the few lines that say what
dominates, next to the (large) trace itself:

  python benchmarks/trace_summary.py DIR [--top 30] [--json out.json]
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import sys
from typing import Any

# Ordered: the first pattern that matches a kernel's name (lower case) names its category.
CATEGORIES = (
    ("attention", r"flash|fmha|sdpa|dot_product_attention|cudnn.*attn|attn"),
    ("matmul/conv", r"gemm|xmma|nvjet|cutlass|wgmma|cublas|conv|dot|matmul|sm\d+_"),
    ("transpose/copy", r"transpose|copy|memcpy|memset|slice|concat|pad|dynamic.update"),
    ("reduce", r"reduce|reduction|argmax|softmax|norm"),
    ("sort/scatter/gather", r"sort|scatter|gather|select_and_scatter"),
    ("elementwise fusion", r"fusion|loop_|elementwise|convert|add|multiply"),
)


def find_trace(path: pathlib.Path) -> pathlib.Path:
  """The newest *.trace.json.gz under path (or path itself)."""
  if path.is_file():
    return path
  traces = sorted(path.rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
  if not traces:
    raise FileNotFoundError(f"no *.trace.json.gz under {path} (was it written by "
                            "jax.profiler.start_trace?)")
  return traces[-1]


def category(name: str) -> str:
  low = name.lower()
  for cat, pattern in CATEGORIES:
    if re.search(pattern, low):
      return cat
  return "other"


def _union_us(intervals: list[tuple[float, float]]) -> float:
  total, end = 0.0, float("-inf")
  for s, e in sorted(intervals):
    if s > end:
      total += e - s
      end = e
    elif e > end:
      total += e - end
      end = e
  return total


def summarize(trace_file: pathlib.Path, top: int = 30) -> dict[str, Any]:
  data = json.load(gzip.open(trace_file))
  events = data["traceEvents"] if isinstance(data, dict) else data
  procs = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  device_pids = {p for p, n in procs.items() if "/device:" in n and "CPU" not in n}
  if device_pids:
    def keep(e):
      return e["pid"] in device_pids and "stream" in threads.get((e["pid"], e["tid"]), "").lower()
    source = ", ".join(procs[p] for p in sorted(device_pids))
  else:  # CPU: the XLA compute threads of the host.
    def keep(e):
      t = threads.get((e["pid"], e["tid"]), "")
      return ("XLA" in t and "Client" not in t and not e["name"].startswith("$")
              and "::" not in e["name"])  # ThunkExecutor::Execute wraps the kernels
    source = "host XLA threads"
  kernels = [e for e in events if e.get("ph") == "X" and keep(e)]
  if not kernels:
    raise ValueError(f"{trace_file}: no kernel events for {source or 'any device'}; "
                     f"processes: {sorted(procs.values())}")
  span = (max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels))
  busy = _union_us([(e["ts"], e["ts"] + e["dur"]) for e in kernels])
  total = sum(e["dur"] for e in kernels)
  by_cat: dict[str, float] = collections.Counter()
  by_name: dict[str, list] = {}
  for e in kernels:
    args = e.get("args") or {}
    op = args.get("hlo_op") or args.get("long_name") or ""
    by_cat[category(e["name"] + " " + op)] += e["dur"]
    row = by_name.setdefault(e["name"], [0.0, 0, collections.Counter()])
    row[0] += e["dur"]
    row[1] += 1
    if op:
      row[2][op] += 1
  tops = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
  return dict(
      trace=str(trace_file), source=source, kernels=len(kernels),
      distinct_kernels=len(by_name), span_ms=span / 1e3, busy_ms=busy / 1e3,
      kernel_sum_ms=total / 1e3, busy_fraction=busy / span if span else 0.0,
      categories={c: t / 1e3 for c, t in sorted(by_cat.items(), key=lambda kv: -kv[1])},
      top=[dict(name=n, ms=t / 1e3, share=t / total, count=c,
                ops=[o for o, _ in ops.most_common(3)])
           for n, (t, c, ops) in tops],
  )


def print_summary(s: dict[str, Any], out=sys.stdout) -> None:
  p = lambda *a: print(*a, file=out)  # noqa: E731
  p(f"# {s['trace']} ({s['source']})")
  p(f"{s['kernels']} kernels ({s['distinct_kernels']} distinct); span {s['span_ms']:.1f} ms, "
    f"busy {s['busy_ms']:.1f} ms ({100 * s['busy_fraction']:.0f} %), "
    f"kernel time summed {s['kernel_sum_ms']:.1f} ms")
  p("| category | ms | share |")
  p("|---|---|---|")
  for c, ms in s["categories"].items():
    p(f"| {c} | {ms:.1f} | {100 * ms / s['kernel_sum_ms']:.1f} % |")
  p("| kernel | ms | share | count | XLA ops |")
  p("|---|---|---|---|---|")
  for r in s["top"]:
    p(f"| {r['name'][:90]} | {r['ms']:.2f} | {100 * r['share']:.1f} % | {r['count']} "
      f"| {', '.join(o[:40] for o in r['ops'])} |")


def main(argv: list[str] | None = None) -> dict[str, Any]:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("path", type=pathlib.Path, help="profile directory or *.trace.json.gz file")
  ap.add_argument("--top", type=int, default=30, help="how many kernels to list")
  ap.add_argument("--json", default=None, help="also write the summary here")
  a = ap.parse_args(argv)
  s = summarize(find_trace(a.path), a.top)
  print_summary(s)
  if a.json:
    pathlib.Path(a.json).write_text(json.dumps(s, indent=1))
  return s


if __name__ == "__main__":
  main()
