"""The GPU checks a machine with one NVIDIA GPU runs as they are, in under 10 minutes: correctness, then speed.

    python benchmarks/gpu_check.py --out DIR          # writes DIR/gpu_check.json, prints one line per result

1. Every kernel set (densenet_jax/model/forms/kernels.py) and every block form (unrolled, memory_efficient, scanned)
   computes the same function on the GPU: logits, gradients and running statistics of a small DenseNet-BC with
   dropout, against XLA's own kernels unrolled.
2. DenseNet-121, bfloat16, batch 256: train img/s, compile seconds and the compiled step's temporary memory for
   each block form and kernel set, against PyTorch (AMP bfloat16, channels_last) and torch.compile, same process,
   alternating rounds (bench.py).
3. DenseNet-BC L=100 k=12, batch 64, float32: the same.
4. What the deviceless compile check (docs/gpu.md) predicts for this GPU, compiled on this machine's CPU after
   parts 1-3: temporaries, peak and compile time of DenseNet-121's train steps, to set against the measured ones.
Every result is appended to the JSON file as soon as it exists, so a run cut short keeps what it measured.
--smoke runs part 1 and one tiny part-2 row on any backend (the test suite runs it on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from densenet_jax import platform  # noqa: E402

platform.prepare_environment()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import bench, common  # noqa: E402
from densenet_jax import model as model_lib  # noqa: E402
from densenet_jax.compile_check import specs  # noqa: E402

FORMS = {
    'unrolled': dict(memory_efficient=False, layers_per_scan=0),
    'memory_efficient': dict(memory_efficient=True, layers_per_scan=0),
    'scanned': dict(memory_efficient=True, layers_per_scan=8),
}


def equality(kernel_sets=('xla', 'cpu')) -> dict:
  """Largest deviation of each (kernel set, form) from XLA's kernels unrolled, relative to the largest value."""
  base = model_lib.cifar_densenet(16, 6, bottleneck=True, compression=0.5, dropout_rate=0.2)
  images = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
  variables = base.init(jax.random.key(0), images)

  def outputs(model):
    def loss(params):
      logits, updates = model.apply({**variables, 'params': params}, images, train=True, mutable=['batch_stats'],
                                    rngs={'dropout': jax.random.key(2)})
      return jnp.mean(jax.nn.log_softmax(logits)[:, 0]), (logits, updates['batch_stats'])

    (_, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
    return {'train': aux, 'grads': grads, 'eval': jax.jit(model.apply)(variables, images)}

  reference = outputs(base.clone(kernels='xla', **FORMS['unrolled']))
  result = {}
  for kernels in kernel_sets:
    for form, options in FORMS.items():
      got = outputs(base.clone(kernels=kernels, **{**options, 'layers_per_scan': min(options['layers_per_scan'], 2)}))
      result[f'{kernels}/{form}'] = {
          part: max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / (np.max(np.abs(np.asarray(b))) + 1e-12))
                    for a, b in zip(jax.tree.leaves(got[part]), jax.tree.leaves(reference[part])))
          for part in reference}
  return result


# Speed rows as configs of the compile check: same model, batch and dtype; whole-batch BatchNorm, as bench.py.
DEVICELESS = {'densenet121': ('configs/imagenet_121.py', 256)}


def start_deviceless(model: str, form: str, out: str) -> tuple[subprocess.Popen, str] | str:
  """Starts the compile check for this GPU's target in a process of its own (it compiles on the CPU, without the
  GPU); returns the process and its report's path, or why it cannot run here."""
  kind = jax.devices()[0].device_kind
  spec = next((gpu for gpu in specs.GPUS if gpu.device_kind == kind), None)
  if spec is None:
    return f'no target config describes a {kind!r} (densenet_jax/compile_check/specs.py)'
  config, batch = DEVICELESS[model]
  report = os.path.join(out, f'deviceless_{model}_{form}.json')
  command = [sys.executable, '-m', 'densenet_jax.compile_check', f'--config={config}', f'--gpu={spec.name}',
             '--steps=train', f'--config.batch_size={batch}', '--config.batch_norm_group_size=None',
             f"--config.memory_efficient={FORMS[form]['memory_efficient']}",
             f"--config.layers_per_scan={FORMS[form]['layers_per_scan']}", f'--json={report}']
  environ = {k: v for k, v in os.environ.items() if k not in ('JAX_PLATFORMS', 'XLA_FLAGS')}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.Popen(command, cwd=root, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True), report


def finish_deviceless(started: tuple[subprocess.Popen, str] | str) -> dict:
  if isinstance(started, str):
    return {'error': started}
  process, report = started
  _, stderr = process.communicate()
  if not os.path.exists(report):
    return {'error': stderr[-2000:]}
  with open(report) as f:
    run = json.load(f)
  step = run['steps']['train']
  return {'target': run['target'], 'temp_bytes': step['memory']['temp'], 'peak_bytes': step['memory']['peak_per_chip'],
          'compile_seconds': run['seconds']['train']['compile_s'], 'kernels': step['kernels']}


def speed(model: str, batch: int, dtype: str, form: str, kernels: str, reference: str | None, rounds: int,
          steps: int) -> dict:
  argv = ['--model', model, '--batch', str(batch), '--dtype', dtype, '--kernels', kernels, '--rounds', str(rounds),
          '--steps', str(steps)]
  if FORMS[form]['memory_efficient']:
    argv.append('--memory_efficient')
  if FORMS[form]['layers_per_scan']:
    argv += ['--layers_per_scan', str(FORMS[form]['layers_per_scan'])]
  if reference:
    argv += ['--reference', 'torch', '--torch_compile'] if reference == 'torch_compile' else ['--reference', reference]
  return bench.run(bench.parse_args(argv))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='.', help='folder for gpu_check.json')
  parser.add_argument('--smoke', action='store_true', help='part 1 and one tiny speed row (any backend)')
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, 'gpu_check.json')
  results = {'environment': common.environment(), 'rows': []}

  def record(name, value):
    results['rows'].append({'name': name, **value})
    with open(path, 'w') as f:
      json.dump(results, f, indent=2)
    print(name, json.dumps(value), flush=True)

  start = time.perf_counter()
  plan = [('densenet121', 256, 'bfloat16'), ('densenet_bc_l100_k12', 64, 'float32')]
  record('equality', {'max_relative_deviation': equality()})
  if args.smoke:
    record('speed densenet_bc_l100_k12 unrolled/xla', speed('densenet_bc_l100_k12', 2, 'float32', 'unrolled', 'xla',
                                                            None, rounds=1, steps=1))
    record('deviceless densenet121 unrolled', finish_deviceless(start_deviceless('densenet121', 'unrolled', args.out)))
    return
  for model, batch, dtype in plan:
    for form in FORMS:
      for kernels in ('xla', 'cpu'):
        reference = 'torch' if (form, kernels) == ('unrolled', 'xla') else None
        try:
          value = speed(model, batch, dtype, form, kernels, reference, rounds=3, steps=5)
        except Exception as error:  # pylint: disable=broad-except  # one failed row must not lose the others
          value = {'error': f'{type(error).__name__}: {error}'}
        record(f'speed {model} {form}/{kernels}', value)
    record(f'speed {model} torch.compile', speed(model, batch, dtype, 'unrolled', 'xla', 'torch_compile', 3, 5))
  started = {form: start_deviceless('densenet121', form, args.out) for form in ('unrolled', 'memory_efficient')}
  for form, process in started.items():
    record(f'deviceless densenet121 {form}', finish_deviceless(process))
  record('done', {'seconds': round(time.perf_counter() - start, 1)})


if __name__ == '__main__':
  main()
