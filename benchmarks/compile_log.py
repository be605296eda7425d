"""Where an XLA compile spends its time, from its own log: HLO passes and silent phases.

A cold compile of the SeMask-B training step takes ~200 s on an H200 (701 s of CPU), and
turning gemm autotuning off does not bring it near the 60 s target (PERF_NOTES.md). XLA
says where the rest goes when asked for its logs:

  TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=hlo_pass_pipeline=1,gpu_compiler=1,... \\
      python -m semask_jax.bench ... 2> compile.log
  python benchmarks/compile_log.py compile.log [--top 25] [--json out.json]

(`accelerator.sh`'s row `b_train_compile_log` does both.) From the glog lines this prints,
per HLO module:
  - the module's span (its first to its last log line),
  - the time per HLO pass pipeline and the top timed phases (XLA's own `LABEL time:`
    lines, HLO passes and compiler phases, summed over calls; nested timers overlap),
  - the longest silences on one thread: a gap between two consecutive lines of the same
    thread is work that logged nothing (LLVM, ptxas, autotuning, JAX's tracing), named
    by the line before it and the line after it.
"""
from __future__ import annotations

import argparse
import collections
import json
import pathlib
import re
import sys
from typing import Any

# I1126 14:53:33.349612   21301 hlo_pass_pipeline.cc:176] message
_LINE = re.compile(r"^[IWEF](\d{4}) (\d\d):(\d\d):(\d\d)\.(\d{6})\s+(\d+) ([\w.]+:\d+)\] (.*)$")
_PIPELINE = re.compile(r"Running HLO pass pipeline on module (\S+): (.*)$")
# XLA's ScopedLoggingTimer: "LABEL time: 1.13 s (1131744 us) (cumulative: ...)"; the
# HLO passes ("HLO pass: NAME time: ...") and compiler phases ("Compiling [m] for CPU
# using JIT time: ...") alike.
_TIMER = re.compile(r"^\s*(.*?) time: [^(]*\((\d+) us\)")


def _seconds(m: re.Match) -> float:
  _, hh, mm, ss, us = (int(g) for g in m.groups()[:5])
  return hh * 3600 + mm * 60 + ss + us / 1e6


def summarize(lines: list[str], top: int = 20) -> dict[str, Any]:
  """The summary of a log's lines (see the module docstring)."""
  modules: dict[str, dict[str, Any]] = {}
  last_on_thread: dict[str, tuple[float, str, str]] = {}
  module_of_thread: dict[str, str] = {}
  pipeline_names: set[str] = set()  # a nested pipeline ends with a pass line of its name
  gaps = []
  first = last = None
  parsed = 0
  for raw in lines:
    m = _LINE.match(raw.rstrip("\n"))
    if not m:
      continue
    parsed += 1
    t, thread, where, msg = _seconds(m), m.group(6), m.group(7), m.group(8)
    first = t if first is None else first
    last = t
    if (p := _PIPELINE.search(msg)):
      module_of_thread[thread] = p.group(1)
      mod = modules.setdefault(p.group(1), dict(
          start=t, end=t, pipelines=collections.Counter(), timers=collections.Counter(),
          pipeline=None))
      mod["pipeline"] = p.group(2)
      pipeline_names.add(p.group(2))
    module = module_of_thread.get(thread)
    if module:
      mod = modules[module]
      mod["end"] = max(mod["end"], t)
      if (p := _TIMER.search(msg)):
        label, sec = p.group(1).removeprefix("HLO pass: "), int(p.group(2)) / 1e6
        mod["timers"][label] += sec
        if p.group(1).startswith("HLO pass: ") and label not in pipeline_names:
          mod["pipelines"][mod["pipeline"]] += sec
    if thread in last_on_thread:  # a silence belongs to the module its thread was on
      t0, where0, msg0, module0 = last_on_thread[thread]
      gaps.append(dict(s=t - t0, after=f"{where0}] {msg0}"[:160], before=f"{where}] {msg}"[:160],
                       module=module0 or ""))
    last_on_thread[thread] = (t, where, msg, module)
  if not parsed:
    raise ValueError("no glog lines found (was it run with TF_CPP_MIN_LOG_LEVEL=0 and "
                     "TF_CPP_VMODULE=hlo_pass_pipeline=1,...?)")
  gaps.sort(key=lambda g: -g["s"])
  return dict(
      lines=parsed, span_s=(last - first) if first is not None else 0.0,
      modules={name: dict(
          span_s=mod["end"] - mod["start"], passes_s=sum(mod["pipelines"].values()),
          pipelines=dict(mod["pipelines"].most_common(top)),
          timers=dict(mod["timers"].most_common(top)))
               for name, mod in sorted(modules.items(),
                                       key=lambda kv: kv[1]["start"] - kv[1]["end"])},
      silences=gaps[:top])


def print_summary(s: dict[str, Any], top_modules: int = 3, out=sys.stdout) -> None:
  p = lambda *a: print(*a, file=out)  # noqa: E731
  p(f"{s['lines']} log lines over {s['span_s']:.1f} s")
  p("| module | span s | in HLO passes s |")
  p("|---|---|---|")
  for name, mod in s["modules"].items():
    p(f"| {name[:60]} | {mod['span_s']:.1f} | {mod['passes_s']:.1f} |")
  for name, mod in list(s["modules"].items())[:top_modules]:
    p(f"\n{name}: pipelines")
    p("| pipeline | s |")
    p("|---|---|")
    for pipe, sec in mod["pipelines"].items():
      p(f"| {pipe[:70]} | {sec:.2f} |")
    p(f"\n{name}: timed phases (passes and compiler phases; nested ones overlap)")
    p("| phase | s |")
    p("|---|---|")
    for name_, sec in mod["timers"].items():
      p(f"| {name_[:70]} | {sec:.2f} |")
  p("\nlongest silences on one thread")
  p("| s | module | after | before |")
  p("|---|---|---|---|")
  for g in s["silences"]:
    p(f"| {g['s']:.2f} | {g['module'][:30]} | {g['after'][:80]} | {g['before'][:80]} |")


def main(argv: list[str] | None = None) -> dict[str, Any]:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("log", type=pathlib.Path, help="stderr of a run with XLA's glog lines")
  ap.add_argument("--top", type=int, default=20)
  ap.add_argument("--json", default=None, help="also write the summary here")
  a = ap.parse_args(argv)
  with open(a.log, errors="replace") as f:
    s = summarize(f.readlines(), a.top)
  print_summary(s)
  if a.json:
    pathlib.Path(a.json).write_text(json.dumps(s, indent=1))
  return s


if __name__ == "__main__":
  main()
