"""A roofline of an optimised HLO module: bytes, FLOPs and a time bound per kernel and model part.

Between GPU leases the accelerator cannot be profiled, but XLA can still compile for it
(`benchmarks/gpu_aot_compile.py --hlo_out FILE`, deviceless). This reads that module's
scheduled HLO text and gives every kernel it would launch (each fusion, library call and
copy of the entry computation and of the while bodies, times their trip counts):

  - bytes: what it reads and writes in device memory (a fusion's parameters that it
    only slices count as their slices; an in-place dynamic-update-slice as its update),
  - FLOPs: of the cuBLAS gemms, the dots in Triton fusions, cuDNN convolutions and fused
    attention (element-wise work not counted),
  - a time bound: max(bytes / bandwidth, FLOPs / matmul rate) + a fixed launch cost.

Summed by kernel kind and by model part (the jax.named_scope names in the op_name, as in
trace_summary.py: backbone/layers.2, decode_head, loss, optimizer, forward and backward
apart). A kernel that moves far more bytes than its math needs shows up at the top; a
change to the model can be compared before / after on any CPU machine. The bound is a
floor, not a prediction: it knows nothing of uncoalesced transposes, occupancy or
overlap; the H200 leases measured ~102 ms of kernels per SeMask-B step (PERF_NOTES).

  python benchmarks/gpu_aot_compile.py --config configs/ade20k_semask_fpn.py:B \\
      --hlo_out /tmp/b_train.hlo
  python benchmarks/hlo_traffic.py /tmp/b_train.hlo [--top 25] [--json out.json]
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import pathlib
import re
import sys
from typing import Any, Iterator

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from trace_summary import model_part  # noqa: E402  pylint: disable=g-import-not-at-top

# H200 defaults: the bench's measured bf16 matmul rate (PERF_NOTES, leases 2-4) and ~85 %
# of the 4.8 TB/s HBM3e peak, what a streaming kernel reaches.
DEFAULT_MATMUL_FLOPS = 668e12
DEFAULT_BANDWIDTH = 4.0e12
DEFAULT_LAUNCH_US = 2.0

_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
          "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{$")
_LINE = re.compile(r"^\s+(ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_NOT_KERNELS = frozenset({
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while",
    "conditional", "call", "after-all", "partition-id", "replica-id", "opt-barrier",
    "add-dependency", "domain", "iota"})
_SLICING = frozenset({"slice", "dynamic-slice", "gather"})


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str
  opcode: str
  operands: list[str]
  attrs: str
  root: bool

  def attr(self, key: str) -> str | None:
    m = re.search(key + r"=%?([\w.\-]+)", self.attrs)
    return m.group(1) if m else None

  @property
  def target(self) -> str:
    """A custom call's target ('__cublas$lt$matmul', ...), '' for other instructions."""
    m = re.search(r'custom_call_target="([^"]+)"', self.attrs)
    return m.group(1) if m else ""


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  """(dtype, dims) of every array in an HLO shape string (a tuple has several)."""
  return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _ARRAY.findall(shape)]


def nbytes(shape: str) -> int:
  return sum(_BYTES[t] * math.prod(dims) for t, dims in arrays(shape))


def _split_operands(rest: str) -> tuple[list[str], str]:
  """The %operands inside the opcode's parentheses, and the attributes after them."""
  depth = 1
  for i, ch in enumerate(rest):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      return re.findall(r"%([\w.\-]+)", rest[:i]), rest[i + 1:]
  return re.findall(r"%([\w.\-]+)", rest), ""


def parse(text: str) -> tuple[dict[str, list[Instruction]], str]:
  """Computations of an HLO module text -> their instructions, and the entry's name."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    m = _HEADER.match(line)
    if m:
      current = comps.setdefault(m.group(2), [])
      entry = m.group(2) if m.group(1) else entry
      continue
    if line.startswith("}"):
      current = None
      continue
    m = _LINE.match(line)
    if m and current is not None:
      operands, attrs = _split_operands(m.group(5))
      current.append(Instruction(m.group(2), m.group(3), m.group(4), operands, attrs,
                                 bool(m.group(1))))
  if entry is None:
    raise ValueError("no ENTRY computation: not an HLO module text")
  return comps, entry


def executed(comps: dict[str, list[Instruction]], entry: str
             ) -> Iterator[tuple[Instruction, int, dict[str, Instruction]]]:
  """(instruction, times it runs per call of the module, its computation's symbol table)
  for every instruction of the computations that run as a sequence of kernels: the
  entry, while bodies (x their known trip count), conditional branches and calls."""
  stack = [(entry, 1)]
  while stack:
    name, times = stack.pop()
    table = {i.name: i for i in comps[name]}
    for inst in comps[name]:
      yield inst, times, table
      if inst.opcode == "while":
        n = re.search(r'"known_trip_count":\{"n":"(\d+)"', inst.attrs)
        stack.append((inst.attr("body"), times * (int(n.group(1)) if n else 1)))
      elif inst.opcode == "conditional":  # each branch counted (an upper bound)
        m = re.search(r"branch_computations=\{([^}]*)\}", inst.attrs)
        branches = (re.findall(r"%?([\w.\-]+)", m.group(1)) if m else
                    [inst.attr("true_computation"), inst.attr("false_computation")])
        stack.extend((branch, times) for branch in branches)
      elif inst.opcode == "call":
        stack.append((inst.attr("to_apply"), times))


def _fusion_bytes(inst: Instruction, table: dict[str, Instruction],
                  fused: list[Instruction]) -> int:
  """Bytes a fusion reads and writes: a parameter read only through slices counts as
  its slices; a dynamic-update-slice into a parameter (in place: XLA aliases the buffer)
  writes its update only and does not read the buffer."""
  users = collections.defaultdict(list)
  for i in fused:
    for o in i.operands:
      users[o].append(i)

  def through_bitcasts(name: str) -> list[Instruction]:
    out = []
    for u in users[name]:
      out.extend(through_bitcasts(u.name) if u.opcode == "bitcast" else [u])
    return out

  by_name = {i.name: i for i in fused}
  root_parts = [i for i in fused if i.root]
  if root_parts and root_parts[0].opcode == "tuple":
    root_parts = [by_name[o] for o in root_parts[0].operands if o in by_name]
  in_place = {r.operands[0] for r in root_parts
              if r.opcode == "dynamic-update-slice" and r.operands[0] in by_name}
  total = 0
  for r in root_parts:  # what it writes (an in-place update: the update, read below)
    total += (nbytes(by_name[r.operands[1]].shape) if r.opcode == "dynamic-update-slice"
              and r.operands[0] in in_place else nbytes(r.shape))
  for p in (i for i in fused if i.opcode == "parameter"):
    if p.name in in_place:
      continue
    uses = through_bitcasts(p.name)
    if uses and all(u.opcode in _SLICING and u.operands and
                    (u.operands[0] == p.name or by_name.get(u.operands[0], p).opcode == "bitcast")
                    for u in uses):
      total += min(nbytes(p.shape), sum(nbytes(u.shape) for u in uses))
    else:
      total += nbytes(p.shape)
  return total


def _gemm_flops(inst: Instruction, table: dict[str, Instruction]) -> float:
  out = arrays(inst.shape)[0][1]
  m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', inst.attrs)
  lhs = arrays(table[inst.operands[0]].shape)[0][1] if inst.operands[0] in table else ()
  k = math.prod(lhs[int(d.strip('"'))] for d in m.group(1).split(",") if d) if m and lhs else 0
  return 2.0 * math.prod(out) * k


def _conv_flops(inst: Instruction, table: dict[str, Instruction], target: str) -> float:
  """2 x MACs of a cuDNN convolution, its dim_labels read in forward terms (x, w -> y)."""
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", inst.attrs)
  shapes = [arrays(table[o].shape)[0][1] for o in inst.operands[:2] if o in table]
  out = arrays(inst.shape)[0][1]
  if not labels or len(shapes) < 2:
    return 0.0
  rhs = labels.group(2)
  if "BackwardFilter" in target:  # (x, dy) -> dw: each weight meets every output position
    w, dy = out, shapes[1]
    return 2.0 * math.prod(w) * math.prod(dy) / max(w[rhs.index("o")], 1)
  w = shapes[1]
  spatial = math.prod(w[j] for j, c in enumerate(rhs) if c not in "io")
  reduced = w[rhs.index("o")] if "BackwardInput" in target else w[rhs.index("i")]
  return 2.0 * math.prod(out) * spatial * reduced


def _dot_flops(comps: dict[str, list[Instruction]], name: str) -> float:
  """2 x MACs of the dots inside a fused computation (a Triton gemm fusion), nested ones
  included."""
  table = {i.name: i for i in comps.get(name, ())}
  flops = 0.0
  for inst in comps.get(name, ()):
    if inst.opcode == "dot" and inst.operands and inst.operands[0] in table:
      lhs = arrays(table[inst.operands[0]].shape)[0][1]
      dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.attrs)
      k = math.prod(lhs[int(d)] for d in dims.group(1).split(",") if d) if dims else 0
      flops += 2.0 * math.prod(arrays(inst.shape)[0][1]) * k
    elif inst.attr("calls") in comps:
      flops += _dot_flops(comps, inst.attr("calls"))
  return flops


def _attention_flops(inst: Instruction, table: dict[str, Instruction], target: str) -> float:
  """cuDNN fused attention: q, k, v [B, T, heads, d] (JAX's layout): 2 x (QK^T, PV) MACs
  forward; the backward recomputes QK^T and adds dV, dP, dQ, dK: 5 matmuls."""
  q = arrays(table[inst.operands[0]].shape)[0][1] if inst.operands[0] in table else ()
  if len(q) != 4:
    return 0.0
  return (10.0 if "Backward" in target else 4.0) * math.prod(q) * q[1]  # S = T: self-attention


def kind(inst: Instruction) -> str:
  if inst.opcode == "custom-call":
    t = inst.target or "?"
    return ("gemm" if "matmul" in t or "gemm" in t else "fused attention" if "fmha" in t
            else "convolution" if "conv" in t else "custom call: " + t)
  if inst.opcode == "fusion":
    m = re.search(r"kind=(k\w+)", inst.attrs)
    name = inst.name.lower()
    sub = ("transpose" if "transpose" in name else "reduce" if "reduce" in name
           else "concatenate" if "concatenate" in name else "slice" if "slice" in name
           else "other")
    if '"kind":"__triton' in inst.attrs:
      return "Triton fusion"
    return f"fusion {m.group(1) if m else '?'} ({sub})"
  return inst.opcode


def kernels(text: str) -> list[dict[str, Any]]:
  """Every kernel launch of the module per call: name, kind, part, times, bytes, flops."""
  comps, entry = parse(text)
  out = []
  for inst, times, table in executed(comps, entry):
    if inst.opcode in _NOT_KERNELS:
      continue
    flops = 0.0
    if inst.opcode == "fusion" and inst.attr("calls") in comps:
      moved = _fusion_bytes(inst, table, comps[inst.attr("calls")])
      flops = _dot_flops(comps, inst.attr("calls"))
    else:
      results = arrays(inst.shape)
      if inst.opcode == "custom-call":  # (results..., u8/s8 scratch workspace)
        while len(results) > 1 and results[-1][0] in ("s8", "u8"):
          results = results[:-1]
      moved = sum(_BYTES[t] * math.prod(d) for t, d in results)
      moved += sum(nbytes(table[o].shape) for o in inst.operands if o in table)
      target = inst.target
      if "matmul" in target or "gemm" in target:
        flops = _gemm_flops(inst, table)
      elif "fmha" in target:
        flops = _attention_flops(inst, table, target)
      elif "conv" in target:
        flops = _conv_flops(inst, table, target)
    op = re.search(r'op_name="([^"]*)"', inst.attrs)
    out.append(dict(name=inst.name, kind=kind(inst), shape=inst.shape.split("{")[0][:80],
                    part=model_part(op.group(1)) if op else "(no op_name)",
                    times=times, bytes=moved * times, flops=flops * times))
  return out


def summarize(text: str, bandwidth: float = DEFAULT_BANDWIDTH,
              matmul_flops: float = DEFAULT_MATMUL_FLOPS, launch_us: float = DEFAULT_LAUNCH_US,
              top: int = 25) -> dict[str, Any]:
  ks = kernels(text)
  for k in ks:
    k["time_ms"] = 1e3 * max(k["bytes"] / bandwidth, k["flops"] / matmul_flops) + (
        launch_us * 1e-3 * k["times"])

  def group(key: str) -> list[dict[str, Any]]:
    g = collections.defaultdict(lambda: dict(launches=0, bytes=0.0, flops=0.0, time_ms=0.0))
    for k in ks:
      row = g[k[key]]
      row["launches"] += k["times"]
      for f in ("bytes", "flops", "time_ms"):
        row[f] += k[f]
    return sorted(({key: name, **row} for name, row in g.items()), key=lambda r: -r["time_ms"])

  return dict(
      launches=sum(k["times"] for k in ks), bytes=sum(k["bytes"] for k in ks),
      flops=sum(k["flops"] for k in ks), time_ms=sum(k["time_ms"] for k in ks),
      matmul_ms=1e3 * sum(k["flops"] for k in ks) / matmul_flops,
      bandwidth=bandwidth, matmul_flops=matmul_flops, launch_us=launch_us,
      by_kind=group("kind"), by_part=group("part"),
      top=sorted(ks, key=lambda k: -k["time_ms"])[:top])


def print_summary(s: dict[str, Any], out=None) -> None:
  out = out or sys.stdout
  print(f"{s['launches']} kernel launches, {s['bytes'] / 1e9:.2f} GB moved, "
        f"{s['flops'] / 1e12:.2f} TFLOP in matmuls, convolutions and attention", file=out)
  print(f"time bound {s['time_ms']:.1f} ms at {s['bandwidth'] / 1e12:.2f} TB/s, "
        f"{s['matmul_flops'] / 1e12:.0f} TFLOP/s, {s['launch_us']:.1f} us per launch "
        f"(the matmuls alone: {s['matmul_ms']:.1f} ms, i.e. utilization <= "
        f"{s['matmul_ms'] / s['time_ms']:.3f})", file=out)
  for key, title in (("kind", "kernel kind"), ("part", "model part")):
    print(f"\n{title:<44} {'launches':>8} {'GB':>8} {'TFLOP':>7} {'ms':>7} {'%':>5}", file=out)
    for r in s[f"by_{key}"]:
      print(f"{r[key][:44]:<44} {r['launches']:>8} {r['bytes'] / 1e9:>8.2f} "
            f"{r['flops'] / 1e12:>7.2f} {r['time_ms']:>7.2f} "
            f"{100 * r['time_ms'] / s['time_ms']:>5.1f}", file=out)
  print(f"\n{'top kernels':<36} {'x':>3} {'GB':>7} {'ms':>6}  shape / part", file=out)
  for k in s["top"]:
    print(f"{k['name'][:36]:<36} {k['times']:>3} {k['bytes'] / 1e9:>7.3f} {k['time_ms']:>6.2f}  "
          f"{k['shape']}  {k['part']}", file=out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("hlo", type=pathlib.Path, help="optimised HLO text (gpu_aot_compile --hlo_out)")
  p.add_argument("--bandwidth", type=float, default=DEFAULT_BANDWIDTH, help="bytes/s")
  p.add_argument("--matmul_flops", type=float, default=DEFAULT_MATMUL_FLOPS, help="FLOP/s")
  p.add_argument("--launch_us", type=float, default=DEFAULT_LAUNCH_US)
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--json", type=pathlib.Path, help="also write the summary here")
  args = p.parse_args(argv)
  if not args.hlo.is_file():
    p.error(f"{args.hlo}: no such file")
  s = summarize(args.hlo.read_text(), args.bandwidth, args.matmul_flops, args.launch_us,
                args.top)
  print_summary(s)
  if args.json:
    args.json.write_text(json.dumps(s, indent=1))
  return s


if __name__ == "__main__":
  main()
