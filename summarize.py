"""Markdown tables of sizes, export times and diffs from export_demo.py / check_fresh.py outputs."""
import json, os, sys

def fmt_mb(b): return f'{b / 2**20:.2f}'
for out in sys.argv[1:]:
  m = json.load(open(os.path.join(out, 'manifest.json')))
  print(f"\n### {m['model']} ({m['num_params']:,} params, weights {fmt_mb(m['weights_bytes'])} MB, max |logit| {m['max_abs_logit']:.3g})\n")
  print('| format | size MB | export s | in-process diff | fresh diff b1 / b7 | fresh first call b1 s | later call b7 ms |')
  print('|---|---|---|---|---|---|---|')
  for name, f in m['formats'].items():
    if 'error' in f:
      print(f'| {name} | error: {f["error"][:80]} |'); continue
    size = f['bytes'] + f.get('weights_bytes', 0)
    p = os.path.join(out, f'fresh_{name}.json')
    r = json.load(open(p)) if os.path.exists(p) else {}
    fresh = f"{r['diff_b1']:.1e} / {r['diff_b7']:.1e}" if r else 'n/a'
    print(f"| {name} | {fmt_mb(size)}{' (+weights)' if 'weights_bytes' in f else ''} | {f['export_seconds']:.1f} | {f['in_process_diff']:.1e} | {fresh} | "
          f"{r.get('first_call_seconds_b1', float('nan')):.1f} | {r.get('second_call_seconds_b7', float('nan')) * 1e3:.0f} |")
