"""Where a profiled step spends its device time: a text summary of a jax.profiler trace.

`python -m semask_jax.bench --profile DIR` (or any `jax.profiler.start_trace(DIR)`) leaves
DIR/plugins/profile/<run>/<host>.trace.json.gz. This reads that file and prints, for the
accelerator's streams (the host's XLA threads on CPU):

  - busy time (union of kernels on all streams) against the traced span,
  - time per kernel category (matmul/conv, attention, transpose/copy, reduce, fusion, ...),
  - the top kernels by total time, with their XLA op names where the trace gives them,
  - with the XLA trace (*.xplane.pb) beside it and jax installed: each kernel's fusion in
    the optimised HLO module the trace carries (its computation and output shape), the
    device time per HLO computation (the entry, each
    while body: e.g. the loss's row blocks), per model part (the jax.named_scope names in
    its op_name, --scope_depth levels: backbone/layers.2, decode_head, loss, optimizer,
    forward and backward apart), and the HLO text (--hlo_dir).

So that a device session with no TensorBoard can bring back the few lines that say what
dominates, next to the (large) trace itself:

  python benchmarks/trace_summary.py DIR [--top 30] [--json out.json] [--hlo_dir DIR]
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


def _fields(buf: bytes):
  """(field number, wire type, value) of one protobuf message (wire format, no schema)."""
  i = 0

  def varint():
    nonlocal i
    shift = value = 0
    while True:
      byte = buf[i]
      i += 1
      value |= (byte & 0x7F) << shift
      shift += 7
      if byte < 0x80:
        return value

  while i < len(buf):
    key = varint()
    number, wire = key >> 3, key & 7
    if wire == 0:
      value = varint()
    elif wire == 1:
      value, i = buf[i:i + 8], i + 8
    elif wire == 5:
      value, i = buf[i:i + 4], i + 4
    elif wire == 2:
      n = varint()
      value, i = buf[i:i + n], i + n
    else:
      raise ValueError(f"protobuf wire type {wire}")
    yield number, wire, value


def _hlo_text(module_proto: bytes) -> str:
  """HLO text of a serialized HloModuleProto, with its metadata (op names) where this
  jaxlib can print them (jaxlib._hlo), else without (XlaComputation.as_hlo_text)."""
  try:
    from jaxlib import _hlo  # pylint: disable=g-import-not-at-top
    return _hlo.HloModule.from_serialized_hlo_module_proto(module_proto).to_string()
  except (ImportError, AttributeError):
    from jax._src.lib import xla_client  # pylint: disable=g-import-not-at-top
    return xla_client.XlaComputation(module_proto).as_hlo_text()


def hlo_modules(xplane: pathlib.Path) -> dict[str, str]:
  """HLO text of the optimised modules an XLA trace carries, by module name.

  XSpace.planes(1) > XPlane.event_metadata(4) > map value(2) > XEventMetadata.stats(5)
  > XStat.bytes_value(6) is an xla.HloProto, whose field 1 is the HloModuleProto;
  jaxlib turns that into text. Walked without the profiler's protos (no TensorBoard or
  XProf needed)."""

  def sub(buf, number):
    return [v for n, w, v in _fields(buf) if n == number and w == 2]

  texts = {}
  for plane in sub(xplane.read_bytes(), 1):
    for entry in sub(plane, 4):
      for meta in sub(entry, 2):
        for stat in sub(meta, 5):
          for blob in sub(stat, 6):
            try:
              module = sub(blob, 1)
              # An HloModuleProto has its name (1) and computations (3) as strings /
              # messages: skip other bytes stats before XLA's parser logs errors on them.
              if not module or not {1, 3} <= {n for n, w, _ in _fields(module[0]) if w == 2}:
                continue
              text = _hlo_text(module[0])
            except Exception:  # pylint: disable=broad-except
              continue  # another kind of bytes stat
            texts[text.split(",", 1)[0].removeprefix("HloModule ").strip()] = text
  return texts


_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?(\S+) = (.+?) (fusion|custom-call|copy|transpose|"
                          r"concatenate|slice|reduce|while|sort|scatter|gather)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?(\S+) (?:\(.*\) -> .* )?\{$")


_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Path components that JAX's transformations and control flow add to an op's name stack;
# what is left (before the primitive's own name) are the program's jax.named_scope names.
_JAX_NAME_TOKENS = frozenset({"while", "body", "cond", "closed_call", "checkpoint",
                              "rematted_computation", "remat", "custom_vjp_call",
                              "custom_jvp_call", "pjit", "scan", "vmap"})
_WRAPPED = re.compile(r"^([\w.]+)\((.*)\)$")


def model_part(op_name: str, depth: int = 2) -> str:
  """The named scopes of an HLO op's op_name, `depth` deep, with ' (backward)' for ops of
  a transpose (a gradient, rematerialised forward included): e.g.
  'jit(step)/transpose(jvp(backbone))/layers.2/blocks/dot_general' -> 'backbone/layers.2
  (backward)'. The model opens scopes named as its parameters (backbone/layers.{i}/blocks,
  decode_head, loss, optimizer, ...)."""
  tokens = op_name.split("/")[:-1]  # the last is the primitive
  parts, backward = [], False
  for token in tokens:
    inner = token
    while (m := _WRAPPED.match(inner)):
      if m.group(1) == "transpose":
        backward = True
      inner = "" if m.group(1) == "jit" else m.group(2)  # jit(f): a function, not a scope
    if (not inner or inner in _JAX_NAME_TOKENS or inner.startswith("branch_")
        or (parts and parts[-1] == inner)):  # transpose(jvp(x))/jvp(x): x once
      continue
    parts.append(inner)
  label = "/".join(parts[:depth]) or "(no scope)"
  return label + (" (backward)" if backward else "")


_PJIT = re.compile(r"^PjitFunction\((?:jit\()?([^()]+)\)?\)$")


def load_events(trace_file: pathlib.Path) -> list[dict[str, Any]]:
  """The trace's events (a GPU step's trace is tens of MB: read it once)."""
  data = json.load(gzip.open(trace_file))
  return data["traceEvents"] if isinstance(data, dict) else data


def executed_modules(events: list[dict[str, Any]]) -> set[str]:
  """Names of the HLO modules the trace ran ('jit_step' for PjitFunction(step) events)."""
  return {"jit_" + re.sub(r"\W", "_", m.group(1)) for e in events
          if (m := _PJIT.match(e.get("name", "")))}


def hlo_index(texts: dict[str, str], depth: int = 2,
              prefer: set[str] | frozenset[str] = frozenset()) -> dict[str, dict[str, str]]:
  """Kernel name -> {computation, shape, part} for every fusion / custom call of the
  modules (part: model_part of its op_name); kernel names are instruction names with
  '.' as '_' on GPU, as they are on CPU. The trace carries every module the process
  loaded, whose instruction names repeat ('fusion.3'): those of the `prefer` modules (the
  ones the trace ran) win."""
  index = {}
  for module, text in sorted(texts.items(), key=lambda kv: kv[0] in prefer):
    computation = "?"
    for line in text.splitlines():
      m = _COMPUTATION.match(line)
      if m:  # several modules (the step, a matmul, ...): computation names can repeat
        computation = f"{module}/{m.group(1)}" if len(texts) > 1 else m.group(1)
        continue
      m = _INSTRUCTION.match(line)
      if m:
        op = _OP_NAME.search(line)
        info = dict(computation=computation, shape=m.group(2)[:100],
                    part=model_part(op.group(1), depth) if op else "(no op_name)")
        index[m.group(1)] = info
        index[m.group(1).replace(".", "_")] = info
  return index


# On the CPU the thunk executor runs a kernel on whichever XLA thread is free, the client's
# thread included (under load it may run them all), and the trace also holds what is not a
# kernel: Python ("$..."), runtime calls ("ThunkExecutor::Execute", "SlinkyThreadPool::Await"),
# completion markers ("end: ynn_fusion") and control flow that encloses its body's kernels
# ("while.5"), which counted too would count the body twice.
_CPU_NOT_KERNEL = re.compile(r"^(\$|end: |(while|conditional|call)(\.\d+)?$)|::")


def _cpu_kernel(name: str) -> bool:
  return not _CPU_NOT_KERNEL.search(name)


def summarize(trace_file: pathlib.Path, top: int = 30,
              hlo: dict[str, dict[str, str]] | None = None,
              events: list[dict[str, Any]] | None = None) -> dict[str, Any]:
  """events: load_events(trace_file), if the caller has them already."""
  if events is None:
    events = load_events(trace_file)
  procs = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  device_pids = {p for p, n in procs.items() if "/device:" in n and "CPU" not in n}
  if device_pids:
    def keep(e):
      return e["pid"] in device_pids and "stream" in threads.get((e["pid"], e["tid"]), "").lower()
    source = ", ".join(procs[p] for p in sorted(device_pids))
  else:  # CPU: the host's XLA threads (the client's and the Eigen pool's).
    def keep(e):
      return ("XLA" in threads.get((e["pid"], e["tid"]), "") and _cpu_kernel(e["name"]))
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
  by_computation: dict[str, float] = collections.Counter()
  by_part: dict[str, float] = collections.Counter()
  if hlo:
    for n, (t, _, _) in by_name.items():
      by_computation[hlo.get(n, {}).get("computation", "(not in the HLO: library kernels)")] += t
      by_part[hlo.get(n, {}).get("part", "(not in the HLO: library kernels)")] += t
  return dict(
      trace=str(trace_file), source=source, kernels=len(kernels),
      distinct_kernels=len(by_name), span_ms=span / 1e3, busy_ms=busy / 1e3,
      kernel_sum_ms=total / 1e3, busy_fraction=busy / span if span else 0.0,
      categories={c: t / 1e3 for c, t in sorted(by_cat.items(), key=lambda kv: -kv[1])},
      top=[dict(name=n, ms=t / 1e3, share=t / total, count=c,
                ops=[o for o, _ in ops.most_common(3)], **(hlo or {}).get(n, {}))
           for n, (t, c, ops) in tops],
      computations={c: t / 1e3 for c, t in
                    sorted(by_computation.items(), key=lambda kv: -kv[1])[:top]},
      parts={c: t / 1e3 for c, t in sorted(by_part.items(), key=lambda kv: -kv[1])[:top]},
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
  if s.get("parts"):
    p("| model part (named scope) | ms | share |")
    p("|---|---|---|")
    for c, ms in s["parts"].items():
      p(f"| {c[:70]} | {ms:.1f} | {100 * ms / s['kernel_sum_ms']:.1f} % |")
  if s.get("computations"):
    p("| HLO computation | ms | share |")
    p("|---|---|---|")
    for c, ms in s["computations"].items():
      p(f"| {c[:60]} | {ms:.1f} | {100 * ms / s['kernel_sum_ms']:.1f} % |")
  p("| kernel | ms | share | count | XLA ops | HLO computation | shape |")
  p("|---|---|---|---|---|---|---|")
  for r in s["top"]:
    p(f"| {r['name'][:90]} | {r['ms']:.2f} | {100 * r['share']:.1f} % | {r['count']} "
      f"| {', '.join(o[:40] for o in r['ops'])} | {r.get('computation', '')[:40]} "
      f"| {r.get('shape', '')[:60]} |")


def main(argv: list[str] | None = None) -> dict[str, Any]:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("path", type=pathlib.Path, help="profile directory or *.trace.json.gz file")
  ap.add_argument("--top", type=int, default=30, help="how many kernels to list")
  ap.add_argument("--json", default=None, help="also write the summary here")
  ap.add_argument("--scope_depth", type=int, default=2,
                  help="named-scope levels per model part (2: backbone/layers.2, loss, ...)")
  ap.add_argument("--hlo_dir", default=None, type=pathlib.Path,
                  help="write the HLO text of the trace's modules here (<module>.hlo)")
  a = ap.parse_args(argv)
  trace = find_trace(a.path)
  xplanes = sorted(trace.parent.glob("*.xplane.pb"))
  texts = {}
  if xplanes:
    try:
      texts = hlo_modules(xplanes[0])
    except Exception as e:  # pylint: disable=broad-except
      print(f"# no HLO from {xplanes[0]}: {type(e).__name__}: {e}", file=sys.stderr)
  if a.hlo_dir and texts:
    a.hlo_dir.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
      (a.hlo_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.hlo").write_text(text)
  events = load_events(trace)
  s = summarize(trace, a.top, hlo_index(texts, a.scope_depth, executed_modules(events))
                if texts else None, events)
  print_summary(s)
  if a.json:
    pathlib.Path(a.json).write_text(json.dumps(s, indent=1))
  return s


if __name__ == "__main__":
  main()
