"""What a compiled (per-device SPMD) HLO module does per step, read from its text: no JAX import.

* Loops: XLA's cost_analysis() counts a while body once, whatever its trip count (lax.scan, layers_per_scan,
  gradient accumulation). The trip count of each while is read from `known_trip_count` when the backend writes it,
  else from the pattern `compare(get-tuple-element(param, k), constant(N)), direction=LT` of its condition with a
  constant initial value of element k (XLA:TPU writes no known_trip_count). Each computation is weighted by the
  trip counts of the loops around it; loops whose count cannot be read stay at 1 and are reported.
* Convolution and dot FLOPs per computation, counted as XLA's HloCostAnalysis does (window positions that read
  only padding count nothing: XLA:TPU writes some 1x1 convolutions as convolutions with large padded windows), so
  the difference between weighted and once-counted FLOPs corrects cost_analysis().
* Cross-device collectives (all-reduce, all-gather, reduce-scatter, collective-permute, all-to-all; sync or
  `-start`, never `-done` too) with their operand bytes and group sizes, and the cross-slice sends of multislice.
* Memory traffic where the backend's cost_analysis() gives none (XLA:GPU): the operand and result bytes of every
  kernel (each instruction outside fused computations), weighted by loop trips. A model: it counts each kernel's
  full operands once and ignores caches.
* Kernels per step by kind: the custom calls by target (cuDNN convolutions, cuBLAS GEMMs), GEMM fusions (Triton),
  other fusions, and unfused convolutions and dots.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

DTYPE_BYTES = {'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 's32': 4, 'u32': 4, 's64': 8,
               'u64': 8, 'f16': 2, 'bf16': 2, 'f32': 4, 'f64': 8, 'c64': 8, 'c128': 16, 'f8e4m3fn': 1, 'f8e5m2': 1}
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute', 'all-to-all',
               'ragged-all-to-all', 'collective-broadcast')
MULTISLICE_SEND = 'dcn-send (multislice)'

# Names carry a '%' in compiled modules' text, none in the text of a module before optimization.
_HEADER = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\)\s*->\s*.*)?\{\s*$')
_INSTR = re.compile(r'^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$')
_SHAPE = re.compile(r'\b([a-z]\w*)\[([\d,]*)\]')
_CALLEES = re.compile(r'\b(calls|to_apply|body|condition|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)')
_NAME = re.compile(r'%([\w.\-]+)')
_BARE_NAME = re.compile(r'[A-Za-z_][\w.\-]*')


def _names(text: str) -> list[str]:
  return _NAME.findall(text) if '%' in text else _BARE_NAME.findall(text)


def shapes(text: str) -> list[tuple[int, ...]]:
  return [tuple(int(d) for d in dims.split(',') if d) for dtype, dims in _SHAPE.findall(text) if dtype in DTYPE_BYTES]


def nbytes(text: str) -> float:
  return sum(DTYPE_BYTES[t] * math.prod(int(d) for d in dims.split(',') if d)
             for t, dims in _SHAPE.findall(text) if t in DTYPE_BYTES)


@dataclasses.dataclass
class Instr:
  name: str
  type: str
  op: str
  rest: str  # operands, then attributes

  @property
  def operands(self) -> list[str]:
    depth = 1
    for i, ch in enumerate(self.rest):
      depth += (ch == '(') - (ch == ')')
      if depth == 0:
        return _names(self.rest[:i])
    return _names(self.rest)

  def attr(self, key: str) -> str | None:
    m = re.search(r'\b' + key + r'=(\{[^}]*\}|[^,\s]+)', self.rest)
    return m.group(1) if m else None

  def leading_int(self) -> int | None:
    m = re.match(r'\s*(-?\d+)', self.rest)
    return int(m.group(1)) if m else None


@dataclasses.dataclass
class Computation:
  name: str
  entry: bool
  instrs: dict[str, Instr]
  root: Instr | None = None


def parse(text: str) -> dict[str, Computation]:
  comps, cur = {}, None
  for line in text.splitlines():
    if cur is None:
      m = _HEADER.match(line)
      if m and not line.startswith(' '):
        cur = Computation(m.group(2), bool(m.group(1)), {})
    elif line.startswith('}'):
      comps[cur.name], cur = cur, None
    elif m := _INSTR.match(line):
      ins = Instr(m.group(2), m.group(3), m.group(4), m.group(5))
      cur.instrs[ins.name] = ins
      if m.group(1):
        cur.root = ins
  return comps


def trip_count(loop: Instr, parent: Computation, comps: dict[str, Computation]) -> int | None:
  """How many times a while runs, or None when it cannot be read from the text."""
  if m := re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.rest):
    return int(m.group(1))
  cond = comps.get((loop.attr('condition') or '').lstrip('%'))
  if cond is None or cond.root is None:
    return None
  compare, lookup = cond.root, cond.instrs.get
  if compare.op == 'fusion':  # the compare inside a fusion: map its parameters to the fusion's operands
    fused = comps.get((compare.attr('calls') or '').lstrip('%'))
    if fused is None or fused.root is None:
      return None
    outer = compare.operands
    params = {i.name: cond.instrs.get(outer[i.leading_int()]) for i in fused.instrs.values()
              if i.op == 'parameter' and i.leading_int() < len(outer)}
    compare, lookup = fused.root, lambda n, p=params, f=fused: p.get(n) or f.instrs.get(n)
  if compare.op != 'compare':
    return None
  a, b = (lookup(n) for n in compare.operands[:2])
  direction = compare.attr('direction')
  if direction == 'GT':
    a, b, direction = b, a, 'LT'
  if a is None or b is None or direction not in ('LT', 'LE') or a.op != 'get-tuple-element' or b.op != 'constant':
    return None
  init = parent.instrs.get(loop.operands[0]) if loop.operands else None
  k = int(a.attr('index'))
  if init is None or init.op != 'tuple' or k >= len(init.operands):
    return None
  start = parent.instrs.get(init.operands[k])
  while start is not None and start.op in ('copy', 'bitcast', 'convert') and start.operands:
    start = parent.instrs.get(start.operands[0])
  if start is None or start.op != 'constant':
    return None
  return max(0, b.leading_int() - start.leading_int() + (direction == 'LE'))


def group_size(ins: Instr, num_partitions: int) -> int:
  """Devices per replica group: `{{0,1,2,3}}`, iota `[groups,size]<=[n]`, `mesh['data'=4] {'data'}`, or a part
  of a mesh axis, `mesh['data'=64] {'data':(4)16}` (its minor 16 devices: 4 groups of 16 consecutive devices)."""
  if m := re.search(r'replica_groups=\{\{([\d,]*)\}', ins.rest):
    return len([x for x in m.group(1).split(',') if x])
  if m := re.search(r'replica_groups=\[(\d+),(\d+)\]<=', ins.rest):
    return int(m.group(2))
  if m := re.search(r'replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}', ins.rest):
    sizes = {k: int(v) for k, v in re.findall(r"'?(\w+)'?=(\d+)", m.group(1))}
    axes = re.findall(r"'?(\w+)'?(?::\((\d+)\)(\d+))?", m.group(2))
    return math.prod(int(part) if part else sizes.get(a, 1) for a, _, part in axes) if axes else num_partitions
  return 2 if ins.op.startswith('collective-permute') else num_partitions


def _window(ins: Instr) -> dict[str, list]:
  out = {}
  for item in (ins.attr('window') or '{}').strip('{}').split():
    key, _, val = item.partition('=')
    out[key] = [tuple(int(v) for v in p.split('_')) if key == 'pad' else int(p) for p in val.split('x')]
  return out


def _valid_pairs(n_in, k, n_out, stride, pad_lo, lhs_dil, rhs_dil) -> int:
  """(output, kernel) position pairs of one spatial dimension that read a real input element."""
  n_dil = (n_in - 1) * lhs_dil + 1 if n_in else 0
  return sum(1 for o in range(n_out) for j in range(k)
             if 0 <= (i := o * stride + j * rhs_dil - pad_lo) < n_dil and i % lhs_dil == 0)


def matmul_flops(ins: Instr, comp: Computation) -> float:
  """2 x multiply-adds of a dot or convolution (NaN when its operands are not in `comp`)."""
  ops = [comp.instrs.get(n) for n in ins.operands[:2]]
  out = shapes(ins.type)
  if len(ops) < 2 or None in ops or not out:
    return float('nan')
  lhs, rhs, out = shapes(ops[0].type)[0], shapes(ops[1].type)[0], out[0]
  if ins.op == 'dot':
    contracting = [int(d) for d in re.findall(r'\d+', ins.attr('lhs_contracting_dims') or '')]
    return 2.0 * math.prod(out) * math.prod(lhs[d] for d in contracting)
  m = re.search(r'dim_labels=([^_,\s]+)_([^-,\s]+)->([^,\s]+)', ins.rest)
  if not m:
    return float('nan')
  lhs_l, ker_l, out_l = m.groups()
  w = _window(ins)
  pairs = 1
  for d, c in enumerate(sorted(c for c in lhs_l if c.isdigit())):
    get = lambda key, default: w[key][d] if key in w else default
    pairs *= _valid_pairs(lhs[lhs_l.index(c)], get('size', 1), out[out_l.index(c)], get('stride', 1),
                          get('pad', (0, 0))[0], get('lhs_dilate', 1), get('rhs_dilate', 1))
  return 2.0 * out[out_l.index('b')] * out[out_l.index('f')] * rhs[ker_l.index('i')] * pairs


_NO_TRAFFIC = {'parameter', 'get-tuple-element', 'tuple', 'constant', 'bitcast', 'after-all', 'partition-id',
               'replica-id', 'iota', 'while', 'conditional', 'call', 'opt-barrier'}


def _moved_bytes(ins: Instr, comp: Computation) -> float:
  """Bytes an instruction reads and writes (its operands and result), as a rough per-run traffic estimate."""
  if ins.op in _NO_TRAFFIC or ins.op.endswith('-done'):
    return 0.0
  return nbytes(ins.type) + sum(nbytes(comp.instrs[n].type) for n in ins.operands if n in comp.instrs)


@dataclasses.dataclass
class Stats:
  num_partitions: int
  loops: list[dict]             # {'name', 'trip_count' (None: unknown)}
  collectives: dict[str, dict]  # op -> {'ops', 'executions', 'bytes', 'group_sizes'}
  matmul_flops_once: float      # every computation counted once, as cost_analysis() does
  matmul_flops: float           # weighted by the trip counts of the loops around it
  loop_extra_bytes: float       # estimate: operand + result bytes of loop bodies' instructions, runs beyond one
  kernel_bytes: float           # operand + result bytes of every kernel, weighted by loop trips
  kernels: dict[str, float]     # kind -> executions per step

  @property
  def unknown_trip_counts(self) -> int:
    return sum(loop['trip_count'] is None for loop in self.loops)


def analyze(text: str) -> Stats:
  comps = parse(text)
  entry = next((c for c in comps.values() if c.entry), None)
  if entry is None:
    raise ValueError('No ENTRY computation in the HLO text.')
  m = re.search(r'num_partitions=(\d+)', text)
  num_partitions = int(m.group(1)) if m else 1

  calls: dict[str, list[tuple[str, float]]] = defaultdict(list)  # caller -> (callee, times per call)
  loops, bodies = [], set()
  for comp in comps.values():
    for ins in comp.instrs.values():
      trips = trip_count(ins, comp, comps) if ins.op == 'while' else None
      if ins.op == 'while':
        loops.append({'name': ins.name, 'trip_count': trips})
      for kind, value in _CALLEES.findall(ins.rest):
        if kind == 'to_apply' and ins.op != 'call':
          continue  # reduction regions: scalar code
        times = float(trips or 1) if kind in ('body', 'condition') else 1.0
        if kind == 'body':
          bodies.add(value.lstrip('%'))
        for callee in _names(value):
          calls[comp.name].append((callee, times))

  order, seen = [], set()  # callees before callers (HLO call graphs are acyclic)

  def visit(name):
    if name not in seen:
      seen.add(name)
      for callee, _ in calls.get(name, ()):
        visit(callee)
      order.append(name)

  visit(entry.name)
  runs, once = defaultdict(float), defaultdict(float)  # times each computation runs; as cost_analysis counts
  runs[entry.name] = once[entry.name] = 1.0
  for name in reversed(order):
    for callee, times in calls.get(name, ()):
      runs[callee] += runs[name] * times
      once[callee] = max(once[callee], once[name])

  fused = _fused_computations(comps)
  collectives: dict[str, dict] = {}
  kernels: dict[str, float] = defaultdict(float)
  flops = flops_once = extra_bytes = kernel_bytes = 0.0
  for name in order:
    comp = comps.get(name)
    if comp and (name in bodies or name not in fused):
      moved = sum(_moved_bytes(i, comp) for i in comp.instrs.values())
      if runs[name] > once[name] and name in bodies:
        extra_bytes += (runs[name] - once[name]) * moved
      if name not in fused:
        kernel_bytes += runs[name] * moved
        for ins in comp.instrs.values():
          if kind := kernel_kind(ins):
            kernels[kind] += runs[name]
    for ins in comp.instrs.values() if comp else ():
      base = ins.op.removesuffix('-start')
      multislice = ins.op == 'send' and 'megascale' in ins.rest
      if base in COLLECTIVES or multislice:
        size = nbytes(' '.join(comp.instrs[n].type for n in ins.operands if n in comp.instrs))
        group = 1 if multislice else group_size(ins, num_partitions)
        entry_stats = collectives.setdefault(MULTISLICE_SEND if multislice else base,
                                             {'ops': 0, 'executions': 0.0, 'bytes': 0.0, 'group_sizes': set(),
                                              'executions_by_group_size': defaultdict(float)})
        entry_stats['ops'] += 1
        entry_stats['executions'] += runs[name]
        entry_stats['bytes'] += runs[name] * size * (group if base == 'all-gather' else 1)
        entry_stats['group_sizes'].add(group)
        entry_stats['executions_by_group_size'][group] += runs[name]
      if ins.op in ('dot', 'convolution'):
        f = matmul_flops(ins, comp)
        if f == f:
          flops += runs[name] * f
          flops_once += once[name] * f
  for s in collectives.values():
    s['group_sizes'] = sorted(s['group_sizes'])
    s['executions_by_group_size'] = dict(sorted(s['executions_by_group_size'].items()))
  return Stats(num_partitions, loops, collectives, flops_once, flops, extra_bytes, kernel_bytes,
               dict(sorted(kernels.items(), key=lambda item: -item[1])))


def _fused_computations(comps: dict[str, Computation]) -> set[str]:
  """Computations that run inside a kernel: those a fusion calls, and everything they call in turn."""
  fused, stack = set(), []
  for comp in comps.values():
    for ins in comp.instrs.values():
      if ins.op == 'fusion':
        stack += [n for kind, value in _CALLEES.findall(ins.rest) if kind == 'calls' for n in _names(value)]
      elif ins.op == 'custom-call':
        stack += _names(ins.attr('called_computations') or '')
  while stack:
    name = stack.pop()
    if name not in fused and name in comps:
      fused.add(name)
      for ins in comps[name].instrs.values():
        stack += [n for _, value in _CALLEES.findall(ins.rest) for n in _names(value)]
        stack += _names(ins.attr('called_computations') or '')
  return fused


def kernel_kind(ins: Instr) -> str | None:
  """What kind of kernel a top-level instruction launches (None: no kernel of interest)."""
  if ins.op == 'custom-call':
    target = (re.search(r'custom_call_target="([^"]+)"', ins.rest) or [None, 'custom-call'])[1]
    if target.startswith('__cudnn$'):
      return 'cuDNN ' + target.removeprefix('__cudnn$')
    if target.startswith('__cublas'):
      return 'cuBLAS GEMM'
    return f'custom-call {target}'
  if ins.op == 'fusion':
    if re.search(r'"kind":"__triton[\w]*gemm', ins.rest) or '__cublas' in ins.rest:
      return 'GEMM fusion'
    return 'fusion'
  if ins.op in ('convolution', 'dot'):
    return ins.op
  return None
